"""EfficientNet as in timm's efficientnet.py (efficientnet_b0 … b4, PyTorch-style padding).

The B0 architecture (seven stages of depthwise-separable and inverted-residual blocks with
squeeze-excitation, SiLU) widened by the channel multiplier (rounded to multiples of 8) and
deepened by the depth multiplier (repeats rounded up), as timm's builder does.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from cxflax.models import registry
from cxflax.models.layers import Conv2d, DropPath, Dtype, batch_norm, classifier, make_divisible

# (block type, repeats, kernel, stride, expansion, out channels) of B0; every block has SE 0.25.
B0_STAGES = (("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40),
             ("ir", 3, 3, 2, 6, 80), ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192),
             ("ir", 1, 3, 1, 6, 320))
SE_RATIO = 0.25


def _bn_act(x, train, dtype, name, act=True):
  x = batch_norm(train, dtype, name=name)(x)
  return nn.silu(x) if act else x


class _SqueezeExcite(nn.Module):
  """timm's efficientnet SqueezeExcite: reduce to round(in_chs · SE_RATIO) with SiLU, expand,
  sigmoid gate, where in_chs is the block's input width."""
  reduced: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.silu(Conv2d(self.reduced, 1, use_bias=True, dtype=self.dtype, name="conv_reduce")(s))
    s = Conv2d(x.shape[-1], 1, use_bias=True, dtype=self.dtype, name="conv_expand")(s)
    return x * nn.sigmoid(s)


class MBConv(nn.Module):
  """Inverted residual ('ir': 1x1 expand, depthwise k x k, SE, 1x1 project) or its unexpanded
  depthwise-separable form ('ds'); the residual is added when the shape is kept."""
  kind: str
  features: int
  kernel_size: int
  stride: int
  expansion: int
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    in_chs, d = x.shape[-1], self.dtype
    y = x
    if self.kind == "ir":
      mid = make_divisible(in_chs * self.expansion)
      y = Conv2d(mid, 1, dtype=d, name="conv_pw")(y)
      y = _bn_act(y, train, d, "bn1")
      dw_norm, se_norm = "bn2", "bn3"
    else:
      mid = in_chs
      dw_norm, se_norm = "bn1", "bn2"
    y = Conv2d(mid, self.kernel_size, self.stride, groups=mid, dtype=d, name="conv_dw")(y)
    y = _bn_act(y, train, d, dw_norm)
    y = _SqueezeExcite(round(mid * (SE_RATIO / self.expansion)), d, name="se")(y)
    y = Conv2d(self.features, 1, dtype=d, name="conv_pwl" if self.kind == "ir" else "conv_pw")(y)
    y = _bn_act(y, train, d, se_norm, act=False)
    if self.stride == 1 and in_chs == self.features:
      if self.drop_path_rate:
        y = DropPath(self.drop_path_rate, name="drop_path")(y, train)
      y = y + x
    return y


class EfficientNet(nn.Module):
  """timm's EfficientNet; __call__ returns logits, the pooled embedding (num_classes=0) or the
  feature map after conv_head (global_pool='')."""
  channel_multiplier: float = 1.0
  depth_multiplier: float = 1.0
  num_classes: int = 1000
  global_pool: str = "avg"
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  def _round(self, channels: int) -> int:
    return make_divisible(channels * self.channel_multiplier, 8)

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.dtype
    x = Conv2d(self._round(32), 3, 2, dtype=d, name="conv_stem")(x.astype(d))
    x = _bn_act(x, train, d, "bn1")
    repeats = [math.ceil(r * self.depth_multiplier) for _, r, *_ in B0_STAGES]
    total, index = sum(repeats), 0
    for s, ((kind, _, k, stride, e, c), n) in enumerate(zip(B0_STAGES, repeats)):
      for j in range(n):
        x = MBConv(kind, self._round(c), k, stride if j == 0 else 1, e,
                   self.drop_path_rate * index / total, d, name=f"blocks_{s}_{j}")(x, train)
        index += 1
    x = Conv2d(self._round(1280), 1, dtype=d, name="conv_head")(x)
    x = _bn_act(x, train, d, "bn2")
    return classifier(x, num_classes=self.num_classes, pool_type=self.global_pool,
                      drop_rate=self.drop_rate, train=train, dtype=d, fc_name="classifier")


for _name, _cm, _dm in (("efficientnet_b0", 1.0, 1.0), ("efficientnet_b4", 1.4, 1.8)):
  registry.register(_name, lambda _c=_cm, _d=_dm, **kw: EfficientNet(_c, _d, **kw))
