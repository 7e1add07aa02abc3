"""Tasks (cxflax/train/tasks.py) and the registries that configs name things through."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxflax.errors import ConfigError
from cxflax.models.heads import HEADS
from cxflax.registry import Registry
from cxflax.train import tasks
from cxflax.train.losses import LOSSES
from cxflax.train.optim import OPTIMIZERS, SCHEDULES


def _config(loss, head="linear"):
  return ml_collections.ConfigDict({"loss": {"name": loss}, "head": head})


def test_registry_refuses_a_second_registration_and_lists_names_when_asked_for_an_unknown_one():
  r = Registry("widget", ConfigError, "config.widget")
  r.register("b")(1)
  r.add("a", 2)
  assert r.get("a") == 2 and "b" in r and "c" not in r
  with pytest.raises(ValueError, match="widget 'a' is registered twice$"):
    r.add("a", 3)
  with pytest.raises(ConfigError, match=r"config.widget: unknown widget 'c'; use one of a, b$"):
    r.get("c")


def test_every_loss_head_and_task_is_registered_and_every_loss_belongs_to_a_task():
  assert tasks.TASKS.names() == ["classification", "embedding", "regression", "segmentation"]
  assert set(SCHEDULES.names()) == {"constant", "cosine", "warmup_cosine", "cosine_restarts", "step", "one_cycle"}
  assert set(OPTIMIZERS.names()) == {"sgd", "adam", "adamw"}
  task_losses = {loss for name in tasks.TASKS.names() for loss in tasks.TASKS.get(name).losses}
  assert task_losses == set(LOSSES.names())
  for name in tasks.TASKS.names():
    heads = tasks.TASKS.get(name).heads
    assert heads is None or set(heads) <= set(HEADS.names()), name


@pytest.mark.parametrize("data_task, loss, head, want", [
    ("regression", "smooth_l1", "linear", "regression"),
    ("regression", "multitask_kl", "multitask", "regression"),
    ("classification", "focal", "linear", "classification"),
    ("classification", "triplet", "embedding", "embedding"),  # seed 004's triplet phase
    ("classification", "cross_entropy", "embedding_classifier", "classification"),
    ("segmentation", "cross_entropy", "linear", "segmentation"),  # the model's own classifier
])
def test_resolve_picks_the_task_the_loss_trains_on_the_data(data_task, loss, head, want):
  assert tasks.resolve(_config(loss, head), data_task).name == want


def test_resolve_refuses_a_loss_or_head_that_does_not_suit_the_data():
  with pytest.raises(ConfigError, match=r"regression task.*'cross_entropy'.*'smooth_l1', 'mse'"):
    tasks.resolve(_config("cross_entropy"), "regression")
  with pytest.raises(ConfigError, match=r"classification task.*'mse'.*'cross_entropy', 'focal', 'triplet'"):
    tasks.resolve(_config("mse"), "classification")
  with pytest.raises(ConfigError, match=r"config.head='multitask' does not suit classification"):
    tasks.resolve(_config("cross_entropy", "multitask"), "classification")
  with pytest.raises(ConfigError, match=r"config.head='linear' does not suit embedding"):
    tasks.resolve(_config("triplet", "linear"), "classification")
  with pytest.raises(ConfigError, match="no task learns from 'ranking' labels"):
    tasks.resolve(_config("mse"), "ranking")


def test_regression_outputs_metrics_baseline_and_summary():
  task = tasks.TASKS.get("regression")
  assert task.num_outputs(("a", "b")) == 1
  out = task.eval_outputs(jnp.asarray([[1.2], [2.0], [4.6]]), {"label": jnp.asarray([1.0, 3.0, 1.0])})
  result = {k: np.asarray(v) for k, v in out.items()}
  np.testing.assert_allclose(result["pred"], [1.2, 2.0, 4.6], rtol=1e-6)
  m = task.metrics(result, None)
  assert m["mae"] == pytest.approx((0.2 + 1.0 + 3.6) / 3, rel=1e-6)
  assert m["rmse"] == pytest.approx(np.sqrt((0.04 + 1 + 12.96) / 3), rel=1e-6)
  assert task.metrics(result, None, round_predictions=True)["mae"] == pytest.approx((0 + 1 + 4) / 3)
  base = task.baseline(None, np.asarray([0.0, 10.0]), np.asarray([5.0, 7.0]))  # training mean 5
  assert base["mae"] == pytest.approx(1.0)
  assert task.summary(m, base) == (f"eval mae={m['mae']:.4f} (rmse={m['rmse']:.4f}) | trivial "
                                   "baseline (training mean) mae=1.0000")


def test_classification_outputs_are_probabilities_and_the_baseline_is_the_majority_class():
  task = tasks.TASKS.get("classification")
  names = ("a", "b", "c")
  assert task.num_outputs(names) == 3
  logits = jnp.asarray([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
  out = task.eval_outputs(logits, {"label": jnp.asarray([0, 2, 2, 1])})
  probs = np.asarray(out["pred"])
  np.testing.assert_allclose(probs[0], np.exp([2, 0, 0]) / np.exp([2, 0, 0]).sum(), rtol=1e-6)
  m = task.metrics({"pred": probs, "label": np.asarray(out["label"])}, names)
  assert m["accuracy"] == 0.5  # predicted 0, 2, 1, 0 against 0, 2, 2, 1
  assert m["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
  base = task.baseline(names, np.asarray([2, 2, 0]), np.asarray([2, 1, 2, 0]))  # majority class 2
  assert base["accuracy"] == 0.5
  assert task.summary(m, base).startswith(f"eval accuracy=0.5000 (macro_f1={m['macro_f1']:.4f}, auc=")
  assert task.summary(m, base).endswith("| trivial baseline (majority class) accuracy=0.5000")


def test_embedding_is_scored_by_its_nearest_neighbour():
  task = tasks.TASKS.get("embedding")
  e = np.asarray([[0.0, 1.0], [0.0, 0.9], [1.0, 0.0], [0.9, 0.0], [0.1, 0.95]], np.float32)
  out = task.eval_outputs(jnp.asarray(e), {"label": jnp.asarray([0, 0, 1, 1, 1])})
  np.testing.assert_array_equal(np.asarray(out["pred"]), e)  # the embedding itself
  # nearest neighbours: 1→0 ok, 0→1 ok, 3→1 ok, 2→1 ok, (0.1, 0.95)→class 0 wrong: 4 of 5
  m = task.metrics({"pred": e, "label": np.asarray([0, 0, 1, 1, 1])}, ("x", "y"))
  assert m["accuracy"] == pytest.approx(0.8)


def test_segmentation_counts_pixels_per_image_and_class():
  task = tasks.TASKS.get("segmentation")
  true = np.asarray([[[0, 1], [1, 1]], [[0, 0], [0, 1]]])          # (2 images, 2, 2)
  pred = np.asarray([[[1, 1], [0, 1]], [[0, 0], [0, 0]]])
  logits = jnp.asarray(np.eye(2)[pred] * 4.0)                       # (2, 2, 2, classes)
  out = task.eval_outputs(logits, {"label": jnp.asarray(true)})
  counts = np.asarray(out["pred"])
  # image 0, lung: 2 pixels right of 3 predicted and 3 true; background: 0 of 1 and 1
  np.testing.assert_array_equal(counts[0], [[0, 1, 1], [2, 3, 3]])
  np.testing.assert_array_equal(counts[1], [[3, 4, 3], [0, 0, 1]])
  np.testing.assert_array_equal(np.asarray(out["label"]), [[1, 3], [3, 1]])
  m = task.metrics({"pred": counts, "label": np.asarray(out["label"])}, ("background", "lung"))
  assert m["jaccard"] == pytest.approx((2 / 4 + 0 / 1) / 2)
  assert m["dice"] == pytest.approx((2 * 2 / 6 + 0) / 2)
  base = task.baseline(("background", "lung"), None, np.asarray(out["label"]))
  assert base["jaccard"] == pytest.approx((3 / 4 + 1 / 4) / 2)  # every pixel lung
  assert task.summary(m, base).endswith("| trivial baseline (every pixel lung) jaccard=0.5000")
