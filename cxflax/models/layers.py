"""Building blocks shared by the backbones, with PyTorch's (and so timm's) padding and defaults.

Parameter names follow flax conventions (kernel, bias, scale, mean, var); ``convert.py`` maps
timm state dicts onto them. Every module computes in ``dtype`` (float32 or bfloat16) and keeps its
parameters in float32.

Convolutions, training-mode BatchNorm, ReLU and pooling are plain flax/XLA here; where
``xla_cpu.enabled()`` (``config.cpu_kernels``: by default on the CPU backend) they use the
kernels of ``cxflax.models.xla_cpu`` instead, which compute the same functions faster on XLA's
CPU backend. The switch is read when a function is traced.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxflax.models import xla_cpu

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
  """A 2-D convolution padded like torch.nn.Conv2d (symmetric, explicit), NHWC.

  kernel_size and padding are an int or an (h, w) pair; padding None is timm's default.
  """
  features: int
  kernel_size: int | tuple[int, int] = 1
  stride: int = 1
  padding: int | tuple[int, int] | None = None
  dilation: int = 1
  groups: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Callable = conv_init

  @nn.compact
  def __call__(self, x):
    kernel, padding = self.kernel_and_padding(x)
    y = conv2d(x.astype(self.dtype), kernel, self.stride, padding, self.dilation, self.groups)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y

  def kernel_and_padding(self, x) -> tuple[Any, tuple[int, int]]:
    """The kernel parameter (HWIO, created on first use) in the compute dtype, and the (h, w)
    padding; for subclasses that compute the convolution otherwise."""
    kh, kw = pair(self.kernel_size)
    if self.padding is None:
      pad = (torch_padding(kh, self.stride, self.dilation), torch_padding(kw, self.stride, self.dilation))
    else:
      pad = pair(self.padding)
    if x.shape[-1] % self.groups or self.features % self.groups:
      raise ValueError(f"Conv2d: {x.shape[-1]} -> {self.features} channels not divisible by "
                       f"{self.groups} groups")
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1] // self.groups, self.features),
                        jnp.float32)
    return kernel.astype(self.dtype), pad


def conv2d(x, kernel, stride: int = 1, padding: int | tuple[int, int] = 0, dilation: int = 1,
           groups: int = 1):
  """Cross-correlation of NHWC `x` with an HWIO kernel, symmetric zero padding (torch's Conv2d):
  XLA's convolution, or where xla_cpu.enabled() its CPU kernels (xla_cpu.conv2d)."""
  ph, pw = pair(padding)
  if xla_cpu.enabled():
    return xla_cpu.conv2d(x, kernel, stride, (ph, pw), dilation, groups)
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((ph, ph), (pw, pw)), rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over the last axis, exactly: batch statistics by two passes in float32
  (or wider), the biased variance to normalise and the unbiased one in the running average
  (flax's BatchNorm averages the biased one, which differs by n/(n-1) — a lot for the 1x1 maps of
  attention modules). Variables are flax's: params scale/bias, batch_stats mean/var.

  Under jit over a batch sharded on the mesh, the means are over the global batch, so every
  device normalises with the same statistics and keeps the same running averages.
  """
  use_running_average: bool
  momentum: float = 0.1  # torch's convention: weight of the new batch
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    ra_mean, ra_var, scale, bias = self.variables_for(x.shape[-1])
    if self.use_running_average:
      return normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, self.dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.dtype)
    self.update_averages(ra_mean, ra_var, mean, var, math.prod(x.shape[:-1]))
    return y

  def variables_for(self, channels: int):
    """The running mean and variance (variables) and the scale and bias (float32 parameters) of
    `channels` channels, created on first use."""
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32))
    scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    return ra_mean, ra_var, scale, bias

  def update_averages(self, ra_mean, ra_var, mean, var, n: int):
    """torch's running averages, from batch statistics over n values per channel (the biased
    variance `var`, averaged unbiased); not while initialising."""
    if self.is_initializing():
      return
    m = self.momentum
    ra_mean.value = (1 - m) * ra_mean.value + m * mean.astype(ra_mean.value.dtype)
    ra_var.value = (1 - m) * ra_var.value + m * (var * n / max(n - 1, 1)).astype(ra_var.value.dtype)

  def folded(self, x):
    """Evaluation once the BatchNorm is folded into the convolution before it (models/fold.py):
    only the bias is left."""
    return (x + self.get_variable("params", "bias").astype(self.dtype)).astype(self.dtype)


def _batch_stats(x):
  """Per-channel mean and biased variance over all but the last axis, by two passes (float32)."""
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, axes)
  return mean, jnp.mean(jnp.square(xf - mean), axes)


def normalize(x, mean, var, scale, bias, epsilon: float, dtype):
  """(x - mean) / sqrt(var + epsilon) · scale + bias, per channel, computed in `dtype`."""
  mul = scale * jax.lax.rsqrt(var + epsilon)
  return ((x - mean.astype(dtype)) * mul.astype(dtype) + bias.astype(dtype)).astype(dtype)


def _batch_norm_forward(x, scale, bias, epsilon: float, dtype):
  mean, var = _batch_stats(x)
  return normalize(x, mean, var, scale, bias, epsilon, dtype), mean, var


def batch_norm_train(x, scale, bias, epsilon: float, dtype):
  """BatchNorm with batch statistics → (y, mean, var): differentiated by autodiff, or where
  xla_cpu.enabled() in closed form (xla_cpu.batch_norm_train)."""
  if xla_cpu.enabled():
    return xla_cpu.batch_norm_train(_batch_norm_forward, x, scale, bias, epsilon, jnp.dtype(dtype))
  return _batch_norm_forward(x, scale, bias, epsilon, dtype)


def batch_norm(train: bool, dtype: Dtype, name: str | None = None, zero_init: bool = False,
               epsilon: float = 1e-5) -> BatchNorm:
  """A BatchNorm in training (batch statistics) or evaluation (running statistics) mode."""
  return BatchNorm(use_running_average=not train, epsilon=epsilon, dtype=dtype,
                   scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones, name=name)


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


def relu(x):
  """max(x, 0): jax.nn.relu, or where xla_cpu.enabled() the same function as a select
  (xla_cpu.relu). NaN propagates, as in torch; the derivative is 0 at x <= 0."""
  return xla_cpu.relu(x) if xla_cpu.enabled() else jax.nn.relu(x)


ACTIVATIONS = {"relu": relu, "silu": nn.silu, "": None, None: None}


class ConvNormAct(nn.Module):
  """timm's ConvNormAct: 'conv' (no bias), 'bn' (BatchNorm, timm's BatchNormAct2d) and an
  optional activation (relu or silu)."""
  features: int
  kernel_size: int | tuple[int, int] = 1
  stride: int = 1
  padding: int | tuple[int, int] | None = None
  dilation: int = 1
  groups: int = 1
  act: str | None = "relu"
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv2d(self.features, self.kernel_size, self.stride, self.padding, self.dilation,
               self.groups, dtype=self.dtype, name="conv")(x)
    x = batch_norm(train, self.dtype, name="bn", epsilon=self.epsilon)(x)
    fn = ACTIVATIONS[self.act]
    return fn(x) if fn else x


def max_pool(x, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False):
  """torch.nn.MaxPool2d: padding with -inf; ceil_mode adds a partial last window. The gradient
  goes to the first maximum of each window, as torch's."""
  pads = tuple(_pool_pads(n, kernel, stride, padding, ceil_mode) for n in x.shape[1:3])
  if xla_cpu.enabled():
    return xla_cpu.max_pool(x, kernel, stride, pads)
  return nn.max_pool(x, (kernel, kernel), (stride, stride), padding=pads)


def avg_pool(x, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False,
             count_include_pad: bool = True):
  """torch.nn.AvgPool2d. ceil_mode's partial last windows average only the pixels they cover."""
  if ceil_mode and padding and count_include_pad:
    raise ValueError("avg_pool: ceil_mode with counted padding is not supported (no timm model uses it)")
  pads = tuple(_pool_pads(n, kernel, stride, padding, ceil_mode) for n in x.shape[1:3])
  count_include_pad = count_include_pad and not ceil_mode
  if xla_cpu.enabled():
    return xla_cpu.avg_pool(x, kernel, stride, pads, count_include_pad)
  # flax divides by a float32 count without count_include_pad, which would promote bfloat16
  # activations (and their cotangents) to float32.
  return nn.avg_pool(x, (kernel, kernel), (stride, stride), padding=pads,
                     count_include_pad=count_include_pad).astype(x.dtype)


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
