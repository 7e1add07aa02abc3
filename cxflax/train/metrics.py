"""Evaluation metrics on host (numpy), over every example exactly once."""

from __future__ import annotations

import numpy as np


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
  err = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
  return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2)))}


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
  """counts[true, predicted]."""
  return np.bincount(np.asarray(target) * num_classes + np.asarray(pred),
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict[str, float]:
  """Accuracy and macro-F1 (classes absent from both predictions and targets are skipped)."""
  cm = confusion_matrix(pred, target, num_classes)
  tp = np.diag(cm).astype(np.float64)
  support, predicted = cm.sum(1), cm.sum(0)
  present = (support + predicted) > 0
  f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1), 0.0)
  return {"accuracy": float(tp.sum() / max(cm.sum(), 1)),
          "macro_f1": float(f1[present].mean()) if present.any() else 0.0}


def baseline_metrics(task: str, train_labels: np.ndarray, eval_labels: np.ndarray,
                     num_classes: int | None = None) -> dict[str, float]:
  """The trivial predictor's metrics: the training mean (regression) or the majority class."""
  if task == "regression":
    return regression_metrics(np.full(len(eval_labels), np.mean(train_labels)), eval_labels)
  majority = int(np.bincount(train_labels, minlength=num_classes).argmax())
  return classification_metrics(np.full(len(eval_labels), majority), eval_labels, num_classes)
