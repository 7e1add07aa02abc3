"""Inception-v3 as in timm's inception_v3.py (without the auxiliary classifier, timm's default).

Every convolution is timm's ConvNormAct (conv without bias, BatchNorm with eps 1e-3, ReLU),
unpadded unless stated; module names are timm's (Conv2d_1a_3x3, Mixed_5b.branch1x1, …).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from cxflax.models import registry
from cxflax.models.layers import ConvNormAct, Dtype, avg_pool, classifier, max_pool


def _conv(dtype):
  return functools.partial(ConvNormAct, padding=0, epsilon=1e-3, dtype=dtype)


def _pool3(x):
  return avg_pool(x, 3, 1, padding=1)  # F.avg_pool2d(3, 1, 1): padding counted


class InceptionA(nn.Module):
  pool_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = _conv(self.dtype)
    b1 = c(64, 1, name="branch1x1")(x, train)
    b5 = c(64, 5, padding=2, name="branch5x5_2")(c(48, 1, name="branch5x5_1")(x, train), train)
    b3 = c(64, 1, name="branch3x3dbl_1")(x, train)
    b3 = c(96, 3, padding=1, name="branch3x3dbl_3")(c(96, 3, padding=1, name="branch3x3dbl_2")(b3, train), train)
    bp = c(self.pool_features, 1, name="branch_pool")(_pool3(x), train)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = _conv(self.dtype)
    b3 = c(384, 3, 2, name="branch3x3")(x, train)
    bd = c(64, 1, name="branch3x3dbl_1")(x, train)
    bd = c(96, 3, 2, name="branch3x3dbl_3")(c(96, 3, padding=1, name="branch3x3dbl_2")(bd, train), train)
    return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c, c7 = _conv(self.dtype), self.channels_7x7
    row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    b1 = c(192, 1, name="branch1x1")(x, train)
    b7 = c(c7, 1, name="branch7x7_1")(x, train)
    b7 = c(c7, name="branch7x7_2", **row)(b7, train)
    b7 = c(192, name="branch7x7_3", **col)(b7, train)
    bd = c(c7, 1, name="branch7x7dbl_1")(x, train)
    for i, (width, shape) in enumerate([(c7, col), (c7, row), (c7, col), (192, row)], start=2):
      bd = c(width, name=f"branch7x7dbl_{i}", **shape)(bd, train)
    bp = c(192, 1, name="branch_pool")(_pool3(x), train)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = _conv(self.dtype)
    b3 = c(320, 3, 2, name="branch3x3_2")(c(192, 1, name="branch3x3_1")(x, train), train)
    b7 = c(192, 1, name="branch7x7x3_1")(x, train)
    b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7, train)
    b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7, train)
    b7 = c(192, 3, 2, name="branch7x7x3_4")(b7, train)
    return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = _conv(self.dtype)
    row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
    b1 = c(320, 1, name="branch1x1")(x, train)
    b3 = c(384, 1, name="branch3x3_1")(x, train)
    b3 = jnp.concatenate([c(384, name="branch3x3_2a", **row)(b3, train),
                          c(384, name="branch3x3_2b", **col)(b3, train)], axis=-1)
    bd = c(448, 1, name="branch3x3dbl_1")(x, train)
    bd = c(384, 3, padding=1, name="branch3x3dbl_2")(bd, train)
    bd = jnp.concatenate([c(384, name="branch3x3dbl_3a", **row)(bd, train),
                          c(384, name="branch3x3dbl_3b", **col)(bd, train)], axis=-1)
    bp = c(192, 1, name="branch_pool")(_pool3(x), train)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """timm's inception_v3 (aux_logits=False). Needs inputs of at least 75 px."""
  num_classes: int = 1000
  global_pool: str = "avg"
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if min(x.shape[1:3]) < 75:
      raise ValueError(f"inception_v3 needs inputs of at least 75x75 px, got {x.shape[1:3]}")
    c = _conv(self.dtype)
    x = x.astype(self.dtype)
    x = c(32, 3, 2, name="Conv2d_1a_3x3")(x, train)
    x = c(32, 3, name="Conv2d_2a_3x3")(x, train)
    x = c(64, 3, padding=1, name="Conv2d_2b_3x3")(x, train)
    x = max_pool(x, 3, 2)
    x = c(80, 1, name="Conv2d_3b_1x1")(x, train)
    x = c(192, 3, name="Conv2d_4a_3x3")(x, train)
    x = max_pool(x, 3, 2)
    for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool, self.dtype, name=name)(x, train)
    x = InceptionB(self.dtype, name="Mixed_6a")(x, train)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, self.dtype, name=name)(x, train)
    x = InceptionD(self.dtype, name="Mixed_7a")(x, train)
    x = InceptionE(self.dtype, name="Mixed_7b")(x, train)
    x = InceptionE(self.dtype, name="Mixed_7c")(x, train)
    return classifier(x, num_classes=self.num_classes, pool_type=self.global_pool,
                      drop_rate=self.drop_rate, train=train, dtype=self.dtype)


registry.register("inception_v3", lambda **kw: InceptionV3(**kw))
