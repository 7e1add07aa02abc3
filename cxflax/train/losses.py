"""Losses, each a mean over the valid examples of a batch (weights 0 mark padding)."""

from __future__ import annotations

import jax.numpy as jnp
import optax


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
  num_classes = logits.shape[-1]
  onehot = optax.smooth_labels(jnp.eye(num_classes)[labels], label_smoothing) if label_smoothing \
      else jnp.eye(num_classes)[labels]
  return _weighted_mean(optax.softmax_cross_entropy(logits, onehot), weights)


def compute_loss(config, outputs, labels, weights=None):
  """The loss config.loss names, on the network's outputs."""
  if config.loss == "smooth_l1":
    return smooth_l1(outputs[..., 0], labels, config.loss_beta, weights)
  if config.loss == "mse":
    return _weighted_mean((outputs[..., 0] - labels) ** 2, weights)
  if config.loss == "cross_entropy":
    return cross_entropy(outputs, labels, weights, config.label_smoothing)
  raise ValueError(f"unknown loss {config.loss!r}")
