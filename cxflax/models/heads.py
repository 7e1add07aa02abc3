"""Task heads on a backbone's feature map, and the network that joins them.

A backbone is created with ``global_pool=''`` so that the head decides how to pool (global
average, or the hybrid pooling of seed 001) and what to predict.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cxflax.models import registry
from cxflax.models.layers import Dtype, global_pool

POOLS = ("avg", "max", "avgmax", "catavgmax", "hybrid")


def pool_features(x, pool: str):
  """Pools a NHWC feature map to (batch, features).

  'hybrid' is seed 001's hybrid pooling: a 2x2 max pool (stride 2), then the global average.
  """
  if pool == "hybrid":
    return jnp.mean(nn.max_pool(x, (2, 2), (2, 2), padding="VALID") if min(x.shape[1:3]) >= 2 else x,
                    axis=(1, 2))
  return global_pool(x, pool)


class LinearHead(nn.Module):
  """Pool → dropout → linear to `num_outputs` (1 for regression, the class count otherwise)."""
  num_outputs: int
  pool: str = "avg"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = pool_features(x, self.pool)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_outputs, dtype=self.dtype, name="fc")(x)


class Network(nn.Module):
  """A backbone's feature map fed to a head. Parameters: {'backbone': ..., 'head': ...}."""
  backbone: nn.Module
  head: nn.Module

  @nn.compact
  def __call__(self, x, train: bool = False):
    out = self.head(self.backbone(x, train=train), train=train)
    return out.astype(jnp.float32)  # losses and metrics in float32, whatever the compute dtype


HEADS = {"linear": LinearHead}


def create_network(backbone: str, head: str = "linear", num_outputs: int = 1, *,
                   pool: str = "avg", head_dropout: float = 0.0, dtype: Dtype = jnp.float32,
                   backbone_kwargs: dict | None = None) -> Network:
  """The task network: timm backbone `backbone` (unpooled) with head `head`."""
  if head not in HEADS:
    raise ValueError(f"unknown head {head!r}; known heads: {', '.join(sorted(HEADS))}")
  if pool not in POOLS:
    raise ValueError(f"unknown pool {pool!r}; use one of {', '.join(POOLS)}")
  trunk = registry.create_model(backbone, num_classes=0, global_pool="", dtype=dtype,
                                **(backbone_kwargs or {}))
  return Network(backbone=trunk, head=HEADS[head](num_outputs=num_outputs, pool=pool,
                                                  dropout=head_dropout, dtype=dtype))
