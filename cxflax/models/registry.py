"""Model registry: timm's names → flax.linen constructors."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

from cxflax.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register(name: str, constructor: Callable[..., nn.Module]) -> None:
  MODELS.add(name, constructor)


def list_models() -> list[str]:
  """Names of every model create_model knows, as timm names them."""
  return MODELS.names()


def create_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
  """The flax.linen module of timm's model `name`.

  kwargs are the model's timm arguments (drop_rate, drop_path_rate, global_pool, ...) plus
  dtype (computation dtype; parameters stay float32). num_classes=0 gives the pooled embedding,
  global_pool='' the unpooled feature map.
  """
  return MODELS.get(name)(num_classes=num_classes, **kwargs)
