"""Evaluating a model on a dataset and scoring its predictions, with the line that sums them up:
shared by training (every epoch and at the end), eval, cv and predict."""

from __future__ import annotations

import numpy as np

from cxflax import parallel
from cxflax.train import metrics as metrics_lib


def run_evaluation(eval_step, variables, batches, mesh) -> dict[str, np.ndarray]:
  """Predictions, labels and example indices for every example of `batches`, padding removed."""
  parts: dict[str, list] = {"pred": [], "label": [], "index": []}
  for out in eval_step.outputs(variables, batches, mesh):
    keep = parallel.gather(out["valid"]) > 0
    for k in parts:
      parts[k].append(parallel.gather(out[k])[keep])
  return {k: np.concatenate(v) for k, v in parts.items()}


def score(task: str, class_names, result: dict, round_predictions: bool = False) -> dict:
  """The task's metrics of an evaluation's result (run_evaluation)."""
  if task == "segmentation":
    return metrics_lib.segmentation_metrics(result["pred"], class_names)
  if task == "regression":
    pred = np.round(result["pred"]) if round_predictions else result["pred"]
    return metrics_lib.regression_metrics(pred, result["label"])
  n = len(class_names)
  if task == "embedding":
    return metrics_lib.embedding_metrics(result["pred"], result["label"], n, class_names)
  return metrics_lib.classification_metrics(result["pred"].argmax(-1), result["label"], n,
                                            probs=result["pred"], class_names=class_names)


def baseline(task, class_names, train_labels, eval_labels) -> dict:
  """The metrics of a trivial predictor (see _TRIVIAL), to read a model's against."""
  if task == "segmentation":  # eval_labels: per-image pixel counts of each class
    return metrics_lib.segmentation_baseline(eval_labels, class_names)
  kind = "regression" if task == "regression" else "classification"
  return metrics_lib.baseline_metrics(kind, train_labels, eval_labels,
                                      None if kind == "regression" else len(class_names))


def headline(task: str) -> str:
  """The metric a task's result lines lead with."""
  return {"regression": "mae", "segmentation": "jaccard"}.get(task, "accuracy")


_TRIVIAL = {"regression": "training mean", "segmentation": "every pixel lung"}


def summary(task: str, metrics: dict, base: dict) -> str:
  """One line: the headline metric and a few others, against the trivial baseline's."""
  key = headline(task)
  extra = [k for k in ("rmse", "macro_f1", "auc", "dice") if k in metrics and k != key]
  others = ", ".join(f"{k}={metrics[k]:.4f}" for k in extra)
  return (f"eval {key}={metrics[key]:.4f} ({others}) | trivial baseline "
          f"({_TRIVIAL.get(task, 'majority class')}) {key}={base[key]:.4f}")
