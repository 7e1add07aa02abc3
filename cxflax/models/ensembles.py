"""Learned ensembles of trained networks: seed 000's average and SE-weighted ensembles and seed
003's FLANNEL neural-weight ensemble. Members are frozen (their parameters get no updates, see
config.optim.freeze) and always run in inference mode (BatchNorm on running statistics).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxflax.models.layers import Dtype, relu


class ModelSE(nn.Module):
  """Seed 000's squeeze-and-excitation over models: on member outputs (B, F, M), squeeze by the
  mean over F, excite with Linear(M → M/r) → ReLU → Linear(M/r → M) (no biases) → sigmoid, and
  scale each member's output by its weight."""
  reduction: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, stacked):
    m = stacked.shape[-1]
    s = jnp.mean(stacked, axis=1)
    s = relu(nn.Dense(max(1, m // self.reduction), use_bias=False, dtype=self.dtype, name="fc1")(s))
    w = nn.sigmoid(nn.Dense(m, use_bias=False, dtype=self.dtype, name="fc2")(s))
    return stacked * w[:, None, :]


class FeatureEnsemble(nn.Module):
  """Seed 000: the members' outputs stacked (B, F, M), optionally weighted by ModelSE, averaged
  over members; the Network's head (500 → 250 → 1) goes on top."""
  members: Sequence[nn.Module]
  se: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    outs = []
    for m in self.members:
      y = m(x, train=False)
      outs.append(jnp.mean(y, axis=(1, 2)) if y.ndim == 4 else y)
    stacked = jnp.stack(outs, axis=-1)
    if self.se:
      stacked = ModelSE(dtype=self.dtype, name="se")(stacked)
    return jnp.mean(stacked, axis=-1)


class NeuralWeightEnsemble(nn.Module):
  """FLANNEL (seed 003): the members' class probabilities concatenated (B, M·C), their outer
  product (B, (M·C)²) → Linear → tanh ('novel' variant) or softmax → one weight per member;
  the output Σ_i w_i p_i (B, C) is read as logits by the loss, as in the authors' code."""
  members: Sequence[nn.Module]
  activation: str = "tanh"

  @nn.compact
  def __call__(self, x, train: bool = False):
    probs = [jax.nn.softmax(jnp.asarray(m(x, train=False), jnp.float32), axis=-1) for m in self.members]
    z = jnp.stack(probs, axis=1)  # (B, M, C)
    flat = z.reshape(z.shape[0], -1)
    outer = (flat[:, :, None] * flat[:, None, :]).reshape(z.shape[0], -1)
    w = nn.Dense(len(self.members), name="ew1")(outer)
    if self.activation == "tanh":
      w = jnp.tanh(w)
    elif self.activation == "softmax":
      w = jax.nn.softmax(w, axis=-1)
    else:
      raise ValueError(f"unknown FLANNEL weight activation {self.activation!r}: tanh or softmax")
    return jnp.sum(w[:, :, None] * z, axis=1)
