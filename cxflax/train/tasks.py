"""What is learned: regression, classification, segmentation or an embedding.

A Task owns everything that depends on what is learned — how many outputs the network has, which
heads and losses suit it, what the eval step returns, the metrics, the trivial baseline, the
headline metric and the summary line — so that the rest of cxflax asks the task instead of
comparing task names. Tasks are looked up by name in TASKS; `resolve` picks the one a config
trains on a dataset's labels.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cxflax.errors import ConfigError
from cxflax.registry import Registry
from cxflax.train import metrics as metrics_lib


class Task:
  """The base: one output per class, classification-style metrics (subclasses override)."""
  name = ""
  data_task = ""                 # the kind of labels it trains on (a source's task)
  losses: tuple[str, ...] = ()   # config.loss.name values it accepts; the first is the default
  heads: tuple[str, ...] | None = ()  # config.head values it accepts; None: the model has its own
  headline = "accuracy"          # the metric the summary line leads with
  trivial = "majority class"     # the baseline the summary line compares with
  details: tuple[str, ...] = ("macro_f1", "auc")  # metrics the summary line adds in brackets
  per_pixel = False              # a prediction per pixel: segmentation models, masks as output

  def num_outputs(self, class_names: Sequence[str] | None) -> int:
    return len(class_names or ())

  def eval_outputs(self, out, batch: dict) -> dict:
    """Inside the compiled eval step: what the step returns for a batch's network output
    (float32), besides the bookkeeping fields."""
    return {"pred": jax.nn.softmax(out, axis=-1), "label": batch["label"]}

  def metrics(self, result: dict, class_names, round_predictions: bool = False) -> dict:
    """Metrics of gathered eval outputs ('pred', 'label'), every example once."""
    return metrics_lib.classification_metrics(result["pred"].argmax(-1), result["label"], len(class_names),
                                              probs=result["pred"], class_names=class_names)

  def baseline(self, class_names, train_labels: np.ndarray, eval_labels: np.ndarray) -> dict:
    """The trivial predictor's metrics (what a model must beat)."""
    return metrics_lib.majority_baseline(train_labels, eval_labels, len(class_names))

  def labels_of(self, preds: np.ndarray, round_predictions: bool = False) -> np.ndarray:
    """Labels from (averaged) predictions, as pseudo-labelling gives them: the likeliest class."""
    return preds.argmax(-1)

  def summary(self, metrics: dict, base: dict) -> str:
    """The line a run ends with: the headline metric, the details, and the trivial baseline."""
    key = self.headline
    others = ", ".join(f"{k}={metrics[k]:.4f}" for k in self.details if k in metrics)
    return (f"eval {key}={metrics[key]:.4f} ({others}) | trivial baseline ({self.trivial}) "
            f"{key}={base[key]:.4f}")

  def check_head(self, head: str) -> None:
    """Raises ConfigError where config.head does not suit this task."""
    if self.heads is not None and head not in self.heads:
      raise ConfigError(f"config.head={head!r} does not suit {self.name}; use one of {self.heads}")


TASKS: Registry[Task] = Registry("task")


def _register(cls: type[Task]) -> type[Task]:
  TASKS.add(cls.name, cls())
  return cls


@_register
class Regression(Task):
  """A value per image (seeds 000, 001: the infection percentage)."""
  name = data_task = "regression"
  losses = ("smooth_l1", "mse", "multitask", "multitask_kl")
  heads = ("linear", "mlp", "multitask", "fastai")
  headline, trivial, details = "mae", "training mean", ("rmse",)

  def num_outputs(self, class_names) -> int:
    return 1

  def eval_outputs(self, out, batch):
    return {"pred": out[..., 0], "label": batch["label"]}

  def metrics(self, result, class_names, round_predictions=False):
    pred = np.round(result["pred"]) if round_predictions else result["pred"]
    return metrics_lib.regression_metrics(pred, result["label"])

  def baseline(self, class_names, train_labels, eval_labels):
    return metrics_lib.mean_baseline(train_labels, eval_labels)

  def labels_of(self, preds, round_predictions=False):
    return np.round(preds) if round_predictions else preds


@_register
class Classification(Task):
  """One class per image: softmax over the classes' logits (seeds 002, 003, 004)."""
  name = data_task = "classification"
  losses = ("cross_entropy", "focal")
  heads = ("linear", "mlp", "fastai", "embedding_classifier")


@_register
class Embedding(Task):
  """An embedding trained with a metric loss on class labels (seed 004's triplet phase), scored by
  leave-one-out nearest-neighbour classification."""
  name, data_task = "embedding", "classification"
  losses = ("triplet",)
  heads = ("embedding",)

  def eval_outputs(self, out, batch):
    return {"pred": out, "label": batch["label"]}

  def metrics(self, result, class_names, round_predictions=False):
    return metrics_lib.embedding_metrics(result["pred"], result["label"], len(class_names), class_names)

  def labels_of(self, preds, round_predictions=False):
    raise ConfigError("an embedding gives no labels to pseudo-label with")


@_register
class Segmentation(Task):
  """A class per pixel (seed 003's lung masks). The eval step returns per-image pixel counts
  (segmentation_counts) instead of masks; 'label' holds the true counts."""
  name = data_task = "segmentation"
  losses = ("cross_entropy",)  # per pixel, on (B, H, W, classes) logits
  heads = None                 # segmentation models end in their own per-pixel classifier
  headline, trivial, details = "jaccard", "every pixel lung", ("dice",)
  per_pixel = True

  def eval_outputs(self, out, batch):
    label = batch["label"] if batch["label"].ndim == 3 else jnp.zeros(out.shape[:3], jnp.int32)
    counts = segmentation_counts(out, label)
    return {"pred": counts, "label": counts[..., 2]}

  def metrics(self, result, class_names, round_predictions=False):
    return metrics_lib.segmentation_metrics(result["pred"], class_names)

  def baseline(self, class_names, train_labels, eval_labels):
    return metrics_lib.segmentation_baseline(eval_labels, class_names)  # eval_labels: true counts

  def labels_of(self, preds, round_predictions=False):
    raise ConfigError("segmentation runs give masks (--mode=predict), not labels to pseudo-label with")


def segmentation_counts(logits, labels):
  """Per image and class, [intersection, predicted, true] pixel counts (B, classes, 3): all that
  Jaccard and Dice need, so evaluation gathers counts instead of masks."""
  n = logits.shape[-1]
  pred = jax.nn.one_hot(jnp.argmax(logits, -1), n, dtype=jnp.int32)
  true = jax.nn.one_hot(labels, n, dtype=jnp.int32)
  return jnp.stack([jnp.sum(pred * true, (1, 2)), jnp.sum(pred, (1, 2)), jnp.sum(true, (1, 2))], -1)


def _losses_for(data_task: str) -> tuple[str, ...]:
  return tuple(loss for name in TASKS.names() if TASKS.get(name).data_task == data_task
               for loss in TASKS.get(name).losses)


def resolve(config, data_task: str) -> Task:
  """The task config trains on labels of kind `data_task` (a source's task): the one of that
  kind whose losses include config.loss.name (a triplet loss on class labels learns an embedding),
  checked against config's loss and head."""
  for name in TASKS.names():
    task = TASKS.get(name)
    if task.data_task == data_task and config.loss.name in task.losses:
      task.check_head(config.head)
      return task
  kinds = sorted({TASKS.get(n).data_task for n in TASKS.names()})
  if data_task not in kinds:
    raise ConfigError(f"no task learns from {data_task!r} labels; known: {kinds}")
  raise ConfigError(f"the data is a {data_task} task, which config.loss.name={config.loss.name!r} does not "
                    f"train; use one of {_losses_for(data_task)}")
