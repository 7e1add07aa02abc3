"""Task heads on a backbone's feature map, and the network that joins them.

A backbone is created with ``global_pool=''`` so that the head decides how to pool (global
average, or the hybrid pooling of seed 001) and what to predict.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from cxflax.errors import CheckpointError
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


def with_backbone(variables: dict, backbone: dict) -> dict:
  """`variables` of a Network with its backbone replaced by pretrained `backbone` variables
  (e.g. from python -m cxflax.convert). Variables the unpooled backbone lacks (the pretrained
  classifier) are dropped; missing or wrongly shaped ones are an error that names them."""
  out = {col: dict(tree) for col, tree in variables.items()}
  for col in ("params", "batch_stats"):
    want = traverse_util.flatten_dict(dict(variables.get(col, {}).get("backbone", {})))
    got = traverse_util.flatten_dict(dict(backbone.get(col, {})))
    missing = sorted("/".join(k) for k in want if k not in got)
    shapes = sorted(f"{'/'.join(k)}: {tuple(got[k].shape)} vs {tuple(want[k].shape)}"
                    for k in want if k in got and tuple(got[k].shape) != tuple(want[k].shape))
    if missing or shapes:
      raise CheckpointError(f"pretrained backbone does not fit the model: missing {col} "
                            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; wrong shapes "
                            f"{shapes[:5]}")
    if want:
      out[col]["backbone"] = traverse_util.unflatten_dict(
          {k: jnp.asarray(got[k], want[k].dtype) for k in want})
  return out


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
