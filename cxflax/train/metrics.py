"""Evaluation metrics on host (numpy), over every example exactly once."""

from __future__ import annotations

import numpy as np


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
  err = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
  return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2)))}


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
  """counts[true, predicted]."""
  return np.bincount(np.asarray(target, np.int64) * num_classes + np.asarray(pred, np.int64),
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
  """Area under the ROC curve: the probability that a positive outranks a negative (ties count
  half), by the Mann–Whitney rank sum. NaN when one of the two groups is empty."""
  return float(ranked_auc(np.asarray(scores, np.float64)[None], np.asarray(positive, bool)[None])[0])


def ranked_auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
  """binary_auc of each row of scores (B, n) against positive (B, n) at once (the evaluation
  report's bootstrap resamples); NaN for a row without positives or negatives."""
  from scipy.stats import rankdata
  ranks = rankdata(scores, axis=-1)  # ties get their average rank
  pos = positive.sum(-1).astype(np.float64)
  neg = positive.shape[-1] - pos
  with np.errstate(all="ignore"):
    auc = ((ranks * positive).sum(-1) - pos * (pos + 1) / 2) / (pos * neg)
  return np.where((pos > 0) & (neg > 0), auc, np.nan)


def classification_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int,
                           probs: np.ndarray | None = None, class_names=None) -> dict:
  """Accuracy, macro-F1 and, per class, sensitivity (recall), PPV (precision) and F1; the
  confusion matrix; with probabilities, one-vs-rest AUC per class and their macro average.
  Classes absent from both predictions and targets are left out of the macro averages."""
  cm = confusion_matrix(pred, target, num_classes)
  tp = np.diag(cm).astype(np.float64)
  support, predicted = cm.sum(1), cm.sum(0)
  present = (support + predicted) > 0
  sensitivity = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
  ppv = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
  f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1), 0.0)
  names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
  out = {"accuracy": float(tp.sum() / max(cm.sum(), 1)),
         "macro_f1": float(f1[present].mean()) if present.any() else 0.0}
  for k, name in enumerate(names):
    out[f"sensitivity/{name}"] = float(sensitivity[k])
    out[f"ppv/{name}"] = float(ppv[k])
    out[f"f1/{name}"] = float(f1[k])
  if probs is not None:
    aucs = [binary_auc(probs[:, k], np.asarray(target) == k) for k in range(num_classes)]
    for k, name in enumerate(names):
      out[f"auc/{name}"] = aucs[k]
    valid = [a for a in aucs if not np.isnan(a)]
    out["auc"] = float(np.mean(valid)) if valid else float("nan")
  out["confusion_matrix"] = cm.tolist()
  return out


def embedding_metrics(embeddings: np.ndarray, labels: np.ndarray, num_classes: int, class_names=None) -> dict:
  """Leave-one-out nearest-neighbour classification of an embedding (seed 004's triplet phase):
  how well same-class examples cluster."""
  e = np.asarray(embeddings, np.float64)
  d = np.sum(e ** 2, 1)[:, None] + np.sum(e ** 2, 1)[None, :] - 2 * e @ e.T
  np.fill_diagonal(d, np.inf)
  nearest = np.asarray(labels)[np.argmin(d, axis=1)]
  return classification_metrics(nearest, labels, num_classes, class_names=class_names)


def scalar_metrics(metrics: dict) -> dict[str, float]:
  """The scalar entries (for TensorBoard and log lines)."""
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def mean_baseline(train_labels: np.ndarray, eval_labels: np.ndarray) -> dict[str, float]:
  """The metrics of predicting the training mean for every example (regression)."""
  return regression_metrics(np.full(len(eval_labels), np.mean(train_labels)), eval_labels)


def majority_baseline(train_labels: np.ndarray, eval_labels: np.ndarray, num_classes: int) -> dict[str, float]:
  """The metrics of predicting the training split's most frequent class for every example."""
  majority = int(np.bincount(np.asarray(train_labels, np.int64), minlength=num_classes).argmax())
  return scalar_metrics(classification_metrics(np.full(len(eval_labels), majority), eval_labels, num_classes))


def segmentation_metrics(counts: np.ndarray, class_names) -> dict[str, float]:
  """Jaccard index and Dice coefficient per foreground class, averaged over images, and pixel
  accuracy, from per-image counts (N, classes, 3) of [intersection, predicted, true] pixels.
  An image where a class is neither predicted nor present scores 1 for it (a correct empty mask).
  """
  c = np.asarray(counts, np.float64)
  inter, true = c[..., 0], c[..., 2]
  jaccard, dice = overlap_scores(c)
  names = list(class_names)
  out = {"jaccard": float(jaccard[:, 1:].mean()), "dice": float(dice[:, 1:].mean()),
         "pixel_accuracy": float((inter.sum(1) / np.maximum(true.sum(1), 1)).mean())}
  for k, name in enumerate(names[1:], start=1):
    out[f"jaccard/{name}"] = float(jaccard[:, k].mean())
    out[f"dice/{name}"] = float(dice[:, k].mean())
  return out


def overlap_scores(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per image and class, the Jaccard index and Dice coefficient (N, classes) from pixel counts
  (N, classes, 3) of [intersection, predicted, true]; 1 where the class is neither predicted nor
  present (a correct empty mask)."""
  c = np.asarray(counts, np.float64)
  inter, pred, true = c[..., 0], c[..., 1], c[..., 2]
  union = pred + true - inter
  jaccard = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
  dice = np.where(pred + true > 0, 2 * inter / np.maximum(pred + true, 1), 1.0)
  return jaccard, dice


def segmentation_baseline(true_counts: np.ndarray, class_names) -> dict[str, float]:
  """The metrics of calling every pixel the first foreground class (e.g. 'every pixel lung'),
  from per-image true pixel counts (N, classes)."""
  t = np.asarray(true_counts, np.float64)
  pred = np.zeros_like(t)
  pred[:, 1] = t.sum(1)
  inter = np.minimum(pred, t)
  return scalar_metrics(segmentation_metrics(np.stack([inter, pred, t], -1), class_names))
