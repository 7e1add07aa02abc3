"""The ResNet family of timm as one network with pluggable blocks, stems and attention.

As in timm's ``resnet.py``: a stem (7x7 conv, or the three-3x3 'deep' / 'deep_tiered' stem of
the c/d/e/t variants; max pool or ResNet-RS's strided conv), four stages of blocks (basic or
bottleneck, grouped for ResNeXt), a projection shortcut (strided 1x1 conv, or average pooling then
1x1 conv for the 'd' variants), and an attention module (SE, ECA, ...) plugged after the block's
last norm. ResNeSt and SK-ResNeXt reuse this skeleton with their own blocks. Module names mirror
timm's state-dict keys ('layer1.0.conv1' → layer1_0/conv1) so that timm weights load directly.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from cxflax.models import registry
from cxflax.models.attention import SelectiveKernel, SplitAttention, make_attention
from cxflax.models.layers import (Conv2d, ConvNormAct, DropPath, Dtype, avg_pool, batch_norm,
                                  classifier, max_pool, relu)


def _shortcut(x, features: int, stride: int, avg_down: bool, train: bool, dtype: Dtype):
  """The projection shortcut of a block whose shape changes, called in the block's scope.

  Named like timm's ``downsample`` Sequential: conv (index 0) and norm (1), or, with average
  pooling first ('avg_down'), pool (0, no parameters), conv (1) and norm (2).
  """
  if avg_down:
    if stride > 1:
      x = avg_pool(x, 2, stride, ceil_mode=True, count_include_pad=False)
    x = Conv2d(features, 1, dtype=dtype, name="downsample_1")(x)
    return batch_norm(train, dtype, name="downsample_2")(x)
  x = Conv2d(features, 1, stride, dtype=dtype, name="downsample_0")(x)
  return batch_norm(train, dtype, name="downsample_1")(x)


class _Block(nn.Module):
  """The fields of every block: ResNet sets them all and a block class adds its own (set through
  ResNet's block_args). `expansion` is the ratio of a block's output channels to `planes`."""
  expansion: ClassVar[int]
  planes: int
  stride: int = 1
  downsample: bool = False
  avg_down: bool = False
  cardinality: int = 1
  base_width: int = 64
  reduce_first: int = 1
  attn_layer: str | None = None
  attn_kwargs: tuple = ()
  drop_path_rate: float = 0.0
  zero_init_last: bool = True
  dtype: Dtype = jnp.float32


class BasicBlock(_Block):
  """Two 3x3 convolutions (ResNet-18/34)."""
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.cardinality != 1 or self.base_width != 64:
      raise ValueError("BasicBlock supports only cardinality 1 and base_width 64")
    out = self.planes * self.expansion
    y = Conv2d(self.planes // self.reduce_first, 3, self.stride, dtype=self.dtype, name="conv1")(x)
    y = relu(batch_norm(train, self.dtype, name="bn1")(y))
    y = Conv2d(out, 3, dtype=self.dtype, name="conv2")(y)
    y = batch_norm(train, self.dtype, name="bn2", zero_init=self.zero_init_last)(y)
    return _residual(self, x, y, out, train)


class Bottleneck(_Block):
  """1x1 reduce → 3x3 (grouped for ResNeXt) → 1x1 expand (ResNet-50 and deeper)."""
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    width = int(math.floor(self.planes * (self.base_width / 64)) * self.cardinality)
    out = self.planes * self.expansion
    y = Conv2d(width // self.reduce_first, 1, dtype=self.dtype, name="conv1")(x)
    y = relu(batch_norm(train, self.dtype, name="bn1")(y))
    y = Conv2d(width, 3, self.stride, groups=self.cardinality, dtype=self.dtype, name="conv2")(y)
    y = relu(batch_norm(train, self.dtype, name="bn2")(y))
    y = Conv2d(out, 1, dtype=self.dtype, name="conv3")(y)
    y = batch_norm(train, self.dtype, name="bn3", zero_init=self.zero_init_last)(y)
    return _residual(self, x, y, out, train)


class SelectiveKernelBottleneck(_Block):
  """SK-ResNeXt's bottleneck (timm sknet.py): 1x1 ConvNormAct, SelectiveKernel, 1x1 ConvNorm."""
  expansion: ClassVar[int] = 4
  sk_kwargs: tuple = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    width = int(math.floor(self.planes * (self.base_width / 64)) * self.cardinality)
    out = self.planes * self.expansion
    y = ConvNormAct(width // self.reduce_first, 1, dtype=self.dtype, name="conv1")(x, train)
    y = SelectiveKernel(width, self.stride, self.cardinality, dtype=self.dtype, name="conv2",
                        **dict(self.sk_kwargs))(y, train)
    y = ConvNormAct(out, 1, act=None, dtype=self.dtype, name="conv3")(y, train)
    return _residual(self, x, y, out, train)


class ResNestBottleneck(_Block):
  """ResNeSt's bottleneck (timm resnest.py): 1x1 conv, split-attention 3x3, then — with 'avd' —
  a 3x3 average pool carrying the stride, and the 1x1 expansion.

  timm applies drop-path to the block's input rather than its residual branch; cxflax applies it
  to the branch, as every other block does. The two agree whenever drop_path_rate is 0 (timm's
  default, and every configuration of the papers).
  """
  expansion: ClassVar[int] = 4
  radix: int = 2
  avd: bool = False
  avd_first: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    width = int(self.planes * (self.base_width / 64.0)) * self.cardinality
    out = self.planes * self.expansion
    avd_stride, stride = (self.stride, 1) if self.avd and self.stride > 1 else (0, self.stride)
    y = Conv2d(width, 1, dtype=self.dtype, name="conv1")(x)
    y = relu(batch_norm(train, self.dtype, name="bn1")(y))
    if avd_stride and self.avd_first:
      y = avg_pool(y, 3, avd_stride, padding=1)
    if self.radix >= 1:
      y = SplitAttention(width, 3, stride, self.cardinality, self.radix, dtype=self.dtype,
                         name="conv2")(y, train)
    else:
      y = Conv2d(width, 3, stride, groups=self.cardinality, dtype=self.dtype, name="conv2")(y)
      y = relu(batch_norm(train, self.dtype, name="bn2")(y))
    if avd_stride and not self.avd_first:
      y = avg_pool(y, 3, avd_stride, padding=1)
    y = Conv2d(out, 1, dtype=self.dtype, name="conv3")(y)
    y = batch_norm(train, self.dtype, name="bn3", zero_init=self.zero_init_last)(y)
    return _residual(self, x, y, out, train)


def _residual(block: _Block, x, y, out_features: int, train: bool):
  """The common tail of the blocks: attention, drop-path, shortcut, sum, ReLU.

  Called from inside a block's compact method, so its modules are named in that block.
  """
  attn = make_attention(block.attn_layer, block.dtype, **dict(block.attn_kwargs))
  if attn is not None:
    y = attn(y)
  if block.drop_path_rate:
    y = DropPath(block.drop_path_rate, name="drop_path")(y, train)
  if block.downsample:
    x = _shortcut(x, out_features, block.stride, block.avg_down, train, block.dtype)
  return relu(y + x)


class ResNet(nn.Module):
  """timm's ResNet (see the module docstring); arguments are timm's.

  ``__call__(x, train)`` takes NHWC images and returns logits (num_classes > 0), the pooled
  embedding (num_classes=0) or the last feature map (global_pool='').
  """
  block: Any
  layers: tuple[int, ...]
  num_classes: int = 1000
  global_pool: str = "avg"
  cardinality: int = 1
  base_width: int = 64
  stem_width: int = 64
  stem_type: str = ""
  replace_stem_pool: bool = False
  avg_down: bool = False
  channels: tuple[int, ...] = (64, 128, 256, 512)
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  zero_init_last: bool = True
  block_args: tuple = ()  # extra block fields as (name, value) pairs, e.g. (("attn_layer", "se"),)
  dtype: Dtype = jnp.float32

  @property
  def num_features(self) -> int:
    return self.channels[-1] * self.block.expansion

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    deep = "deep" in self.stem_type
    inplanes = self.stem_width * 2 if deep else 64
    if deep:
      chs = (3 * (self.stem_width // 4), self.stem_width) if "tiered" in self.stem_type else (
          self.stem_width, self.stem_width)
      x = Conv2d(chs[0], 3, 2, dtype=self.dtype, name="conv1_0")(x)
      x = relu(batch_norm(train, self.dtype, name="conv1_1")(x))
      x = Conv2d(chs[1], 3, 1, dtype=self.dtype, name="conv1_3")(x)
      x = relu(batch_norm(train, self.dtype, name="conv1_4")(x))
      x = Conv2d(inplanes, 3, 1, dtype=self.dtype, name="conv1_6")(x)
    else:
      x = Conv2d(inplanes, 7, 2, dtype=self.dtype, name="conv1")(x)
    x = relu(batch_norm(train, self.dtype, name="bn1")(x))
    if self.replace_stem_pool:
      x = Conv2d(inplanes, 3, 2, dtype=self.dtype, name="maxpool_0")(x)
      x = relu(batch_norm(train, self.dtype, name="maxpool_1")(x))
    else:
      x = max_pool(x, 3, 2, padding=1)

    total, index = sum(self.layers), 0
    for stage, (planes, depth) in enumerate(zip(self.channels, self.layers)):
      for j in range(depth):
        stride = (1 if stage == 0 else 2) if j == 0 else 1
        x = self.block(
            planes=planes, stride=stride,
            downsample=j == 0 and (stride != 1 or inplanes != planes * self.block.expansion),
            avg_down=self.avg_down, cardinality=self.cardinality, base_width=self.base_width,
            drop_path_rate=self.drop_path_rate * index / max(total - 1, 1),
            zero_init_last=self.zero_init_last, dtype=self.dtype, name=f"layer{stage + 1}_{j}",
            **dict(self.block_args))(x, train)
        inplanes = planes * self.block.expansion
        index += 1
    return classifier(x, num_classes=self.num_classes, pool_type=self.global_pool,
                      drop_rate=self.drop_rate, train=train, dtype=self.dtype)


def _resnet(block, layers, **defaults):
  """A model constructor with timm's architecture defaults, overridable by the caller."""
  def create(**kwargs):
    args = dict(defaults)
    block_args = dict(args.pop("block_args", ()))
    block_args.update(kwargs.pop("block_args", {}))
    args.update(kwargs)
    return ResNet(block=block, layers=layers, block_args=tuple(sorted(block_args.items())), **args)
  return create


_SE_RS = (("attn_layer", "se"), ("attn_kwargs", (("rd_ratio", 0.25),)))

registry.register("resnet10t", _resnet(BasicBlock, (1, 1, 1, 1), stem_width=32, stem_type="deep_tiered", avg_down=True))
registry.register("resnet18", _resnet(BasicBlock, (2, 2, 2, 2)))
registry.register("resnet34", _resnet(BasicBlock, (3, 4, 6, 3)))
registry.register("resnet50", _resnet(Bottleneck, (3, 4, 6, 3)))
registry.register("resnet101", _resnet(Bottleneck, (3, 4, 23, 3)))
registry.register("resnet152", _resnet(Bottleneck, (3, 8, 36, 3)))
registry.register("resnext50_32x4d", _resnet(Bottleneck, (3, 4, 6, 3), cardinality=32, base_width=4))
registry.register("resnext101_32x8d", _resnet(Bottleneck, (3, 4, 23, 3), cardinality=32, base_width=8))
registry.register("seresnet50", _resnet(Bottleneck, (3, 4, 6, 3), block_args=(("attn_layer", "se"),)))
registry.register("seresnext50_32x4d", _resnet(Bottleneck, (3, 4, 6, 3), cardinality=32, base_width=4,
                                               block_args=(("attn_layer", "se"),)))
registry.register("ecaresnet50t", _resnet(Bottleneck, (3, 4, 6, 3), stem_width=32, stem_type="deep_tiered",
                                          avg_down=True, block_args=(("attn_layer", "eca"),)))
registry.register("resnetrs50", _resnet(Bottleneck, (3, 4, 6, 3), stem_width=32, stem_type="deep",
                                        replace_stem_pool=True, avg_down=True, block_args=_SE_RS))

_SK = (("sk_kwargs", (("rd_ratio", 1 / 16), ("rd_divisor", 32))),)
registry.register("skresnext50_32x4d", _resnet(SelectiveKernelBottleneck, (3, 4, 6, 3), cardinality=32,
                                               base_width=4, zero_init_last=False, block_args=_SK))

_RESNEST = (("radix", 2), ("avd", True), ("avd_first", False))
for _name, _layers, _stem in (("resnest14d", (1, 1, 1, 1), 32), ("resnest26d", (2, 2, 2, 2), 32),
                              ("resnest50d", (3, 4, 6, 3), 32), ("resnest101e", (3, 4, 23, 3), 64),
                              ("resnest200e", (3, 24, 36, 3), 64)):
  registry.register(_name, _resnet(ResNestBottleneck, _layers, stem_type="deep", stem_width=_stem,
                                   avg_down=True, block_args=_RESNEST))
