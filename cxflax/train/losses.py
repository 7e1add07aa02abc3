"""The papers' losses, each a mean over the valid examples of a batch (weight 0 marks padding).

Network outputs are an array (regression: (B, 1); classification: (B, classes) logits;
embedding: (B, D)) or, for multi-output heads, a dict with 'prediction' and the extra outputs
('bins': the 101-way logits of seed 001's multi-task head).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxflax.errors import ConfigError
from cxflax.registry import Registry

# config.loss.name → fn(config.loss, outputs, labels, weights, class_alpha) → scalar; `fields`:
# the config.loss fields it reads. Which task may use which loss is the task's business
# (cxflax/train/tasks.py).
LOSSES: Registry[Callable[..., Any]] = Registry("loss", ConfigError, "config.loss.name")


def _weighted_mean(per_example, weights):
  if weights is None:
    return jnp.mean(per_example)
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def smooth_l1(pred, target, beta: float = 1.0, weights=None):
  """torch.nn.SmoothL1Loss: 0.5 d²/β where |d| < β, else |d| − β/2 (L1 when β = 0)."""
  d = jnp.abs(pred - target)
  per = d if beta == 0 else jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
  return _weighted_mean(per, weights)


def cross_entropy(logits, labels, weights=None, label_smoothing: float = 0.0):
  """Softmax cross-entropy with integer labels (and optional label smoothing)."""
  onehot = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  return _weighted_mean(optax.softmax_cross_entropy(logits, onehot), weights)


def focal(logits, labels, alpha, gamma: float, weights=None):
  """FLANNEL's focal loss: −Σ_m α_m y_m (1 − p_m)^γ log p_m with p = softmax(logits)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  logp_y = jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  p_y = jnp.exp(logp_y)
  per = -jnp.asarray(alpha, jnp.float32)[labels] * (1.0 - p_y) ** gamma * logp_y
  return _weighted_mean(per, weights)


def inverse_frequency(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Focal-loss α ∝ 1 / class count (normalised to sum to the class count), as FLANNEL's."""
  counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype(np.float64)
  inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
  return (inv * num_classes / inv.sum()).astype(np.float32)


def class_alpha(loss, labels: np.ndarray, class_names) -> np.ndarray | None:
  """The focal loss's per-class weights (loss: config.loss): loss.alpha, or the inverse
  frequencies of the training labels; None for the other losses."""
  if loss.name != "focal":
    return None
  if loss.alpha:
    alpha = np.asarray(loss.alpha, np.float32)
    if len(alpha) != len(class_names):
      raise ConfigError(f"config.loss.alpha has {len(alpha)} values for {len(class_names)} classes")
    return alpha
  return inverse_frequency(labels, len(class_names))


def label_distribution(target, num_bins: int = 101):
  """Seed 001's target distribution around the rounded percentage p: 0.6 at p, 0.15 at p ± 1,
  0.05 at p ± 2; mass that would fall outside 0..100 is dropped and the rest renormalised."""
  p = jnp.clip(jnp.round(target), 0, num_bins - 1).astype(jnp.int32)
  bins = jnp.arange(num_bins)
  d = jnp.abs(bins[None, :] - p[:, None])
  mass = jnp.where(d == 0, 0.6, jnp.where(d == 1, 0.15, jnp.where(d == 2, 0.05, 0.0)))
  return mass / jnp.sum(mass, axis=-1, keepdims=True)


def expectation(bin_logits):
  """Σ_i i · softmax(logits)_i: the expected percentage of a 101-way distribution."""
  probs = jax.nn.softmax(bin_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(probs * jnp.arange(bin_logits.shape[-1], dtype=jnp.float32), axis=-1)


def kl_to_label_distribution(bin_logits, target, weights=None):
  """KL(q ‖ softmax(logits)) with q seed 001's label distribution around the target."""
  q = label_distribution(target, bin_logits.shape[-1])
  logp = jax.nn.log_softmax(bin_logits.astype(jnp.float32), axis=-1)
  per = jnp.sum(jnp.where(q > 0, q * (jnp.log(jnp.where(q > 0, q, 1.0)) - logp), 0.0), axis=-1)
  return _weighted_mean(per, weights)


def triplet(embeddings, labels, margin: float = 1.0, weights=None, mining: str = "batch_hard"):
  """Triplet loss max(0, d(a, p) − d(a, n) + margin) over the triplets of a batch: the positives
  share the anchor's class, the negatives do not. 'batch_hard' takes each anchor's farthest
  positive and nearest negative; 'batch_all' averages every triplet with a positive loss."""
  e = embeddings.astype(jnp.float32)
  sq = jnp.sum(e * e, axis=-1)
  dist = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * e @ e.T, 1e-12))
  valid = jnp.ones(labels.shape, bool) if weights is None else weights > 0
  same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
  eye = jnp.eye(labels.shape[0], dtype=bool)
  pos, neg = same & ~eye, ~same & valid[:, None] & valid[None, :]
  if mining == "batch_hard":
    hardest_pos = jnp.max(jnp.where(pos, dist, -jnp.inf), axis=1)
    hardest_neg = jnp.min(jnp.where(neg, dist, jnp.inf), axis=1)
    ok = jnp.isfinite(hardest_pos) & jnp.isfinite(hardest_neg) & valid
    per = jnp.where(ok, jnp.maximum(hardest_pos - hardest_neg + margin, 0.0), 0.0)
    return jnp.sum(per) / jnp.maximum(jnp.sum(ok), 1.0)
  if mining == "batch_all":
    t = dist[:, :, None] - dist[:, None, :] + margin  # anchor, positive, negative
    mask = pos[:, :, None] & neg[:, None, :]
    losses = jnp.where(mask, jnp.maximum(t, 0.0), 0.0)
    return jnp.sum(losses) / jnp.maximum(jnp.sum(mask & (t > 0)), 1.0)
  raise ConfigError(f"unknown triplet mining {mining!r}: use batch_hard or batch_all")


def prediction(outputs) -> Any:
  """The output evaluation uses: 'prediction' of a dict, else the array itself."""
  return outputs["prediction"] if isinstance(outputs, dict) else outputs


def compute_loss(loss, outputs, labels, weights=None, class_alpha=None):
  """The loss `loss.name` names (loss: config.loss), with loss's fields, on the network's outputs."""
  return LOSSES.get(loss.name)(loss, outputs, labels, weights, class_alpha)


@LOSSES.register("smooth_l1", fields=("beta",))
def _smooth_l1_loss(loss, outputs, labels, weights, class_alpha):
  return smooth_l1(prediction(outputs)[..., 0], labels, loss.beta, weights)


@LOSSES.register("mse", fields=())
def _mse_loss(loss, outputs, labels, weights, class_alpha):
  return _weighted_mean((prediction(outputs)[..., 0] - labels) ** 2, weights)


def _multitask(loss, outputs, labels, weights):
  """Seed 001, approach 2: SmoothL1 of the expectation of the 101-way distribution plus
  SmoothL1 of the regressed value."""
  if not isinstance(outputs, dict) or "bins" not in outputs:
    raise ConfigError(f"loss {loss.name!r} needs the multi-task head (config.head='multitask')")
  beta = loss.beta
  return (smooth_l1(expectation(outputs["bins"]), labels, beta, weights)
          + smooth_l1(outputs["prediction"][..., 0], labels, beta, weights))


@LOSSES.register("multitask", fields=("beta",))
def _multitask_loss(loss, outputs, labels, weights, class_alpha):
  return _multitask(loss, outputs, labels, weights)


@LOSSES.register("multitask_kl", fields=("beta", "kl_weight"))
def _multitask_kl_loss(loss, outputs, labels, weights, class_alpha):
  """Seed 001, approach 3: approach 2 plus the KL term."""
  return (_multitask(loss, outputs, labels, weights)
          + loss.kl_weight * kl_to_label_distribution(outputs["bins"], labels, weights))


@LOSSES.register("cross_entropy", fields=("label_smoothing",))
def _cross_entropy_loss(loss, outputs, labels, weights, class_alpha):
  return cross_entropy(prediction(outputs), labels, weights, loss.label_smoothing)


@LOSSES.register("focal", fields=("gamma", "alpha"))
def _focal_loss(loss, outputs, labels, weights, class_alpha):
  if class_alpha is None:
    raise ConfigError("focal loss needs class weights (alpha)")
  return focal(prediction(outputs), labels, class_alpha, loss.gamma, weights)


@LOSSES.register("triplet", fields=("margin", "mining"))
def _triplet_loss(loss, outputs, labels, weights, class_alpha):
  return triplet(prediction(outputs), labels, loss.margin, weights, loss.mining)
