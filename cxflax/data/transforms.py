"""Preprocessing and augmentation, written in configs as op strings joined by '|'.

    config.data.train_pp = "to_rgb|resize(512)|flip_lr(0.5)|normalize('imagenet')"

Each op maps an example dict to a new one, given a numpy Generator that grain seeds per element
(so augmentation is deterministic per element and epoch). The image is float32 (H, W, C) in
[0, 1] when the first op sees it. Geometric ops move every mask ('*_mask' keys) with the image,
using nearest-neighbour sampling so masks stay binary.
"""

from __future__ import annotations

import ast
from typing import Any, Callable

import grain
import numpy as np
from PIL import Image

from cxflax.errors import ConfigError

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

_OPS: dict[str, Callable[..., Op]] = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register(name: str):
  def wrap(factory):
    _OPS[name] = factory
    return factory
  return wrap


def known_ops() -> list[str]:
  return sorted(_OPS)


def parse(spec: str) -> list[Op]:
  """The ops of a spec string such as "resize(256)|flip_lr(p=0.5)"; errors name the bad op."""
  ops = []
  for part in (p.strip() for p in spec.split("|")):
    if not part:
      continue
    try:
      call = ast.parse(part if "(" in part else part + "()", mode="eval").body
      if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise ValueError("expected name(arguments)")
      args = [ast.literal_eval(a) for a in call.args]
      kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as e:
      raise ConfigError(f"cannot parse preprocessing op {part!r} in {spec!r}: {e}") from None
    name = call.func.id
    if name not in _OPS:
      raise ConfigError(f"unknown preprocessing op {name!r} in {spec!r}; known ops: "
                        f"{', '.join(known_ops())}")
    try:
      ops.append(_OPS[name](*args, **kwargs))
    except (TypeError, ValueError) as e:
      raise ConfigError(f"bad arguments for preprocessing op {part!r}: {e}") from None
  return ops


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 / uint16 pixels to float32 in [0, 1]."""
  if image.dtype == np.uint8:
    return image.astype(np.float32) * (1.0 / 255.0)
  if image.dtype == np.uint16:
    return image.astype(np.float32) * (1.0 / 65535.0)
  return image.astype(np.float32)


class Preprocess(grain.transforms.RandomMap):
  """A grain transform running an op list on one example (image converted to float first)."""

  def __init__(self, spec: str):
    self.spec = spec
    self.ops = parse(spec)

  def random_map(self, example: Example, rng: np.random.Generator) -> Example:
    example = dict(example)
    example["image"] = to_float(example["image"])
    for op in self.ops:
      example = op(example, rng)
    return example


def _masks(example: Example) -> list[str]:
  return [k for k in example if k.endswith("_mask")]


def _resize_array(arr: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
  if arr.shape[:2] == (height, width):
    return arr
  method = Image.NEAREST if nearest else Image.BILINEAR
  if nearest:
    chans = [np.asarray(Image.fromarray(arr[..., c]).resize((width, height), method))
             for c in range(arr.shape[-1])]
  else:
    chans = [np.asarray(Image.fromarray(arr[..., c].astype(np.float32), mode="F").resize(
        (width, height), method)) for c in range(arr.shape[-1])]
  return np.stack(chans, axis=-1).astype(arr.dtype)


@register("resize")
def _resize(size, width=None) -> Op:
  """resize(s) → s×s; resize(h, w). Bilinear (antialiased) for images, nearest for masks."""
  h, w = (size, width if width is not None else size) if isinstance(size, int) else tuple(size)
  if h < 1 or w < 1:
    raise ValueError(f"resize size must be positive, got {(h, w)}")

  def apply(ex, rng):
    ex = dict(ex)
    ex["image"] = _resize_array(ex["image"], h, w, nearest=False)
    for k in _masks(ex):
      ex[k] = _resize_array(ex[k], h, w, nearest=True)
    return ex
  return apply


def _flip(axis: int, p: float) -> Op:
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"flip probability must be in [0, 1], got {p}")

  def apply(ex, rng):
    if rng.uniform() >= p:
      return ex
    ex = dict(ex)
    for k in ["image"] + _masks(ex):
      ex[k] = np.ascontiguousarray(np.flip(ex[k], axis=axis))
    return ex
  return apply


@register("flip_lr")
def _flip_lr(p: float = 0.5) -> Op:
  """Horizontal flip with probability p."""
  return _flip(1, p)


@register("flip_ud")
def _flip_ud(p: float = 0.5) -> Op:
  """Vertical flip with probability p."""
  return _flip(0, p)


@register("to_rgb")
def _to_rgb() -> Op:
  """Grayscale (1 channel) to 3 identical channels, as ImageNet backbones expect."""
  def apply(ex, rng):
    img = ex["image"]
    if img.shape[-1] == 3:
      return ex
    if img.shape[-1] != 1:
      raise ValueError(f"to_rgb: expected 1 or 3 channels, got {img.shape[-1]}")
    return {**ex, "image": np.repeat(img, 3, axis=-1)}
  return apply


@register("normalize")
def _normalize(mean="imagenet", std=None) -> Op:
  """(x - mean) / std per channel; normalize('imagenet') uses ImageNet's statistics."""
  if mean == "imagenet":
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  if std is None:
    raise ValueError("normalize needs std (or mean='imagenet')")
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  if np.any(std <= 0):
    raise ValueError(f"normalize std must be positive, got {std}")

  def apply(ex, rng):
    img = ex["image"]
    if mean.size not in (1, img.shape[-1]):
      raise ValueError(f"normalize: {mean.size} means for a {img.shape[-1]}-channel image "
                       "(add to_rgb first?)")
    return {**ex, "image": ((img - mean) / std).astype(np.float32)}
  return apply
