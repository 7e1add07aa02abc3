"""Layouts by name: each layout module registers how to open it from the config with
``@register(name)``, so that a new layout is one new module, not an edit here."""

from __future__ import annotations

from typing import Callable

from cxflax.data.sources.base import SPLITS, SegmentationTarget, Source, WithMasks
from cxflax.errors import ConfigError
from cxflax.registry import Registry

# config.data.source → factory(data_config, split, unlabeled_ok) → Source
Factory = Callable[..., Source]
SOURCES: Registry[Factory] = Registry("data source", ConfigError, "config.data.source")
register = SOURCES.register


def known_sources() -> list[str]:
  return SOURCES.names()


def make_source(data_config, split: str = "train", unlabeled_ok: bool = False) -> Source:
  """The source named by ``config.data.source`` for `split` ('train', 'val' or 'test');
  unlabeled_ok lets a split without labels through (per_covid19's Val/, for prediction)."""
  name = data_config.source
  if split not in SPLITS:
    raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
  source = SOURCES.get(name)(data_config, split, unlabeled_ok)
  if data_config.get("mask_dir"):
    source = WithMasks(source, data_config.mask_dir)
  if data_config.get("target", "label") != "label":
    source = SegmentationTarget(source, data_config.target)
  return source
