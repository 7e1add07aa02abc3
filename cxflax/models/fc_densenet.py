"""Fully convolutional DenseNets ("The One Hundred Layers Tiramisu", Jégou et al. 2017) for lung
segmentation, as the patch paper behind seed 003 segments chest X-rays.

Down path: 3x3 conv → [dense block → transition down (BN-ReLU-1x1 conv-dropout-2x2 max pool)]×n;
a bottleneck dense block; up path: [3x3 stride-2 transposed conv of the previous block's new
feature maps → concatenated with the skip connection → dense block]×n; 1x1 conv to per-pixel
class logits. In the up path a dense block passes on only the maps it made (the paper's fix
against feature-map explosion). Each dense layer is BN-ReLU-3x3 conv-dropout(0.2). The output
has the input's height and width, any size from 2^n px up (transposed convolutions are
center-cropped to their skip connection, so sizes need not be multiples of 2^n).

The named variants are the paper's: fc_densenet103 (growth 16, blocks 4-5-7-10-12, bottleneck
15 — the one Park et al. and seed 003 train), fc_densenet67 (growth 16, 5 layers per block) and
fc_densenet56 (growth 12, 4 layers per block); fc_densenet_tiny is ours, for CPU tests. XLA
compiles the deep variants slowly on CPU (minutes for fc_densenet103): compile once per shape.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cxflax.models import registry
from cxflax.models.layers import Conv2d, Dtype, batch_norm, max_pool, relu


class _DenseLayer(nn.Module):
  growth_rate: int
  drop_rate: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, train: bool):
    y = relu(batch_norm(train, self.dtype, name="norm")(x))
    y = Conv2d(self.growth_rate, 3, padding=1, use_bias=True, dtype=self.dtype, name="conv")(y)
    return nn.Dropout(self.drop_rate, deterministic=not train)(y)


class _DenseBlock(nn.Module):
  """num_layers dense layers; returns (input and new maps concatenated, new maps only)."""
  num_layers: int
  growth_rate: int
  drop_rate: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, train: bool):
    new = []
    for i in range(self.num_layers):
      y = _DenseLayer(self.growth_rate, self.drop_rate, self.dtype, name=f"layer{i + 1}")(x, train)
      x = jnp.concatenate([x, y], axis=-1)
      new.append(y)
    return x, jnp.concatenate(new, axis=-1)


def _center_crop(x, height: int, width: int):
  top, left = (x.shape[1] - height) // 2, (x.shape[2] - width) // 2
  return x[:, top:top + height, left:left + width]


class FCDenseNet(nn.Module):
  """Per-pixel logits (B, H, W, num_classes) for images (B, H, W, C)."""
  num_classes: int
  down_blocks: Sequence[int] = (4, 5, 7, 10, 12)
  bottleneck_layers: int = 15
  growth_rate: int = 16
  first_features: int = 48
  drop_rate: float = 0.2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.num_classes < 1:
      raise ValueError(f"FCDenseNet needs num_classes >= 1 (per-pixel classes), got {self.num_classes}")
    min_size = 2 ** len(self.down_blocks)
    if min(x.shape[1:3]) < min_size:
      raise ValueError(f"FCDenseNet with {len(self.down_blocks)} down blocks needs inputs of at least "
                       f"{min_size} px, got {x.shape[1:3]}")
    x = Conv2d(self.first_features, 3, padding=1, use_bias=True, dtype=self.dtype, name="first_conv")(x)
    skips = []
    for i, n in enumerate(self.down_blocks):
      x, _ = _DenseBlock(n, self.growth_rate, self.drop_rate, self.dtype, name=f"down{i + 1}")(x, train)
      skips.append(x)
      y = relu(batch_norm(train, self.dtype, name=f"transition_down{i + 1}_norm")(x))
      y = Conv2d(x.shape[-1], 1, use_bias=True, dtype=self.dtype, name=f"transition_down{i + 1}_conv")(y)
      y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
      x = max_pool(y, 2, 2)
    _, new = _DenseBlock(self.bottleneck_layers, self.growth_rate, self.drop_rate, self.dtype,
                         name="bottleneck")(x, train)
    for i, n in enumerate(reversed(self.down_blocks)):
      skip = skips[-(i + 1)]
      up = nn.ConvTranspose(new.shape[-1], (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype,
                            param_dtype=jnp.float32, name=f"transition_up{i + 1}")(new)
      x = jnp.concatenate([_center_crop(up, skip.shape[1], skip.shape[2]), skip.astype(up.dtype)], axis=-1)
      x, new = _DenseBlock(n, self.growth_rate, self.drop_rate, self.dtype, name=f"up{i + 1}")(x, train)
    logits = Conv2d(self.num_classes, 1, use_bias=True, dtype=self.dtype, name="final_conv")(x)
    return logits.astype(jnp.float32)


def _variant(down_blocks, bottleneck_layers, growth_rate):
  def make(num_classes: int = 2, **kwargs) -> FCDenseNet:
    return FCDenseNet(num_classes=num_classes, down_blocks=down_blocks, bottleneck_layers=bottleneck_layers,
                      growth_rate=growth_rate, **kwargs)
  return make


SEGMENTATION_MODELS = ("fc_densenet103", "fc_densenet67", "fc_densenet56", "fc_densenet_tiny")
registry.register("fc_densenet103", _variant((4, 5, 7, 10, 12), 15, 16))
registry.register("fc_densenet67", _variant((5, 5, 5, 5, 5), 5, 16))
registry.register("fc_densenet56", _variant((4, 4, 4, 4, 4), 4, 12))
# Not in the paper: small enough to train on a 2-core CPU in a minute (tests, :runlocal).
registry.register("fc_densenet_tiny", lambda num_classes=2, **kw: FCDenseNet(
    num_classes=num_classes, down_blocks=(2, 2, 2), bottleneck_layers=2, growth_rate=8, first_features=16, **kw))
