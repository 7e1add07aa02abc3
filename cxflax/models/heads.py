"""Task heads on a backbone's feature map, and the network that joins them.

A backbone is created with ``global_pool=''`` so that the head decides how to pool (global
average, or the hybrid pooling of seed 001) and what to predict.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxflax import trees
from cxflax.errors import CheckpointError
from cxflax.models import registry
from cxflax.models.layers import Dtype, batch_norm, global_pool, relu
from cxflax.registry import Registry

POOLS = ("avg", "max", "avgmax", "catavgmax", "hybrid")


def pool_features(x, pool: str):
  """Pools a NHWC feature map to (batch, features).

  'hybrid' is seed 001's hybrid pooling: a 2x2 max pool (stride 2), then the global average.
  """
  if pool == "hybrid":
    return jnp.mean(nn.max_pool(x, (2, 2), (2, 2), padding="VALID") if min(x.shape[1:3]) >= 2 else x,
                    axis=(1, 2))
  return global_pool(x, pool)


def _features(x, pool: str):
  """Pooled features of a feature map; 2-D inputs (a backbone that ends in its own classifier,
  as in seed 000's members) pass through."""
  return x if x.ndim == 2 else pool_features(x, pool)


class LinearHead(nn.Module):
  """Pool → dropout → linear to `num_outputs` (1 for regression, the class count otherwise)."""
  num_outputs: int
  pool: str = "avg"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dropout(self.dropout, deterministic=not train)(_features(x, self.pool))
    return nn.Dense(self.num_outputs, dtype=self.dtype, name="fc")(x)


class MLPHead(nn.Module):
  """Seed 000's head: linear layers of `hidden` widths (500, 250) with ReLU, then the output."""
  num_outputs: int
  hidden: tuple[int, ...] = (500, 250)
  pool: str = "avg"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _features(x, self.pool)
    for i, width in enumerate(self.hidden):
      x = relu(nn.Dense(width, dtype=self.dtype, name=f"fc{i + 1}")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_outputs, dtype=self.dtype, name=f"fc{len(self.hidden) + 1}")(x)


class MultiTaskHead(nn.Module):
  """Seed 001's multi-task head: a linear layer to 101 bins (percentages 0..100) whose softmax
  gives a distribution and its expectation, and a 101 → 1 linear regressor on those
  probabilities, whose output is the prediction."""
  num_bins: int = 101
  pool: str = "avg"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dropout(self.dropout, deterministic=not train)(_features(x, self.pool))
    bins = nn.Dense(self.num_bins, dtype=self.dtype, name="bins")(x).astype(jnp.float32)
    value = nn.Dense(1, dtype=jnp.float32, name="regressor")(jax.nn.softmax(bins, axis=-1))
    return {"prediction": value, "bins": bins}


class FastaiHead(nn.Module):
  """fastai's create_head (seed 002): concatenated average and max pooling, BatchNorm, dropout
  ps/2, linear to `hidden`, ReLU, BatchNorm, dropout ps, linear to the outputs."""
  num_outputs: int
  hidden: int = 512
  ps: float = 0.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x if x.ndim == 2 else global_pool(x, "catavgmax")
    x = batch_norm(train, self.dtype, name="bn1")(x)
    x = nn.Dropout(self.ps / 2, deterministic=not train)(x)
    x = relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
    x = batch_norm(train, self.dtype, name="bn2")(x)
    x = nn.Dropout(self.ps, deterministic=not train)(x)
    return nn.Dense(self.num_outputs, dtype=self.dtype, name="fc2")(x)


def _embed(x, hidden, dim: int, pool: str, dtype):
  """Linear layers fc1.. with ReLU to an L2-normalised embedding, in the caller's scope, so that
  the embedding and the classifier built on it share parameter names (seed 004's phases)."""
  x = _features(x, pool)
  for i, width in enumerate(hidden):
    x = relu(nn.Dense(width, dtype=dtype, name=f"fc{i + 1}")(x))
  x = nn.Dense(dim, dtype=dtype, name=f"fc{len(hidden) + 1}")(x).astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class EmbeddingHead(nn.Module):
  """Seed 004's embedding network head: linear layers with ReLU to an L2-normalised embedding."""
  hidden: tuple[int, ...] = (1024, 1024)
  dim: int = 512
  pool: str = "avg"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    return _embed(x, self.hidden, self.dim, self.pool, self.dtype)


class EmbeddingClassifierHead(nn.Module):
  """Seed 004's third phase: classification layers (cls1..) on the embedding (fc1..), whose
  parameters keep the embedding head's names so they load from the triplet phase's run. By
  default one linear layer (cls1), as the report adds; `hidden` widths put ReLU layers before it."""
  num_outputs: int
  hidden: tuple[int, ...] = ()
  embedding_hidden: tuple[int, ...] = (1024, 1024)
  embedding_dim: int = 512
  pool: str = "avg"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    e = _embed(x, self.embedding_hidden, self.embedding_dim, self.pool, self.dtype)
    for i, width in enumerate(self.hidden):
      e = relu(nn.Dense(width, dtype=self.dtype, name=f"cls{i + 1}")(e))
    return nn.Dense(self.num_outputs, dtype=self.dtype, name=f"cls{len(self.hidden) + 1}")(e)


class Network(nn.Module):
  """A backbone's feature map fed to a head. Parameters: {'backbone': ..., 'head': ...}."""
  backbone: nn.Module
  head: nn.Module

  @nn.compact
  def __call__(self, x, train: bool = False):
    out = self.head(self.backbone(x, train=train), train=train)
    # losses and metrics in float32, whatever the compute dtype
    return jax.tree.map(lambda o: o.astype(jnp.float32), out)


# config.head → fn(num_outputs, pool, dropout, dtype, **head_kwargs) → the head module.
HEADS: Registry[Callable[..., nn.Module]] = Registry("head")


@HEADS.register("linear")
def _linear(num_outputs, pool, dropout, dtype, **kwargs):
  return LinearHead(num_outputs, pool, dropout, dtype, **kwargs)


@HEADS.register("mlp")
def _mlp(num_outputs, pool, dropout, dtype, **kwargs):
  return MLPHead(num_outputs, pool=pool, dropout=dropout, dtype=dtype, **kwargs)


@HEADS.register("multitask")
def _multitask(num_outputs, pool, dropout, dtype, **kwargs):  # one output, by construction
  return MultiTaskHead(pool=pool, dropout=dropout, dtype=dtype, **kwargs)


@HEADS.register("fastai")
def _fastai(num_outputs, pool, dropout, dtype, **kwargs):  # pools and drops out its own way
  return FastaiHead(num_outputs, dtype=dtype, **kwargs)


@HEADS.register("embedding")
def _embedding(num_outputs, pool, dropout, dtype, **kwargs):  # its width is kwargs' dim
  return EmbeddingHead(pool=pool, dtype=dtype, **kwargs)


@HEADS.register("embedding_classifier")
def _embedding_classifier(num_outputs, pool, dropout, dtype, **kwargs):
  return EmbeddingClassifierHead(num_outputs, pool=pool, dtype=dtype, **kwargs)


def make_head(name: str, num_outputs: int, pool: str = "avg", dropout: float = 0.0,
              dtype: Dtype = jnp.float32, **kwargs) -> nn.Module:
  """A head by name (see HEADS); kwargs are the head's own fields (e.g. hidden=(500, 250))."""
  if pool not in POOLS:
    raise ValueError(f"unknown pool {pool!r}; use one of {', '.join(POOLS)}")
  return HEADS.get(name)(num_outputs, pool, dropout, dtype, **kwargs)


def with_backbone(variables: dict, backbone: dict) -> dict:
  """`variables` of a Network with its backbone replaced by pretrained `backbone` variables
  (e.g. from python -m cxflax.convert). Variables the unpooled backbone lacks (the pretrained
  classifier) are dropped; missing or wrongly shaped ones are an error that names them."""
  out = {col: dict(tree) for col, tree in variables.items()}
  for col in ("params", "batch_stats"):
    want = dict(variables.get(col, {}).get("backbone", {}))
    m = trees.Match(want, dict(backbone.get(col, {})))
    shapes = [f"{p}: {m.shapes(p)[0]} vs {m.shapes(p)[1]}" for p in m.wrong_shape]
    if m.missing or shapes:
      raise CheckpointError(f"pretrained backbone does not fit the model: missing {col} "
                            f"{m.missing[:5]}{' ...' if len(m.missing) > 5 else ''}; wrong shapes "
                            f"{shapes[:5]}")
    if want:
      out[col]["backbone"] = m.filled()
  return out


def create_network(backbone: str, head: str = "linear", num_outputs: int = 1, *,
                   pool: str = "avg", head_dropout: float = 0.0, dtype: Dtype = jnp.float32,
                   backbone_kwargs: dict | None = None, head_kwargs: dict | None = None,
                   backbone_classes: int = 0) -> Network:
  """The task network: timm backbone `backbone` with head `head`.

  The backbone is unpooled (its last feature map goes to the head) unless backbone_classes > 0,
  which keeps timm's own classifier (seed 000 puts its head on the 1000 ImageNet logits).
  """
  kw = dict(backbone_kwargs or {})
  if backbone_classes:
    trunk = registry.create_model(backbone, num_classes=backbone_classes, dtype=dtype, **kw)
  else:
    trunk = registry.create_model(backbone, num_classes=0, global_pool="", dtype=dtype, **kw)
  return Network(backbone=trunk, head=make_head(head, num_outputs, pool, head_dropout, dtype,
                                                **dict(head_kwargs or {})))
