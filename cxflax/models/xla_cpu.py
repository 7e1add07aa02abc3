"""Kernels written for XLA's CPU backend, and the one switch that selects them.

Where XLA's CPU backend runs a network's operations far slower than the same arithmetic written
otherwise, cxflax writes them otherwise (benchmarks/NOTES.md, §1, §2 and §6 attempts 5-13):

- convolutions (`conv2d`): 1x1 convolutions as a 2-D matrix product over channels, outputs of at
  most 2 px on a side as one product over all kernel taps, convolutions with a few groups group
  by group, and large ungrouped ones with their kernel gradient taken image by image;
- BatchNorm in training mode differentiated in closed form (`batch_norm_train`);
- ReLU as a select (`relu`);
- the backward passes of max and average pooling (`max_pool`, `avg_pool`).

Each computes the same function as the plain flax/XLA form in ``cxflax.models.layers``, summed
in another order (float rounding apart), with the same parameters. The layers use these kernels
when `enabled()`: the mode is ``auto`` (on where ``jax.default_backend() == 'cpu'``, off
elsewhere, e.g. on GPUs, where cuDNN runs the plain forms well), ``on`` or ``off``; runs set it
from ``config.cpu_kernels`` (cxflax.main.run).

The mode is read when a function is traced: a function jitted (and traced) under one mode keeps
that mode's program when the mode changes later, because jax.jit does not trace it again. Set
the mode once per process before tracing anything; tests and benchmarks that compare modes use
`mode(...)` with a fresh function per mode.
"""

from __future__ import annotations

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODES = ("auto", "on", "off")

_mode = "auto"


def set_mode(mode: str) -> None:
  """Selects the kernels from now on: 'auto' (on the CPU backend only), 'on' or 'off'."""
  global _mode
  if mode not in MODES:
    raise ValueError(f"the CPU kernel mode must be one of {', '.join(MODES)}; got {mode!r}")
  _mode = mode


def get_mode() -> str:
  return _mode


def enabled() -> bool:
  """Whether functions traced now use these kernels."""
  return _mode == "on" or (_mode == "auto" and jax.default_backend() == "cpu")


@contextlib.contextmanager
def mode(m: str):
  """The mode `m` inside the block, the previous one after it (for tests and benchmarks: trace a
  fresh function inside)."""
  previous = _mode
  set_mode(m)
  try:
    yield
  finally:
    set_mode(previous)


# --- compiler options --------------------------------------------------------------------------

# XLA's CPU backend (jaxlib 0.10) hands convolutions, matrix products and reductions to YNNPACK.
# Its own convolutions and products run these networks' train and eval steps faster, YNNPACK's
# reductions faster than its own (benchmarks/NOTES.md §13, attempt 16): YNNPACK fusions formed
# around reductions only (one may still take in a convolution that the reduction alone reads).
_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


_options_enabled = True


def compiler_options() -> dict[str, str] | None:
  """XLA options for a run's compiled steps (`jax.jit(..., compiler_options=...)`): `_OPTIONS`
  where the kernels are enabled on the CPU backend and its XLA knows them, else None (and inside
  `xla_default_options()`)."""
  if _options_enabled and enabled() and jax.default_backend() == "cpu" and _options_known():
    return dict(_OPTIONS)
  return None


@contextlib.contextmanager
def xla_default_options():
  """Steps made inside the block compile with XLA's default options, the kernels kept: the
  reference benchmarks/xla_options.py measures `_OPTIONS` against."""
  global _options_enabled
  previous, _options_enabled = _options_enabled, False
  try:
    yield
  finally:
    _options_enabled = previous


@functools.cache
def _options_known() -> bool:
  """Whether this jaxlib's XLA accepts `_OPTIONS` (an option it does not know fails compilation)."""
  try:
    jax.jit(jnp.sum).lower(jnp.zeros(2)).compile(compiler_options=_OPTIONS)
  except Exception:  # noqa: BLE001 - whatever an older XLA raises for an unknown option
    return False
  return True


# --- convolutions ------------------------------------------------------------------------------

# Grouped convolutions with at most this many groups run as one convolution per group: XLA's
# CPU convolution with feature_group_count=2 is several times slower than two ordinary ones
# (benchmarks/NOTES.md, attempt 2 and §6).
_SPLIT_GROUPS_UP_TO = 8


def group_by_group(groups: int, in_channels: int) -> bool:
  """Whether `conv2d` runs a convolution with `groups` groups one group at a time."""
  return 1 < groups <= _SPLIT_GROUPS_UP_TO and groups < in_channels


def conv2d(x, kernel, stride: int, padding: tuple[int, int], dilation: int = 1, groups: int = 1):
  """layers.conv2d (NHWC `x`, HWIO kernel, symmetric zero padding (ph, pw)) avoiding XLA's CPU
  convolution where it is far slower than the same arithmetic written otherwise: 1x1
  convolutions are a product over channels (strided by slicing); outputs of at most 2 px on a
  side are one product over all kernel taps (attempt 1); convolutions with a few groups run
  group by group (attempt 2); large ones on one device take their kernel gradient image by image
  (attempt 8)."""
  kh, kw = kernel.shape[:2]
  ph, pw = padding
  if group_by_group(groups, x.shape[-1]):
    xs = jnp.split(x, groups, axis=-1)
    ks = jnp.split(kernel, groups, axis=-1)
    return jnp.concatenate([conv2d(a, k, stride, padding, dilation) for a, k in zip(xs, ks)], axis=-1)
  if groups == 1 and kh == kw == 1 and ph == pw == 0:
    if stride > 1:
      x = x[:, ::stride, ::stride, :]
    return channel_product(x, kernel[0, 0])
  out_h = (x.shape[1] + 2 * ph - dilation * (kh - 1) - 1) // stride + 1
  out_w = (x.shape[2] + 2 * pw - dilation * (kw - 1) - 1) // stride + 1
  if groups == 1 and max(out_h, out_w) <= 2:
    # The taps side by side (i, j, channel: the order of the HWIO kernel's first three axes),
    # times the kernel as one (kh·kw·C, O) matrix. One product per tap, summed, computes the
    # same, but its kernel gradient is then one product per tap, each padded to the kernel's
    # full shape and summed: slower, most of all as the suite compiles (benchmarks/NOTES.md, §1).
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    taps = [xp[:, i * dilation:i * dilation + stride * (out_h - 1) + 1:stride,
               j * dilation:j * dilation + stride * (out_w - 1) + 1:stride, :]
            for i in range(kh) for j in range(kw)]
    return channel_product(jnp.concatenate(taps, axis=-1), kernel.reshape(-1, kernel.shape[-1]))
  if (groups == 1 and dilation == 1 and out_h * out_w >= _IMAGE_BY_IMAGE_FROM_PIXELS
      and _image_by_image_applies()):
    return conv_image_by_image_kernel_gradient(x, kernel, stride, ((ph, ph), (pw, pw)))
  return _xla_conv(x, kernel, stride, ((ph, ph), (pw, pw)), dilation, groups)


def _xla_conv(x, kernel, stride: int, pads, dilation: int = 1, groups: int = 1):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), pads, rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def channel_product(x, matrix):
  """x (..., C) @ matrix (C, O) as one 2-D product: the gradients of a product over a 4-D array
  are 4-D contractions that XLA's CPU backend runs several times slower than the 2-D matrix
  products they become after the reshape (benchmarks/NOTES.md, attempt 5)."""
  y = jnp.dot(x.reshape(-1, x.shape[-1]), matrix)
  return y.reshape(x.shape[:-1] + (matrix.shape[-1],))


# Convolutions with at least this many output pixels take their kernel gradient image by image
# (below): down to 28x28 outputs that measured faster, at 14 px the two were even and at 7 px
# XLA's own was faster (benchmarks/NOTES.md, attempt 8).
_IMAGE_BY_IMAGE_FROM_PIXELS = 28 * 28

_image_by_image_enabled = True


def _image_by_image_applies() -> bool:
  """Whether the image-by-image kernel gradient is used: on one device only (a scan over the
  batch axis would make the SPMD partitioner gather a sharded batch), and not inside
  `xla_kernel_gradients()`. (`conv2d` itself runs only where `enabled()`.)"""
  return _image_by_image_enabled and jax.device_count() == 1


@contextlib.contextmanager
def xla_kernel_gradients():
  """Traces convolutions with XLA's own kernel gradients, the other kernels kept. For counting
  FLOPs: XLA's cost analysis counts the body of the image-by-image scan once, not once per
  image."""
  global _image_by_image_enabled
  previous, _image_by_image_enabled = _image_by_image_enabled, False
  try:
    yield
  finally:
    _image_by_image_enabled = previous


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_image_by_image_kernel_gradient(x, kernel, stride: int, pads):
  """XLA's convolution, and its input gradient; only the kernel gradient is computed otherwise.

  XLA's CPU backend computes the kernel gradient of a convolution over large, shallow maps far
  below its speed elsewhere (ResNeSt's 112-px stem): it streams the whole batch through memory
  once per kernel tap. Here, one image at a time (in cache), each tap's contribution is one
  matrix product of a contiguous slice of the flattened padded image with the output gradient
  (benchmarks/NOTES.md, attempt 8). Same sums, in another order.
  """
  return _xla_conv(x, kernel, stride, pads)


def _image_by_image_fwd(x, kernel, stride, pads):
  return _xla_conv(x, kernel, stride, pads), (x, kernel)


def _image_by_image_bwd(stride, pads, residuals, g):
  x, kernel = residuals
  _, input_gradient = jax.vjp(lambda x: _xla_conv(x, kernel, stride, pads), x)
  return input_gradient(g)[0], _kernel_gradient_by_image(x, g, kernel.shape, stride, pads)


conv_image_by_image_kernel_gradient.defvjp(_image_by_image_fwd, _image_by_image_bwd)


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


# --- BatchNorm ---------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def batch_norm_train(forward, x, scale, bias, epsilon: float, dtype):
  """forward(x, scale, bias, epsilon, dtype) → (y, mean, var), layers' training-mode BatchNorm
  (two-pass batch statistics, biased variance), differentiated in closed form.

  Autodiff of the two-pass statistics also differentiates the variance through the mean (a
  term that is zero but still summed over the batch) and spreads the rest over more passes
  over the activations than torch's native_batch_norm_backward, whose closed form this is: two
  sums over the output gradient, then the input gradient (benchmarks/NOTES.md, attempt 11).
  The cotangents of mean and var (zero in a train step, where they only feed the running
  averages) are honoured when present."""
  return forward(x, scale, bias, epsilon, dtype)


def _batch_norm_train_fwd(forward, x, scale, bias, epsilon, dtype):
  x, scale, bias = x.value, scale.value, bias.value
  y, mean, var = forward(x, scale, bias, epsilon, dtype)
  return (y, mean, var), (x, scale, mean, var)


def _batch_norm_train_bwd(forward, epsilon, dtype, residuals, cotangents):
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


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd, symbolic_zeros=True)


# --- ReLU --------------------------------------------------------------------------------------

@jax.custom_jvp
def relu(x):
  """max(x, 0) written as a select. XLA's CPU backend broadcasts the zero of max(x, 0) into a
  full-size array where it fuses the ReLU into a matrix product or convolution; the select
  avoids that (benchmarks/NOTES.md, attempt 10). NaN propagates, as in torch; the derivative is
  jax.nn.relu's (0 at x <= 0)."""
  return jnp.where(x < 0, jnp.zeros_like(x), x)


@relu.defjvp
def _relu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return relu(x), jnp.where(x > 0, t, jnp.zeros_like(t))


# --- pooling -----------------------------------------------------------------------------------

# XLA's CPU backend runs the gradients of reduce_window pooling (select-and-scatter for max, a
# padded reduce_window for average) several times slower than the forward passes. The custom
# VJPs below give the same gradients from one cotangent array per window tap, added up phase by
# phase (benchmarks/NOTES.md, attempt 7). Forward passes stay reduce_window, as in layers.

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, kernel: int, stride: int, pads):
  """nn.max_pool with explicit (low, high) `pads` per spatial axis; its gradient goes to the
  first maximum of each window, as select-and-scatter's and torch's do."""
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


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def avg_pool(x, kernel: int, stride: int, pads, count_include_pad: bool):
  """nn.avg_pool with explicit `pads`, in x's dtype (as layers.avg_pool)."""
  return nn.avg_pool(x, (kernel, kernel), (stride, stride), padding=pads,
                     count_include_pad=count_include_pad).astype(x.dtype)


def _avg_pool_fwd(x, kernel, stride, pads, count_include_pad):
  return avg_pool(x, kernel, stride, pads, count_include_pad), x.shape


def _avg_pool_bwd(kernel, stride, pads, count_include_pad, x_shape, g):
  if count_include_pad:
    g = g / (kernel * kernel)
  else:  # each window divides by the pixels it covers inside the image
    covered = [np.array([len(range(max(o * stride - low, 0), min(o * stride - low + kernel, n)))
                         for o in range(out)])
               for n, (low, _), out in zip(x_shape[1:3], pads, g.shape[1:3])]
    g = g / jnp.asarray(np.outer(*covered)[None, :, :, None], g.dtype)
  return (_taps_to_input([g] * (kernel * kernel), kernel, stride, pads, x_shape),)


avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


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
