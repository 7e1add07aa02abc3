"""Losses, metrics, optimizers and the sharded train step."""

import json
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from cxflax.train import losses, metrics
from tests.conftest import run_python


def test_smooth_l1_matches_its_definition():
  pred = jnp.array([0.0, 0.5, 3.0, -2.0])
  target = jnp.array([0.2, 0.0, 0.0, 0.0])
  # |d| = 0.2, 0.5, 3, 2 with beta 1: 0.5*0.04, 0.5*0.25, 3-0.5, 2-0.5
  expected = np.mean([0.02, 0.125, 2.5, 1.5])
  assert float(losses.smooth_l1(pred, target, 1.0)) == pytest.approx(expected, rel=1e-6)
  assert float(losses.smooth_l1(pred, target, 0.0)) == pytest.approx(np.mean([0.2, 0.5, 3, 2]), rel=1e-6)
  w = jnp.array([1.0, 0.0, 1.0, 0.0])
  assert float(losses.smooth_l1(pred, target, 1.0, w)) == pytest.approx((0.02 + 2.5) / 2, rel=1e-6)


def test_cross_entropy_matches_log_softmax():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]])
  labels = jnp.array([0, 2])
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.mean([logp[0, 0], logp[1, 2]])
  assert float(losses.cross_entropy(logits, labels)) == pytest.approx(expected, rel=1e-6)


def test_regression_metrics():
  m = metrics.regression_metrics(np.array([1.0, 2.0, 5.0]), np.array([1.0, 4.0, 2.0]))
  assert m["mae"] == pytest.approx(5 / 3)
  assert m["rmse"] == pytest.approx(np.sqrt(13 / 3))


def test_classification_metrics_by_hand():
  target = np.array([0, 0, 1, 1, 2, 2])
  pred = np.array([0, 1, 1, 1, 0, 2])
  # class 0: tp 1, fp 1, fn 1 → F1 0.5; class 1: tp 2, fp 1, fn 0 → 0.8; class 2: tp 1, fn 1 → 2/3
  m = metrics.classification_metrics(pred, target, 3)
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
  np.testing.assert_array_equal(metrics.confusion_matrix(pred, target, 3),
                                [[1, 1, 0], [0, 2, 0], [1, 0, 1]])


_SHARDING_CHECK = textwrap.dedent("""
    import json, jax, numpy as np, optax
    from cxflax import parallel
    from cxflax.config import base_config, finalize
    from cxflax.models.heads import create_network
    from cxflax.train import optim
    from cxflax.train.steps import create_train_state, init_variables, make_train_step
    assert jax.device_count() == 8, jax.devices()
    c = base_config()
    c.model, c.optim.name, c.optim.learning_rate, c.schedule.name = "resnet10t", "sgd", 0.05, "constant"
    c.optim.weight_decay, c.batch_size, c.data.image_size = 1e-4, 16, 32
    c = finalize(c)
    model = create_network("resnet10t", num_outputs=1)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
                "label": rng.uniform(0, 100, 16).astype(np.float32)} for _ in range(4)]
    out = {}
    for n in (8, 1):
      mesh = parallel.make_mesh(jax.devices()[:n])
      variables = init_variables(model, (32, 32, 3), 0)
      tx, _ = optim.make_optimizer(c.optim, variables["params"], optax.constant_schedule)
      state = create_train_state(model, tx, variables, mesh)
      step = make_train_step(model, c, mesh)
      losses = []
      for b in batches:
        state, m = step(state, parallel.shard_batch(b, mesh))
        losses.append(float(m["loss"]))
      stats = jax.tree.leaves(state.batch_stats)
      # BatchNorm statistics must be the same on every device.
      same = all(np.array_equal(np.asarray(s.data), np.asarray(a.addressable_shards[0].data))
                 for a in stats for s in a.addressable_shards)
      placed = parallel.shard_batch(batches[0], mesh)["image"]
      shard_shapes = sorted({tuple(s.data.shape) for s in placed.addressable_shards})
      out[n] = {"losses": losses, "same_stats": same, "devices": len(state.params["head"]["fc"]["kernel"].devices()),
                "params": [np.asarray(x).ravel()[:50].tolist() for x in jax.tree.leaves(state.params)],
                "stats": [np.asarray(x).ravel()[:50].tolist() for x in stats], "shard_shapes": shard_shapes}
    print("RESULT" + json.dumps(out))
""")


def test_eight_devices_match_one_device():
  """The jit train step over an 8-device mesh gives the losses, parameters and BatchNorm
  statistics of one device on the same global batches."""
  proc = run_python(_SHARDING_CHECK, devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  eight, one = out["8"], out["1"]
  assert eight["devices"] == 8 and one["devices"] == 1
  assert eight["shard_shapes"] == [[2, 32, 32, 3]] and one["shard_shapes"] == [[16, 32, 32, 3]]
  assert eight["same_stats"]
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  assert eight["losses"][-1] < eight["losses"][0]
  for a, b in zip(eight["params"], one["params"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(eight["stats"], one["stats"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_tree_match_names_what_does_not_fit_and_fills_the_rest():
  from cxflax.trees import Match
  want = {"a": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)},
          "b": {"scale": np.ones(4, np.float32)}}
  got = {"a": {"kernel": np.ones((2, 3), np.float64), "bias": np.ones(5)}, "c": {"x": np.ones(1)}}
  m = Match(want, got)
  assert (m.missing, m.unexpected, m.wrong_shape) == (["b/scale"], ["c/x"], ["a/bias"])
  assert m.fresh == ["a/bias", "b/scale"] and m.shapes("a/bias") == ((5,), (3,))
  filled = m.filled()
  assert filled["a"]["kernel"].dtype == np.float32 and float(filled["a"]["kernel"].sum()) == 6
  assert float(filled["a"]["bias"].sum()) == 0 and filled["b"]["scale"].shape == (4,)
