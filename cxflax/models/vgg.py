"""VGG-19 with batch norm as in timm's vgg.py.

timm's VGG keeps the classic 4096-wide fully connected layers as convolutions ('pre_logits':
a 7x7 conv and a 1x1 conv, each followed by ReLU and dropout) before its classifier head
('head.fc'). Inputs whose feature map is smaller than 7x7 are first average-pooled up to 7x7
(adaptive average pooling), as timm does.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cxflax.models import registry
from cxflax.models.layers import Conv2d, Dtype, batch_norm, global_pool, max_pool, relu

VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M")


def adaptive_avg_pool(x, out_h: int, out_w: int):
  """torch.nn.functional.adaptive_avg_pool2d: window i spans [floor(i·H/O), ceil((i+1)·H/O))."""
  h, w = x.shape[1:3]
  rows = [jnp.mean(x[:, (i * h) // out_h:-(-((i + 1) * h) // out_h)], axis=1) for i in range(out_h)]
  x = jnp.stack(rows, axis=1)
  cols = [jnp.mean(x[:, :, (j * w) // out_w:-(-((j + 1) * w) // out_w)], axis=2) for j in range(out_w)]
  return jnp.stack(cols, axis=2)


class _ConvMlp(nn.Module):
  features: int = 4096
  kernel_size: int = 7
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    k = self.kernel_size
    if x.shape[1] < k or x.shape[2] < k:
      x = adaptive_avg_pool(x, max(k, x.shape[1]), max(k, x.shape[2]))
    x = relu(Conv2d(self.features, k, padding=0, use_bias=True, dtype=self.dtype, name="fc1")(x))
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return relu(Conv2d(self.features, 1, padding=0, use_bias=True, dtype=self.dtype, name="fc2")(x))


class _Head(nn.Module):
  num_classes: int
  drop_rate: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, train: bool, pool: str):
    x = global_pool(x, pool)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


class VGG(nn.Module):
  """timm's VGG with BatchNorm. num_classes=0 returns the pooled 4096-d pre-logits,
  global_pool='' their unpooled map."""
  cfg: tuple = VGG19
  num_classes: int = 1000
  global_pool: str = "avg"
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    index = 0  # position in timm's 'features' Sequential (conv, bn, relu per conv; pool)
    for v in self.cfg:
      if v == "M":
        x = max_pool(x, 2, 2)
        index += 1
      else:
        x = Conv2d(v, 3, padding=1, use_bias=True, dtype=self.dtype, name=f"features_{index}")(x)
        x = relu(batch_norm(train, self.dtype, name=f"features_{index + 1}")(x))
        index += 3
    x = _ConvMlp(drop_rate=self.drop_rate, dtype=self.dtype, name="pre_logits")(x, train)
    if not self.global_pool:
      return x
    if self.num_classes <= 0:
      return global_pool(x, self.global_pool)
    return _Head(self.num_classes, self.drop_rate, self.dtype, name="head")(x, train, self.global_pool)


registry.register("vgg19_bn", lambda **kw: VGG(cfg=VGG19, **kw))
