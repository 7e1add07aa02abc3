"""Matching one variable tree against another, by path and shape.

Restoring a checkpoint, warm-starting from another run, placing ensemble members and loading
pretrained backbones all ask the same question: which of the variables a model wants does a
given tree hold, with the right shape? Answered once here (no cxflax imports, so that train/
and models/ can both use it).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import traverse_util


def flat(tree) -> dict[str, Any]:
  """A nested variable tree as {'a/b/kernel': leaf} (empty subtrees dropped)."""
  return traverse_util.flatten_dict(dict(tree), sep="/")


def unflat(leaves: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict(leaves, sep="/")


class Match:
  """How tree `got` fits tree `want` (leaves: arrays, or anything with .shape and .dtype).

  Paths are '/'-joined; `missing`, `unexpected` and `wrong_shape` are sorted, `fresh` keeps
  want's order.
  """

  def __init__(self, want, got):
    self.want, self.got = flat(want), flat(got)

  def fits(self, path: str) -> bool:
    return path in self.got and tuple(self.got[path].shape) == tuple(self.want[path].shape)

  @property
  def missing(self) -> list[str]:
    """Wanted, absent from `got`."""
    return sorted(k for k in self.want if k not in self.got)

  @property
  def unexpected(self) -> list[str]:
    """In `got`, not wanted."""
    return sorted(k for k in self.got if k not in self.want)

  @property
  def wrong_shape(self) -> list[str]:
    """In both, with different shapes."""
    return sorted(k for k in self.want if k in self.got and not self.fits(k))

  @property
  def fresh(self) -> list[str]:
    """Wanted, and not supplied by `got` (missing or wrongly shaped)."""
    return [k for k in self.want if not self.fits(k)]

  def shapes(self, path: str) -> tuple[tuple, tuple]:
    """(got's shape, want's shape) at `path`."""
    return tuple(self.got[path].shape), tuple(self.want[path].shape)

  def filled(self) -> dict:
    """want's tree with every variable that fits taken from `got`, cast to want's dtype."""
    return unflat({k: jnp.asarray(self.got[k], v.dtype) if self.fits(k) else v
                   for k, v in self.want.items()})
