"""Backbones named and built as in timm, heads, and the registry that creates them."""

from cxflax.models import resnet  # noqa: F401  (registers the ResNet family)
from cxflax.models.registry import create_model, list_models

__all__ = ["create_model", "list_models"]
