"""Backbones named and built as in timm, heads, and the registry that creates them."""

# Importing a family registers its models.
from cxflax.models import densenet, efficientnet, fc_densenet, inception, resnet, vgg  # noqa: F401
from cxflax.models.registry import create_model, list_models
from cxflax.models.timm_weights import load_timm_weights

__all__ = ["create_model", "list_models", "load_timm_weights"]
