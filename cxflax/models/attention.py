"""Channel attention modules that plug into a residual block, as in timm (``create_attn``)."""

from __future__ import annotations

import functools
import itertools
import math
import operator

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxflax.models import xla_cpu
from cxflax.models.layers import (BatchNorm, Conv2d, ConvNormAct, Dtype, batch_norm, batch_norm_train,
                                  make_divisible, normalize, relu)


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
    s = relu(Conv2d(rd, 1, use_bias=True, dtype=self.dtype, name="fc1")(s))
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


class SplitAttention(nn.Module):
  """ResNeSt's split-attention convolution (timm's SplitAttn): a grouped conv producing `radix`
  splits, their sum pooled and passed through a small MLP whose radix-softmax weighs the splits.

  Channels of the conv output are ordered radix-major (split r, channel c at r*C + c), as in timm.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  groups: int = 1
  radix: int = 2
  rd_ratio: float = 0.25
  rd_divisor: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    r, c, g = self.radix, self.features, self.groups
    attn_chs = make_divisible(x.shape[-1] * r * self.rd_ratio, self.rd_divisor, min_value=32)
    if g == 1 and xla_cpu.enabled() and xla_cpu.group_by_group(r, x.shape[-1]):
      # With one group per split (cardinality 1) the convolution's groups are the radix splits,
      # which the CPU kernels compute one by one: they stay apart through bn0 and the ReLU
      # instead of being concatenated and sliced again (benchmarks/NOTES.md, attempt 13).
      splits = _SplitsConv(c * r, self.kernel_size, self.stride, groups=r, dtype=self.dtype, name="conv")(x)
      splits = _SplitsBatchNorm(use_running_average=not train, dtype=self.dtype, name="bn0")(splits)
      splits = [relu(s) for s in splits]
    else:
      x = Conv2d(c * r, self.kernel_size, self.stride, groups=g * r, dtype=self.dtype, name="conv")(x)
      x = batch_norm(train, self.dtype, name="bn0")(x)
      splits = [relu(x[..., i * c:(i + 1) * c]) for i in range(r)]
    # The splits are summed one by one: written as a reduction over a radix axis, XLA's CPU
    # backend fused it into the next 1x1 convolution's matrix product and ran that product
    # several times slower (benchmarks/NOTES.md, attempt 9).
    b = splits[0].shape[0]
    gap = functools.reduce(operator.add, (jnp.mean(s, axis=(1, 2), keepdims=True) for s in splits))
    gap = Conv2d(attn_chs, 1, groups=g, use_bias=True, dtype=self.dtype, name="fc1")(gap)
    gap = relu(batch_norm(train, self.dtype, name="bn1")(gap))
    attn = Conv2d(c * r, 1, groups=g, use_bias=True, dtype=self.dtype, name="fc2")(gap).reshape(b, c * r)
    if r > 1:
      # timm: view (B, groups, radix, C/groups) → softmax over radix → radix-major order.
      attn = jax.nn.softmax(attn.reshape(b, g, r, c // g), axis=2)
      attn = attn.transpose(0, 2, 1, 3).reshape(b, 1, 1, r, c)
      return functools.reduce(operator.add, (s * attn[:, :, :, i] for i, s in enumerate(splits)))
    return splits[0] * nn.sigmoid(attn)[:, None, None, :]


class _SplitsConv(Conv2d):
  """Conv2d (same parameter) returning its groups' outputs as a tuple of arrays, one group at a
  time: SplitAttention's radix splits, where the CPU kernels are on."""

  @nn.compact
  def __call__(self, x):
    if self.use_bias:
      raise ValueError("_SplitsConv: no bias (SplitAttention's convolution has none)")
    kernel, padding = self.kernel_and_padding(x)
    xs = jnp.split(x.astype(self.dtype), self.groups, axis=-1)
    ks = jnp.split(kernel, self.groups, axis=-1)
    return tuple(xla_cpu.conv2d(a, k, self.stride, padding, self.dilation) for a, k in zip(xs, ks))


class _SplitsBatchNorm(BatchNorm):
  """BatchNorm (same variables) of the concatenation of a tuple of arrays, computed array by
  array and returned as a tuple: statistics are per channel, so each split is normalised with its
  channels' slice of the parameters; the running averages are updated for all channels at once."""

  @nn.compact
  def __call__(self, splits):
    bounds = _bounds(splits)
    ra_mean, ra_var, scale, bias = self.variables_for(bounds[-1][1])
    if self.use_running_average:
      return tuple(normalize(s, ra_mean.value[a:b], ra_var.value[a:b], scale[a:b], bias[a:b],
                             self.epsilon, self.dtype) for s, (a, b) in zip(splits, bounds))
    results = [batch_norm_train(s, scale[a:b], bias[a:b], self.epsilon, self.dtype)
               for s, (a, b) in zip(splits, bounds)]
    mean, var = (jnp.concatenate([r[k] for r in results]) for k in (1, 2))
    self.update_averages(ra_mean, ra_var, mean, var, math.prod(splits[0].shape[:-1]))
    return tuple(r[0] for r in results)

  def folded(self, splits):
    bias = self.get_variable("params", "bias").astype(self.dtype)
    return tuple((s + bias[a:b]).astype(self.dtype) for s, (a, b) in zip(splits, _bounds(splits)))


def _bounds(splits) -> list[tuple[int, int]]:
  """The channel range [start, stop) of each array in their concatenation."""
  stops = list(itertools.accumulate(s.shape[-1] for s in splits))
  return list(zip([0] + stops[:-1], stops))


class SelectiveKernel(nn.Module):
  """timm's SelectiveKernel conv of SK-ResNeXt: 3x3 paths with dilations 1 and 2 ('paths_0',
  'paths_1'), fused by a softmax attention over paths computed from their pooled sum."""
  features: int
  stride: int = 1
  groups: int = 1
  rd_ratio: float = 1.0 / 16
  rd_divisor: int = 8
  kernel_sizes: tuple[int, ...] = (3, 5)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    groups = min(self.features, self.groups)
    # keep_3x3: a k x k kernel becomes a 3x3 kernel dilated by (k - 1) / 2.
    paths = [ConvNormAct(self.features, 3, self.stride, dilation=(k - 1) // 2, groups=groups,
                         dtype=self.dtype, name=f"paths_{i}")(x, train)
             for i, k in enumerate(self.kernel_sizes)]
    attn_chs = make_divisible(self.features * self.rd_ratio, self.rd_divisor)
    s = functools.reduce(operator.add, (jnp.mean(p, axis=(1, 2), keepdims=True) for p in paths))
    s = _SKAttn(attn_chs, len(paths), self.features, self.dtype, name="attn")(s, train)
    # Summed path by path, not as a reduction over a stacked axis (see SplitAttention).
    return functools.reduce(operator.add, (p * s[:, :, :, i] for i, p in enumerate(paths)))


class _SKAttn(nn.Module):
  """timm's SelectiveKernelAttn on the pooled sum: reduce, BN, ReLU, select, softmax over paths."""
  attn_channels: int
  num_paths: int
  features: int
  dtype: Dtype

  @nn.compact
  def __call__(self, s, train: bool):
    b = s.shape[0]
    s = Conv2d(self.attn_channels, 1, dtype=self.dtype, name="fc_reduce")(s)
    s = relu(batch_norm(train, self.dtype, name="bn")(s))
    s = Conv2d(self.features * self.num_paths, 1, dtype=self.dtype, name="fc_select")(s)
    return jax.nn.softmax(s.reshape(b, 1, 1, self.num_paths, self.features), axis=3)


def make_attention(kind: str | None, dtype: Dtype, name: str = "se", **kwargs) -> nn.Module | None:
  """The attention module a block plugs in after its last norm: None, 'se' or 'eca'."""
  if not kind:
    return None
  if kind == "se":
    return SqueezeExcite(dtype=dtype, name=name, **kwargs)
  if kind == "eca":
    return EfficientChannelAttention(dtype=dtype, name=name, **kwargs)
  raise ValueError(f"unknown attention {kind!r}: use None, 'se' or 'eca'")
