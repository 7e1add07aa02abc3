"""DenseNet-BC as in timm's densenet.py (densenet121, densenet161, densenet169).

Parameters sit under 'features' as in timm (features.denseblock1.denselayer1.norm1 …) so that
timm weights load by name. Norms are timm's BatchNormAct2d: BatchNorm then ReLU.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cxflax.models import registry
from cxflax.models.layers import Conv2d, Dtype, avg_pool, batch_norm, classifier, max_pool, relu


def _norm_act(x, train, dtype, name):
  return relu(batch_norm(train, dtype, name=name)(x))


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv to bn_size·k channels, BN-ReLU-3x3 conv to k new channels."""
  growth_rate: int
  bn_size: int
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    y = Conv2d(self.bn_size * self.growth_rate, 1, dtype=self.dtype, name="conv1")(
        _norm_act(x, train, self.dtype, "norm1"))
    y = Conv2d(self.growth_rate, 3, padding=1, dtype=self.dtype, name="conv2")(
        _norm_act(y, train, self.dtype, "norm2"))
    return nn.Dropout(self.drop_rate, deterministic=not train)(y)


class DenseBlock(nn.Module):
  num_layers: int
  growth_rate: int
  bn_size: int
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    features = [x]
    for i in range(self.num_layers):
      new = DenseLayer(self.growth_rate, self.bn_size, self.drop_rate, self.dtype,
                       name=f"denselayer{i + 1}")(jnp.concatenate(features, axis=-1), train)
      features.append(new)
    return jnp.concatenate(features, axis=-1)


class DenseTransition(nn.Module):
  """BN-ReLU, 1x1 conv halving the channels, 2x2 average pool."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = Conv2d(self.features, 1, dtype=self.dtype, name="conv")(_norm_act(x, train, self.dtype, "norm"))
    return avg_pool(x, 2, 2)


class _Features(nn.Module):
  growth_rate: int
  block_config: tuple[int, ...]
  bn_size: int
  proj_drop_rate: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, train: bool):
    channels = 2 * self.growth_rate
    x = Conv2d(channels, 7, 2, padding=3, dtype=self.dtype, name="conv0")(x)
    x = max_pool(_norm_act(x, train, self.dtype, "norm0"), 3, 2, padding=1)
    for i, n in enumerate(self.block_config):
      x = DenseBlock(n, self.growth_rate, self.bn_size, self.proj_drop_rate, self.dtype,
                     name=f"denseblock{i + 1}")(x, train)
      channels += n * self.growth_rate
      if i != len(self.block_config) - 1:
        channels //= 2
        x = DenseTransition(channels, self.dtype, name=f"transition{i + 1}")(x, train)
    return _norm_act(x, train, self.dtype, "norm5")


class DenseNet(nn.Module):
  """timm's DenseNet; __call__ returns logits, the pooled embedding (num_classes=0) or the final
  feature map (global_pool='')."""
  growth_rate: int = 32
  block_config: tuple[int, ...] = (6, 12, 24, 16)
  bn_size: int = 4
  num_classes: int = 1000
  global_pool: str = "avg"
  drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _Features(self.growth_rate, self.block_config, self.bn_size, self.proj_drop_rate,
                  self.dtype, name="features")(x.astype(self.dtype), train)
    return classifier(x, num_classes=self.num_classes, pool_type=self.global_pool,
                      drop_rate=self.drop_rate, train=train, dtype=self.dtype, fc_name="classifier")


for _name, _growth, _blocks in (("densenet121", 32, (6, 12, 24, 16)), ("densenet169", 32, (6, 12, 32, 32)),
                                ("densenet161", 48, (6, 12, 36, 24))):
  registry.register(_name, lambda _g=_growth, _b=_blocks, **kw: DenseNet(growth_rate=_g, block_config=_b, **kw))
