"""Building blocks shared by the backbones, with PyTorch's (and so timm's) padding and defaults.

Parameter names follow flax conventions (kernel, bias, scale, mean, var); ``convert.py`` maps
timm state dicts onto them. Every module computes in ``dtype`` (float32 or bfloat16) and keeps its
parameters in float32.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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

  kernel_size and padding are an int or an (h, w) pair; padding None is timm's default. With
  split_output, a grouped convolution returns its groups' outputs as a tuple of arrays (channel
  parts, see conv2d) instead of concatenating them.
  """
  features: int
  kernel_size: int | tuple[int, int] = 1
  stride: int = 1
  padding: int | tuple[int, int] | None = None
  dilation: int = 1
  groups: int = 1
  use_bias: bool = False
  split_output: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Callable = conv_init

  @nn.compact
  def __call__(self, x):
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
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad, self.dilation,
               self.groups, split_output=self.split_output)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
      y = map_parts(lambda part, b: part + b, y, bias)
    return y


def map_parts(f, x, *per_channel):
  """f(x, *per_channel) for an array x, or part by part for channel parts (a tuple of arrays
  whose concatenation over the last axis is the tensor), each part with its slice of the
  per-channel vectors."""
  if not isinstance(x, tuple):
    return f(x, *per_channel)
  out, start = [], 0
  for part in x:
    stop = start + part.shape[-1]
    out.append(f(part, *(v[start:stop] for v in per_channel)))
    start = stop
  return tuple(out)


# Grouped convolutions with at most this many groups run as one convolution per group.
_SPLIT_GROUPS_UP_TO = 8


def conv2d(x, kernel, stride: int = 1, padding: int | tuple[int, int] = 0, dilation: int = 1,
           groups: int = 1, split_output: bool = False):
  """Cross-correlation of NHWC `x` with an HWIO kernel, symmetric zero padding (torch's Conv2d).

  With split_output (groups > 1) the result is a tuple of the groups' outputs ("channel
  parts"): a caller that splits them again anyway (ResNeSt's radix splits) saves the
  concatenation, the slices and their gradients (resnest50d: eval +7-13%, train step -2%;
  benchmarks/NOTES.md, attempt 13).

  Some cases avoid XLA's CPU convolution where it is far slower than the same arithmetic
  written otherwise (summed in another order; see benchmarks/NOTES.md): 1x1 convolutions are a
  product over channels (strided by slicing); outputs of at most 2 px on a side are one product
  per kernel tap; convolutions with a few groups (ResNeSt's radix-2 split attention) run group
  by group; large ones on one CPU take their kernel gradient image by image.
  """
  kh, kw = kernel.shape[:2]
  ph, pw = pair(padding)
  group_by_group = 1 < groups <= _SPLIT_GROUPS_UP_TO and groups < x.shape[-1]
  if split_output:
    if groups < 2:
      raise ValueError("conv2d: split_output needs a grouped convolution")
    if not group_by_group:  # XLA's grouped convolution, its output split
      return tuple(jnp.split(conv2d(x, kernel, stride, padding, dilation, groups), groups, axis=-1))
  if group_by_group:
    xs = jnp.split(x, groups, axis=-1)
    ks = jnp.split(kernel, groups, axis=-1)
    parts = tuple(conv2d(a, k, stride, (ph, pw), dilation) for a, k in zip(xs, ks))
    return parts if split_output else jnp.concatenate(parts, axis=-1)
  if groups == 1 and kh == kw == 1 and ph == pw == 0:
    if stride > 1:
      x = x[:, ::stride, ::stride, :]
    return _channel_product(x, kernel[0, 0])
  out_h = (x.shape[1] + 2 * ph - dilation * (kh - 1) - 1) // stride + 1
  out_w = (x.shape[2] + 2 * pw - dilation * (kw - 1) - 1) // stride + 1
  if groups == 1 and max(out_h, out_w) <= 2:
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    y = 0
    for i in range(kh):
      for j in range(kw):
        tap = xp[:, i * dilation:i * dilation + stride * (out_h - 1) + 1:stride,
                 j * dilation:j * dilation + stride * (out_w - 1) + 1:stride, :]
        y = y + _channel_product(tap, kernel[i, j])
    return y
  if (groups == 1 and dilation == 1 and out_h * out_w >= _IMAGE_BY_IMAGE_FROM_PIXELS
      and _image_by_image_applies()):
    return _conv_image_by_image_kernel_gradient(x, kernel, stride, ((ph, ph), (pw, pw)))
  return _xla_conv(x, kernel, stride, ((ph, ph), (pw, pw)), dilation, groups)


def _xla_conv(x, kernel, stride: int, pads, dilation: int = 1, groups: int = 1):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), pads, rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


# Convolutions with at least this many output pixels take their kernel gradient image by image
# (below), where that measured faster: 2-4x at 56-112 px, ~1.3x at 28 px, even at 14 px.
_IMAGE_BY_IMAGE_FROM_PIXELS = 28 * 28


_image_by_image_enabled = True


def _image_by_image_applies() -> bool:
  """Whether the image-by-image kernel gradient is used: a CPU-only workaround (cuDNN computes
  these gradients well), on one device only (a scan over the batch axis would make the SPMD
  partitioner gather a sharded batch), and not inside `xla_kernel_gradients()`."""
  return _image_by_image_enabled and jax.default_backend() == "cpu" and jax.device_count() == 1


@contextlib.contextmanager
def xla_kernel_gradients():
  """Traces convolutions with XLA's own kernel gradients. For counting FLOPs: XLA's cost
  analysis counts the body of the image-by-image scan once, not once per image."""
  global _image_by_image_enabled
  previous, _image_by_image_enabled = _image_by_image_enabled, False
  try:
    yield
  finally:
    _image_by_image_enabled = previous


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_image_by_image_kernel_gradient(x, kernel, stride: int, pads):
  """XLA's convolution, and its input gradient; only the kernel gradient is computed otherwise.

  XLA's CPU backend computes the kernel gradient of a convolution over large, shallow maps at
  10-25 GFLOP/s (ResNeSt's 112-px stem: ~1 s of a 9 s step): it streams the whole batch through
  memory once per kernel tap. Here, one image at a time (in cache), each tap's contribution is
  one matrix product of a contiguous slice of the flattened padded image with the output
  gradient (benchmarks/NOTES.md, attempt 8). Same sums, in another order.
  """
  return _xla_conv(x, kernel, stride, pads)


def _image_by_image_fwd(x, kernel, stride, pads):
  return _xla_conv(x, kernel, stride, pads), (x, kernel)


def _image_by_image_bwd(stride, pads, residuals, g):
  x, kernel = residuals
  _, input_gradient = jax.vjp(lambda x: _xla_conv(x, kernel, stride, pads), x)
  return input_gradient(g)[0], _kernel_gradient_by_image(x, g, kernel.shape, stride, pads)


_conv_image_by_image_kernel_gradient.defvjp(_image_by_image_fwd, _image_by_image_bwd)


def _kernel_gradient_by_image(x, g, kernel_shape, stride: int, pads):
  """d(loss)/d(kernel) of a stride-`stride` convolution from its input and output gradient.

  The padded input is split into its stride x stride phases and each phase flattened with rows
  of width wq, the output gradient padded to the same row width with zeros. Tap (i, j) then
  reads phase (i mod s, j mod s) from flat offset (i // s) * wq + j // s on: one contiguous
  slice, multiplied by the output gradient (the zero columns drop the wrapped-around pixels).
  """
  kh, kw, c, o = kernel_shape
  s = stride
  b, oh, ow, _ = g.shape
  hq, wq = oh + (kh - 1) // s + 1, ow + (kw - 1) // s  # one spare row keeps every slice in range
  (top, _), (left, _) = pads
  xp = jnp.pad(x, ((0, 0), (top, max(0, s * hq - x.shape[1] - top)),
                   (left, max(0, s * wq - x.shape[2] - left)), (0, 0)))[:, :s * hq, :s * wq]
  phases = [xp[:, a::s, e::s].reshape(b, hq * wq, c) for a in range(s) for e in range(s)]
  gp = jnp.pad(g, ((0, 0), (0, 0), (0, wq - ow), (0, 0))).reshape(b, oh * wq, o)
  length = oh * wq
  taps = [(i % s * s + j % s, i // s * wq + j // s) for i in range(kh) for j in range(kw)]

  def add_image(total, image):
    image_phases, image_g = image
    per_tap = [jax.lax.dot_general(image_phases[p][start:start + length], image_g,
                                   (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
               for p, start in taps]
    return total + jnp.stack(per_tap), None

  total, _ = jax.lax.scan(add_image, jnp.zeros((kh * kw, c, o), jnp.float32), (phases, gp))
  return total.reshape(kernel_shape).astype(g.dtype)


def _channel_product(x, matrix):
  """x (..., C) @ matrix (C, O) as one 2-D product: the gradients of a product over a 4-D
  array are 4-D contractions that XLA's CPU backend runs 1.5-3.5x slower than the 2-D matrix
  products they become after the reshape (benchmarks/NOTES.md, attempt 5)."""
  y = jnp.dot(x.reshape(-1, x.shape[-1]), matrix)
  return y.reshape(x.shape[:-1] + (matrix.shape[-1],))


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over the last axis, exactly: batch statistics by two passes, the
  biased variance to normalise and the unbiased one in the running average (flax's BatchNorm
  averages the biased one, which differs by n/(n-1) — a lot for the 1x1 maps of attention
  modules). Variables are flax's: params scale/bias, batch_stats mean/var.

  Under jit over a batch sharded on the mesh, the means are over the global batch, so every
  device normalises with the same statistics and keeps the same running averages. x may be
  channel parts (a tuple, see map_parts): normalised part by part, returned as parts.
  """
  use_running_average: bool
  momentum: float = 0.1  # torch's convention: weight of the new batch
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    parts = x if isinstance(x, tuple) else (x,)  # an array is one part
    c = sum(p.shape[-1] for p in parts)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if self.use_running_average:
      return map_parts(lambda p, m, v, s, b: _normalize(p, m, v, s, b, self.epsilon, self.dtype),
                       x, ra_mean.value, ra_var.value, scale, bias)
    per_part = map_parts(lambda p, s, b: _batch_norm_train(p, s, b, self.epsilon, jnp.dtype(self.dtype)),
                         parts, scale, bias)
    y = tuple(r[0] for r in per_part) if isinstance(x, tuple) else per_part[0][0]
    mean, var = (jnp.concatenate([r[k] for r in per_part]) for k in (1, 2))
    if not self.is_initializing():
      n = math.prod(parts[0].shape[:-1])
      m = self.momentum
      ra_mean.value = (1 - m) * ra_mean.value + m * mean.astype(ra_mean.value.dtype)
      ra_var.value = (1 - m) * ra_var.value + m * (var * n / max(n - 1, 1)).astype(ra_var.value.dtype)
    return y


def _batch_stats(x):
  """Per-channel mean and biased variance over all but the last axis, by two passes (float32)."""
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, axes)
  return mean, jnp.mean(jnp.square(xf - mean), axes)


def _normalize(x, mean, var, scale, bias, epsilon: float, dtype):
  mul = scale * jax.lax.rsqrt(var + epsilon)
  return ((x - mean.astype(dtype)) * mul.astype(dtype) + bias.astype(dtype)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, epsilon: float, dtype):
  """BatchNorm with batch statistics → (y, mean, var), differentiated in closed form.

  Autodiff of the two-pass statistics also differentiates the variance through the mean (a
  term that is zero but still summed over the batch) and spreads the rest over more passes
  over the activations than torch's native_batch_norm_backward, whose closed form this is: two
  sums over the output gradient, then the input gradient (benchmarks/NOTES.md, attempt 11).
  The cotangents of mean and var (zero in a train step, where they only feed the running
  averages) are honoured when present."""
  mean, var = _batch_stats(x)
  return _normalize(x, mean, var, scale, bias, epsilon, dtype), mean, var


def _batch_norm_train_fwd(x, scale, bias, epsilon, dtype):
  x, scale, bias = x.value, scale.value, bias.value
  mean, var = _batch_stats(x)
  return (_normalize(x, mean, var, scale, bias, epsilon, dtype), mean, var), (x, scale, mean, var)


def _batch_norm_train_bwd(epsilon, dtype, residuals, cotangents):
  x, scale, mean, var = residuals
  gy, g_mean, g_var = cotangents
  axes = tuple(range(x.ndim - 1))
  n = math.prod(x.shape[:-1])
  f32 = jnp.promote_types(x.dtype, jnp.float32)
  rstd = jax.lax.rsqrt(var + epsilon)
  centred = x.astype(f32) - mean
  if isinstance(gy, jax.custom_derivatives.SymbolicZero):
    g = jnp.zeros(x.shape, f32)
  else:
    g = gy.astype(f32)
  g_bias = jnp.sum(g, axes)
  g_scale = jnp.sum(g * centred, axes) * rstd
  mul = scale * rstd
  # d/dx of (x - mean)·mul + bias with mean and var functions of x:
  gx = mul * g - (mul / n) * g_bias - centred * (mul * rstd * g_scale / n)
  if not isinstance(g_mean, jax.custom_derivatives.SymbolicZero):
    gx = gx + g_mean / n
  if not isinstance(g_var, jax.custom_derivatives.SymbolicZero):
    gx = gx + centred * (2 * g_var / n)
  return gx.astype(x.dtype), g_scale, g_bias


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd, symbolic_zeros=True)


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


@jax.custom_jvp
def relu(x):
  """max(x, 0) written as a select. XLA's CPU backend broadcasts the zero of max(x, 0) into a
  full-size array where it fuses the ReLU into a matrix product or convolution; the select
  avoids that (eval +10-15%, benchmarks/NOTES.md attempt 10). NaN propagates, as in torch; the
  derivative is jax.nn.relu's (0 at x <= 0)."""
  return jnp.where(x < 0, jnp.zeros_like(x), x)


@relu.defjvp
def _relu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return relu(x), jnp.where(x > 0, t, jnp.zeros_like(t))


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
  """torch.nn.MaxPool2d: padding with -inf; ceil_mode adds a partial last window."""
  pads = tuple(_pool_pads(n, kernel, stride, padding, ceil_mode) for n in x.shape[1:3])
  return _max_pool(x, kernel, stride, pads)


def avg_pool(x, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False,
             count_include_pad: bool = True):
  """torch.nn.AvgPool2d. ceil_mode's partial last windows average only the pixels they cover."""
  if ceil_mode and padding and count_include_pad:
    raise ValueError("avg_pool: ceil_mode with counted padding is not supported (no timm model uses it)")
  pads = tuple(_pool_pads(n, kernel, stride, padding, ceil_mode) for n in x.shape[1:3])
  return _avg_pool(x, kernel, stride, pads, count_include_pad and not ceil_mode)


# XLA's CPU backend runs the gradients of reduce_window pooling (select-and-scatter for max, a
# padded reduce_window for average) 4-30x slower than the forward passes (ResNet-50's stem max
# pool: 340 ms against 25 ms at batch 16, 224 px). The custom VJPs below give the same
# gradients from one cotangent array per window tap, added up phase by phase
# (benchmarks/NOTES.md, attempt 7). Forward passes stay reduce_window.

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, kernel: int, stride: int, pads):
  return nn.max_pool(x, (kernel, kernel), (stride, stride), padding=pads)


def _max_pool_fwd(x, kernel, stride, pads):
  """The max and, per output, the first window tap (row-major) holding it — the element that
  select-and-scatter and torch's MaxPool2d send the gradient to; NaN wins, as in torch."""
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
  y = tap = None
  for n, t in enumerate(_window_taps(xp, kernel, stride)):
    if y is None:
      y, tap = t, jnp.zeros(t.shape, jnp.int8 if kernel * kernel < 128 else jnp.int32)
    else:
      take = (t > y) | jnp.isnan(t)
      y, tap = jnp.where(take, t, y), jnp.where(take, jnp.asarray(n, tap.dtype), tap)
  return y, (tap, x.shape)


def _max_pool_bwd(kernel, stride, pads, residuals, g):
  tap, x_shape = residuals
  zero = jnp.zeros((), g.dtype)
  per_tap = [jnp.where(tap == n, g, zero) for n in range(kernel * kernel)]
  return (_taps_to_input(per_tap, kernel, stride, pads, x_shape),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _avg_pool(x, kernel: int, stride: int, pads, count_include_pad: bool):
  # flax divides by a float32 count without count_include_pad, which would promote bfloat16
  # activations (and their cotangents) to float32.
  return nn.avg_pool(x, (kernel, kernel), (stride, stride), padding=pads,
                     count_include_pad=count_include_pad).astype(x.dtype)


def _avg_pool_fwd(x, kernel, stride, pads, count_include_pad):
  return _avg_pool(x, kernel, stride, pads, count_include_pad), x.shape


def _avg_pool_bwd(kernel, stride, pads, count_include_pad, x_shape, g):
  if count_include_pad:
    g = g / (kernel * kernel)
  else:  # each window divides by the pixels it covers inside the image
    covered = [np.array([len(range(max(o * stride - low, 0), min(o * stride - low + kernel, n)))
                         for o in range(out)])
               for n, (low, _), out in zip(x_shape[1:3], pads, g.shape[1:3])]
    g = g / jnp.asarray(np.outer(*covered)[None, :, :, None], g.dtype)
  return (_taps_to_input([g] * (kernel * kernel), kernel, stride, pads, x_shape),)


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def _window_taps(xp, kernel: int, stride: int):
  """The k*k strided views of a padded NHWC array, one per window tap in row-major order: view
  (i, j) holds, at each output position, the pixel at offset (i, j) in that output's window."""
  b, hp, wp, c = xp.shape
  oh, ow = (hp - kernel) // stride + 1, (wp - kernel) // stride + 1
  for i in range(kernel):
    for j in range(kernel):
      yield jax.lax.slice(xp, (0, i, j, 0), (b, i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1, c),
                          (1, stride, stride, 1))


def _taps_to_input(per_tap, kernel: int, stride: int, pads, x_shape):
  """Adds per-tap output-sized arrays back onto the input pixels they came from (the transpose
  of `_window_taps`, cropped to the unpadded input). Tap (i, j) lands on input phase
  (i mod s, j mod s) shifted by (i // s, j // s) there, so each phase is a sum of shifted
  output-sized arrays and the phases interleave with one reshape: no strided scatter."""
  b, oh, ow, c = per_tap[0].shape
  hq = -(-(x_shape[1] + sum(pads[0])) // stride)
  wq = -(-(x_shape[2] + sum(pads[1])) // stride)
  phases = {}
  for n, t in enumerate(per_tap):
    i, j = divmod(n, kernel)
    di, dj = i // stride, j // stride
    t = jnp.pad(t, ((0, 0), (di, hq - oh - di), (dj, wq - ow - dj), (0, 0)))
    key = (i % stride, j % stride)
    phases[key] = phases[key] + t if key in phases else t
  zero = jnp.zeros((b, hq, wq, c), per_tap[0].dtype)
  rows = [jnp.stack([phases.get((a, e), zero) for e in range(stride)], axis=3) for a in range(stride)]
  padded = jnp.stack(rows, axis=2).reshape(b, hq * stride, wq * stride, c)
  (top, _), (left, _) = pads
  return padded[:, top:top + x_shape[1], left:left + x_shape[2]]


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
