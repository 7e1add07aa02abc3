"""Building blocks shared by the backbones, with PyTorch's (and so timm's) padding and defaults.

Parameter names follow flax conventions (kernel, bias, scale, mean, var); ``convert.py`` maps
timm state dicts onto them. Every module computes in ``dtype`` (float32 or bfloat16) and keeps its
parameters in float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# timm initialises convolutions with kaiming-normal (fan_out, ReLU gain); so do we, which matters
# only when training from scratch (loaded weights overwrite it).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def torch_padding(kernel: int, stride: int = 1, dilation: int = 1) -> int:
  """The symmetric padding timm's ``get_padding`` gives a convolution."""
  return ((stride - 1) + dilation * (kernel - 1)) // 2


class Conv2d(nn.Module):
  """A 2-D convolution padded like torch.nn.Conv2d (symmetric, explicit), NHWC."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int | None = None  # None: timm's get_padding
  dilation: int = 1
  groups: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Callable = conv_init

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    pad = torch_padding(k, self.stride, self.dilation) if self.padding is None else self.padding
    if x.shape[-1] % self.groups or self.features % self.groups:
      raise ValueError(f"Conv2d: {x.shape[-1]} -> {self.features} channels not divisible by "
                       f"{self.groups} groups")
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1] // self.groups, self.features),
                        jnp.float32)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad, self.dilation,
               self.groups)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y


def conv2d(x, kernel, stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1):
  """Cross-correlation of NHWC `x` with an HWIO kernel, symmetric zero padding (torch's Conv2d).

  Two cases are computed as matrix products, which XLA's CPU backend runs far faster than its
  convolution (same arithmetic, summed in another order; see benchmarks/NOTES.md):
  1x1 convolutions (a product over channels, strided by slicing), and small feature maps whose
  output is at most 2 px on a side (a sum of one product per kernel tap), where XLA's CPU
  convolution degrades by two orders of magnitude.
  """
  k = kernel.shape[0]
  if groups == 1 and k == 1 and padding == 0:
    if stride > 1:
      x = x[:, ::stride, ::stride, :]
    return jnp.dot(x, kernel[0, 0])
  out_h = (x.shape[1] + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  out_w = (x.shape[2] + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  if groups == 1 and max(out_h, out_w) <= 2:
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    y = 0
    for i in range(k):
      for j in range(kernel.shape[1]):
        tap = xp[:, i * dilation:i * dilation + stride * (out_h - 1) + 1:stride,
                 j * dilation:j * dilation + stride * (out_w - 1) + 1:stride, :]
        y = y + jnp.dot(tap, kernel[i, j])
    return y
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


def batch_norm(train: bool, dtype: Dtype, name: str | None = None, zero_init: bool = False,
               epsilon: float = 1e-5) -> nn.BatchNorm:
  """BatchNorm2d with PyTorch's defaults (momentum 0.1 in torch's convention, eps 1e-5).

  Under jit over a sharded batch, the batch statistics are global: every device normalises with
  the same mean and variance, as one device would on the whole batch.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=epsilon, dtype=dtype,
                      scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
                      name=name)


class DropPath(nn.Module):
  """Stochastic depth: drops whole residual branches per example while training."""
  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def max_pool(x, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False):
  """torch.nn.MaxPool2d: padding with -inf; ceil_mode adds a partial last window."""
  pads = [_pool_pads(n, kernel, stride, padding, ceil_mode) for n in x.shape[1:3]]
  return nn.max_pool(x, (kernel, kernel), (stride, stride), padding=pads)


def avg_pool(x, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False,
             count_include_pad: bool = True):
  """torch.nn.AvgPool2d. ceil_mode's partial last windows average only the pixels they cover."""
  if ceil_mode and padding and count_include_pad:
    raise ValueError("avg_pool: ceil_mode with counted padding is not supported (no timm model uses it)")
  pads = [_pool_pads(n, kernel, stride, padding, ceil_mode) for n in x.shape[1:3]]
  return nn.avg_pool(x, (kernel, kernel), (stride, stride), padding=pads,
                     count_include_pad=count_include_pad and not ceil_mode)


def _pool_pads(n: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> tuple[int, int]:
  """(low, high) padding reproducing torch's output size for a pooling window."""
  span = n + 2 * padding - kernel
  out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
  if ceil_mode and (out - 1) * stride >= n + padding:  # torch: the last window must start inside
    out -= 1
  high = max(0, (out - 1) * stride + kernel - n - padding)
  return padding, high


def global_pool(x, pool_type: str = "avg"):
  """Pools NHWC to NC: 'avg', 'max', 'avgmax' (mean of the two) or 'catavgmax' (concatenated)."""
  if pool_type == "avg":
    return jnp.mean(x, axis=(1, 2))
  if pool_type == "max":
    return jnp.max(x, axis=(1, 2))
  if pool_type == "avgmax":
    return 0.5 * (jnp.mean(x, axis=(1, 2)) + jnp.max(x, axis=(1, 2)))
  if pool_type == "catavgmax":
    return jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], axis=-1)
  raise ValueError(f"unknown global pool type {pool_type!r}: use avg, max, avgmax or catavgmax")


def classifier(x, *, num_classes: int, pool_type: str, drop_rate: float, train: bool,
               dtype: Dtype, fc_name: str = "fc"):
  """timm's classifier head, called inside a model's compact method so that the linear layer is
  named like timm's ('fc', 'classifier', ...). num_classes=0 returns the pooled embedding and
  pool_type='' the unpooled feature map, as timm's reset_classifier(0, '') does."""
  if not pool_type:
    return x
  x = global_pool(x, pool_type)
  if num_classes <= 0:
    return x
  x = nn.Dropout(drop_rate, deterministic=not train)(x)
  return nn.Dense(num_classes, dtype=dtype, name=fc_name)(x)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
  """timm's channel rounding: to a multiple of divisor, never more than (1 - round_limit) below v."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < round_limit * v:
    new_v += divisor
  return new_v
