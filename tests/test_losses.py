"""The papers' losses against values computed by hand or by brute force."""

import itertools

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxflax.train import losses


def _loss(**kw):
  """A config.loss with kw set."""
  loss = ml_collections.ConfigDict(dict(name="smooth_l1", beta=1.0, label_smoothing=0.0, kl_weight=1.0,
                                        gamma=2.0, margin=0.5, mining="batch_hard"))
  loss.update(kw)
  return loss


def test_expectation_and_label_distribution():
  logits = jnp.full((1, 101), -1e9).at[0, 37].set(0.0)
  assert float(losses.expectation(logits)[0]) == pytest.approx(37.0)
  q = np.asarray(losses.label_distribution(jnp.array([50.2, 0.0, 99.6])))
  np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(q[0, 48:53], [0.05, 0.15, 0.6, 0.15, 0.05], rtol=1e-6)
  np.testing.assert_allclose(q[1, :3], np.array([0.6, 0.15, 0.05]) / 0.8, rtol=1e-6)  # mass below 0 dropped
  assert np.argmax(q[2]) == 100


def test_kl_to_label_distribution():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 101)).astype(np.float32)
  target = np.array([10.0, 55.0, 3.0], np.float32)
  q = np.asarray(losses.label_distribution(jnp.asarray(target)))
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  expected = np.mean([np.sum(q[i][q[i] > 0] * (np.log(q[i][q[i] > 0]) - logp[i][q[i] > 0])) for i in range(3)])
  assert float(losses.kl_to_label_distribution(jnp.asarray(logits), jnp.asarray(target))) == pytest.approx(expected, rel=1e-5)


def test_multitask_losses_add_up():
  rng = np.random.default_rng(1)
  bins = jnp.asarray(rng.normal(size=(4, 101)), jnp.float32)
  value = jnp.asarray(rng.uniform(0, 100, (4, 1)), jnp.float32)
  y = jnp.asarray([3.0, 40.0, 77.0, 0.0])
  out = {"prediction": value, "bins": bins}
  two = losses.smooth_l1(losses.expectation(bins), y) + losses.smooth_l1(value[:, 0], y)
  assert float(losses.compute_loss(_loss(name="multitask"), out, y)) == pytest.approx(float(two), rel=1e-6)
  three = two + 0.5 * losses.kl_to_label_distribution(bins, y)
  got = losses.compute_loss(_loss(name="multitask_kl", kl_weight=0.5), out, y)
  assert float(got) == pytest.approx(float(three), rel=1e-6)


def test_focal_loss_by_hand():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
  labels = jnp.array([1, 2])
  alpha = np.array([0.5, 2.0, 1.0], np.float32)
  p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(1, keepdims=True)
  expected = np.mean([-alpha[1] * (1 - p[0, 1]) ** 3 * np.log(p[0, 1]),
                      -alpha[2] * (1 - p[1, 2]) ** 3 * np.log(p[1, 2])])
  assert float(losses.focal(logits, labels, alpha, 3.0)) == pytest.approx(expected, rel=1e-5)
  # γ = 0, α = 1 is cross-entropy
  assert float(losses.focal(logits, labels, np.ones(3), 0.0)) == pytest.approx(
      float(losses.cross_entropy(logits, labels)), rel=1e-6)
  w = losses.inverse_frequency(np.array([0, 0, 0, 1, 2, 2]), 3)
  np.testing.assert_allclose(w / w[0], [1.0, 3.0, 1.5], rtol=1e-6)
  assert w.sum() == pytest.approx(3.0)


def _brute_triplets(e, y, margin):
  d = np.linalg.norm(e[:, None] - e[None], axis=-1)
  all_losses, hard = [], []
  for a in range(len(y)):
    pos = [p for p in range(len(y)) if y[p] == y[a] and p != a]
    neg = [n for n in range(len(y)) if y[n] != y[a]]
    for p, n in itertools.product(pos, neg):
      all_losses.append(max(d[a, p] - d[a, n] + margin, 0.0))
    if pos and neg:
      hard.append(max(max(d[a, p] for p in pos) - min(d[a, n] for n in neg) + margin, 0.0))
  positive = [v for v in all_losses if v > 0]
  return np.mean(hard), (np.sum(positive) / max(len(positive), 1))


def test_triplet_losses_match_brute_force():
  rng = np.random.default_rng(2)
  e = rng.normal(size=(7, 4)).astype(np.float32)
  y = np.array([0, 0, 1, 1, 1, 2, 0])
  hard, batch_all = _brute_triplets(e, y, 0.5)
  assert float(losses.triplet(jnp.asarray(e), jnp.asarray(y), 0.5, mining="batch_hard")) == pytest.approx(hard, rel=1e-4)
  assert float(losses.triplet(jnp.asarray(e), jnp.asarray(y), 0.5, mining="batch_all")) == pytest.approx(batch_all, rel=1e-4)
  # Padding (weight 0) leaves the loss of the valid examples unchanged.
  padded = losses.triplet(jnp.asarray(np.vstack([e, e[:2]])), jnp.asarray(np.concatenate([y, [2, 1]])), 0.5,
                          weights=jnp.asarray([1.0] * 7 + [0.0, 0.0]))
  assert float(padded) == pytest.approx(hard, rel=1e-4)


def test_loss_needs_its_head():
  from cxflax.errors import ConfigError
  with pytest.raises(ConfigError, match="multi-task head"):
    losses.compute_loss(_loss(name="multitask"), jnp.zeros((2, 1)), jnp.zeros(2))
