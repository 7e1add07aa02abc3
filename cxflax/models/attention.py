"""Channel attention modules that plug into a residual block, as in timm (``create_attn``)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from cxflax.models.layers import Conv2d, Dtype, make_divisible


class SqueezeExcite(nn.Module):
  """timm's SEModule: global average → 1x1 conv (reduce) → ReLU → 1x1 conv → sigmoid gate."""
  rd_ratio: float = 1.0 / 16
  rd_divisor: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    rd = make_divisible(channels * self.rd_ratio, self.rd_divisor, round_limit=0.0)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(Conv2d(rd, 1, use_bias=True, dtype=self.dtype, name="fc1")(s))
    s = Conv2d(channels, 1, use_bias=True, dtype=self.dtype, name="fc2")(s)
    return x * nn.sigmoid(s)


class ChannelConv1d(nn.Module):
  """A bias-free 1-D convolution along the channel axis of (batch, channels), zero padded: timm's
  Conv1d(1, 1, k) of ECA (kernel kept in flax's (k, in, out) layout)."""
  kernel_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y):
    k, channels = self.kernel_size, y.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, 1, 1), jnp.float32)
    w = kernel[:, 0, 0].astype(self.dtype)
    y = jnp.pad(y, ((0, 0), ((k - 1) // 2, (k - 1) // 2)))
    return sum(w[j] * y[:, j:j + channels] for j in range(k))  # cross-correlation, as torch


class EfficientChannelAttention(nn.Module):
  """timm's EcaModule: a 1-D convolution across the pooled channels, its width set by the
  channel count (k = odd(|log2 C + beta| / gamma), at least 3), then a sigmoid gate."""
  gamma: float = 2.0
  beta: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    t = int(abs(math.log(x.shape[-1], 2) + self.beta) / self.gamma)
    k = max(t if t % 2 else t + 1, 3)
    y = ChannelConv1d(k, self.dtype, name="conv")(jnp.mean(x, axis=(1, 2)))
    return x * nn.sigmoid(y)[:, None, None, :].astype(x.dtype)


def make_attention(kind: str | None, dtype: Dtype, name: str = "se", **kwargs) -> nn.Module | None:
  """The attention module a block plugs in after its last norm: None, 'se' or 'eca'."""
  if not kind:
    return None
  if kind == "se":
    return SqueezeExcite(dtype=dtype, name=name, **kwargs)
  if kind == "eca":
    return EfficientChannelAttention(dtype=dtype, name=name, **kwargs)
  raise ValueError(f"unknown attention {kind!r}: use None, 'se' or 'eca'")
