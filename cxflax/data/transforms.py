"""Preprocessing and augmentation, written in configs as op strings joined by '|'.

    config.data.train_pp = "to_rgb|resize(512)|rand_augment(2, 9)|flip_lr(0.5)|normalize('imagenet')"

Each op maps an example dict to a new one, given a numpy Generator that grain seeds per element
(so augmentation is deterministic per element and epoch). The image is float32 (H, W, C) in
[0, 1] when the first op sees it. Geometric ops move every mask ('*_mask' keys) with the image,
using nearest-neighbour sampling so masks stay binary.

Ops: resize, center_crop, random_crop, random_resized_crop, flip_lr, flip_ud, dihedral, rotate,
zoom, shift_scale_rotate, rand_augment, color_jitter, lighting, to_rgb, to_gray, equalize, gamma,
normalize ('imagenet', 'inception' — mean 0.5, std 0.5 — 'dataset' — the training split's
statistics, filled in at start-up — 'xrv', or explicit mean and std), mask_image and append_mask
(for patch classifiers).
"""

from __future__ import annotations

import ast
import math
from typing import Any, Callable

import grain
import numpy as np
from PIL import Image

from cxflax.errors import ConfigError
from cxflax.registry import Registry

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

# op name → factory(*args, **kwargs) → Op
OPS: Registry[Callable[..., Op]] = Registry("preprocessing op", ConfigError)
register = OPS.register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's IMAGENET_INCEPTION_MEAN / _STD: what its Inception-v3 weights expect, and FLANNEL's
# Normalize((0.5,), (0.5,)) for every base learner (seed 003).
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
# resize's interpolation names → PIL filters (images; masks are always resized nearest)
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


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
    if name not in OPS:
      raise ConfigError(f"unknown preprocessing op {name!r} in {spec!r}; known ops: "
                        f"{', '.join(OPS.names())}")
    try:
      ops.append(OPS.get(name)(*args, **kwargs))
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


def _resize_array(arr: np.ndarray, height: int, width: int, nearest: bool,
                  method: int = Image.BILINEAR) -> np.ndarray:
  """arr resized per channel: nearest (masks) or with PIL filter `method` on float32 pixels."""
  if arr.shape[:2] == (height, width):
    return arr
  method = Image.NEAREST if nearest else method
  if nearest:
    chans = [np.asarray(Image.fromarray(arr[..., c]).resize((width, height), method))
             for c in range(arr.shape[-1])]
  else:
    chans = [np.asarray(Image.fromarray(arr[..., c].astype(np.float32), mode="F").resize(
        (width, height), method)) for c in range(arr.shape[-1])]
  return np.stack(chans, axis=-1).astype(arr.dtype)


@register("resize")
def _resize(size, width=None, interpolation: str = "bilinear") -> Op:
  """resize(s) → s×s; resize(h, w). Images with PIL's antialiased `interpolation` (bilinear,
  bicubic — torchvision's Resize(..., Image.BICUBIC), as FLANNEL loads its X-rays — or
  nearest); masks always nearest, so they stay binary."""
  h, w = _hw(size, width)
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"resize interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                     f"got {interpolation!r}")
  method = INTERPOLATIONS[interpolation]

  def apply(ex, rng):
    ex = dict(ex)
    ex["image"] = _resize_array(ex["image"], h, w, nearest=False, method=method)
    for k in _masks(ex):
      ex[k] = _resize_array(ex[k], h, w, nearest=True)
    return ex
  return apply


def _flip(axis: int, p: float) -> Op:
  _prob(p)

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


@register("dihedral")
def _dihedral(p: float = 1.0) -> Op:
  """fastai v1's dihedral_affine (what get_transforms(flip_vert=True) uses for its flips): one of
  the 8 symmetries of the square, uniformly: horizontal flip, vertical flip and transposition
  each on or off. Square images only (a transposition would change the shape)."""
  _prob(p)

  def apply(ex, rng):
    if rng.uniform() >= p:
      return ex
    h, w = ex["image"].shape[:2]
    if h != w:
      raise ValueError(f"dihedral: the image is {h}x{w}; transposing needs a square image (resize first)")
    k = int(rng.integers(0, 8))
    ex = dict(ex)
    for key in ["image"] + _masks(ex):
      a = ex[key]
      if k & 1:
        a = np.flip(a, axis=1)
      if k & 2:
        a = np.flip(a, axis=0)
      if k & 4:
        a = np.swapaxes(a, 0, 1)
      ex[key] = np.ascontiguousarray(a)
    return ex
  return apply


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


@register("to_gray")
def _to_gray() -> Op:
  """RGB to one luminance channel (ITU-R 601, as PIL's 'L')."""
  def apply(ex, rng):
    img = ex["image"]
    return ex if img.shape[-1] == 1 else {**ex, "image": _luminance(img)}
  return apply


@register("equalize")
def _equalize(bins: int = 256) -> Op:
  """Histogram equalisation of each channel (the patch paper's X-ray preprocessing): values
  mapped through their cumulative distribution to [0, 1]."""
  def apply(ex, rng):
    img = ex["image"]
    out = np.empty_like(img, np.float32)
    for c in range(img.shape[-1]):
      q = np.clip((img[..., c] * (bins - 1)).round().astype(np.int64), 0, bins - 1)
      cdf = np.cumsum(np.bincount(q.ravel(), minlength=bins)).astype(np.float64)
      lo = cdf[cdf > 0][0]
      out[..., c] = ((cdf[q] - lo) / max(cdf[-1] - lo, 1.0)).astype(np.float32)
    return {**ex, "image": out}
  return apply


@register("gamma")
def _gamma(gamma: float = 0.5) -> Op:
  """x ** gamma on [0, 1] images (the patch paper's brightness correction after equalisation)."""
  if gamma <= 0:
    raise ValueError(f"gamma must be positive, got {gamma}")

  def apply(ex, rng):
    return {**ex, "image": np.power(np.clip(ex["image"], 0, 1), gamma).astype(np.float32)}
  return apply


def _mask_of(ex: Example, key: str, op: str) -> np.ndarray:
  if key not in ex:
    raise ValueError(f"{op}: the example has no {key!r} (known masks: {_masks(ex)}; for files on "
                     "disk set config.data.mask_dir)")
  mask = np.asarray(ex[key])
  if mask.shape[:2] != ex["image"].shape[:2]:
    raise ValueError(f"{op}: {key} is {mask.shape[:2]} but the image is {ex['image'].shape[:2]}")
  return (mask.reshape(mask.shape[:2] + (1,)) > 0).astype(np.float32)


@register("mask_image")
def _mask_image(key: str = "lung_mask") -> Op:
  """The image multiplied by a mask (black outside the lungs), as the patch classifier sees it."""
  def apply(ex, rng):
    return {**ex, "image": (ex["image"] * _mask_of(ex, key, "mask_image")).astype(np.float32)}
  return apply


@register("append_mask")
def _append_mask(key: str = "lung_mask") -> Op:
  """The mask as one more (last) image channel, for models that sample patches inside it.
  Last in a spec: after normalize, which must not touch it."""
  def apply(ex, rng):
    return {**ex, "image": np.concatenate([ex["image"], _mask_of(ex, key, "append_mask")], -1)}
  return apply


@register("normalize")
def _normalize(mean="imagenet", std=None) -> Op:
  """(x - mean) / std per channel. normalize('imagenet'): ImageNet's statistics;
  normalize('inception'): mean 0.5, std 0.5 ([0, 1] → [-1, 1]); normalize('xrv'):
  torchxrayvision's [-1024, 1024] range; normalize('dataset'): the training split's statistics,
  which the pipeline computes at start-up and writes into the spec."""
  if mean == "dataset":
    raise ValueError("normalize('dataset') is resolved by the input pipeline from the training "
                     "split; it cannot be used on its own")
  if mean == "xrv":
    mean, std = (0.5,), (1.0 / 2048.0,)
  elif mean == "imagenet":
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  elif mean == "inception":
    mean, std = INCEPTION_MEAN, INCEPTION_STD
  elif isinstance(mean, str):
    raise ValueError(f"normalize: unknown statistics {mean!r}; named ones are 'imagenet', "
                     "'inception', 'xrv' and 'dataset'")
  if std is None:
    raise ValueError("normalize needs std (or mean='imagenet', 'inception', 'xrv' or 'dataset')")
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


# --- geometry -----------------------------------------------------------------------------------


BORDERS = ("constant", "reflect_101")


def _warp(arr: np.ndarray, inverse: np.ndarray, out_hw: tuple[int, int], nearest: bool,
          fill: float = 0.0, border: str = "constant") -> np.ndarray:
  """Samples arr at inverse @ (x, y, 1) for every output pixel (x right, y down, pixel centres
  at +0.5): PIL's affine transform per channel, bilinear or nearest. Outside the image: `fill`
  ('constant'), or the image mirrored about its edge pixels ('reflect_101', OpenCV's
  BORDER_REFLECT_101: ... 2 1 | 0 1 2 ... n-1 | n-2 ...), which PIL lacks, so the image is
  padded that way as far as any sample reaches and sampled there."""
  h, w = out_hw
  if border == "reflect_101":
    corners = inverse @ np.array([[0, w, 0, w], [0, 0, h, h], [1, 1, 1, 1]], np.float64)
    reach = max(0.0, -corners[0].min(), -corners[1].min(), corners[0].max() - arr.shape[1],
                corners[1].max() - arr.shape[0])
    pad = int(math.ceil(reach)) + 2  # + the bilinear neighbours of the outermost samples
    # numpy's 'reflect' (edge not repeated) is REFLECT_101, repeated for pads wider than the image.
    arr_in = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    inverse = np.array([[1, 0, pad], [0, 1, pad], [0, 0, 1]], np.float64) @ inverse
  elif border == "constant":
    arr_in = arr
  else:
    raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
  coeffs = tuple(float(v) for v in inverse[:2].reshape(-1))
  method = Image.NEAREST if nearest else Image.BILINEAR
  chans = []
  for c in range(arr_in.shape[-1]):
    src = (Image.fromarray(arr_in[..., c]) if nearest
           else Image.fromarray(arr_in[..., c].astype(np.float32), mode="F"))
    chans.append(np.asarray(src.transform((w, h), Image.AFFINE, coeffs, resample=method,
                                          fillcolor=0 if nearest else fill)))
  return np.stack(chans, axis=-1).astype(arr.dtype)


def _affine(ex: Example, inverse: np.ndarray, out_hw=None, border: str = "constant",
            nearest: bool = False) -> Example:
  """The image (bilinear, or nearest) and its masks (nearest) sampled at inverse @ (x, y, 1)."""
  out_hw = out_hw or ex["image"].shape[:2]
  ex = dict(ex)
  ex["image"] = _warp(ex["image"], inverse, out_hw, nearest=nearest, border=border)
  for k in _masks(ex):
    ex[k] = _warp(ex[k], inverse, out_hw, nearest=True, border=border)
  return ex


def _about_centre(h: int, w: int, angle_deg=0.0, scale=1.0, shear=(0.0, 0.0), shift=(0.0, 0.0)):
  """Output→input pixel mapping of a rotation, scale and shear about the image centre followed
  by a shift of (dx, dy) pixels."""
  cx, cy = w / 2.0, h / 2.0
  a = math.radians(angle_deg)
  rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
  sh = np.array([[1, shear[0], 0], [shear[1], 1, 0], [0, 0, 1]])
  sc = np.diag([scale, scale, 1.0])
  to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
  back = np.array([[1, 0, cx + shift[0]], [0, 1, cy + shift[1]], [0, 0, 1]])
  forward = back @ rot @ sh @ sc @ to_centre  # input → output
  return np.linalg.inv(forward)


def _crop(ex: Example, top: int, left: int, h: int, w: int, out_hw=None) -> Example:
  """Crops (and, given out_hw, resizes) the image and its masks."""
  ex = dict(ex)
  for k in ["image"] + _masks(ex):
    ex[k] = ex[k][top:top + h, left:left + w]
  if out_hw:
    ex["image"] = _resize_array(ex["image"], *out_hw, nearest=False)
    for k in _masks(ex):
      ex[k] = _resize_array(ex[k], *out_hw, nearest=True)
  return ex


def _pad_to(ex: Example, h: int, w: int) -> Example:
  """The image and its masks padded with zeros on both sides to at least h×w (for crops)."""
  ih, iw = ex["image"].shape[:2]
  if ih >= h and iw >= w:
    return ex
  pad = ((max(0, (h - ih + 1) // 2),) * 2, (max(0, (w - iw + 1) // 2),) * 2, (0, 0))
  return {k: (np.pad(v, pad) if k == "image" or k.endswith("_mask") else v) for k, v in ex.items()}


def _hw(size, width=None) -> tuple[int, int]:
  h, w = (size, width if width is not None else size) if isinstance(size, int) else tuple(size)
  if h < 1 or w < 1:
    raise ValueError(f"size must be positive, got {(h, w)}")
  return int(h), int(w)


def _prob(p: float) -> float:
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"probability must be in [0, 1], got {p}")
  return p


@register("center_crop")
def _center_crop(size, width=None) -> Op:
  """The central size×size (or h×w) window, padded with zeros where the image is smaller."""
  h, w = _hw(size, width)

  def apply(ex, rng):
    ex = _pad_to(ex, h, w)
    ih, iw = ex["image"].shape[:2]
    return _crop(ex, (ih - h) // 2, (iw - w) // 2, h, w)
  return apply


@register("random_crop")
def _random_crop(size, width=None) -> Op:
  """torchvision's RandomCrop(size): a size×size (or h×w) window at a uniformly drawn position,
  not rescaled (FLANNEL's 224-px crop of its 336-px image). An image smaller than the window
  (which torchvision refuses) is first padded with zeros on both sides, as center_crop does."""
  h, w = _hw(size, width)

  def apply(ex, rng):
    ex = _pad_to(ex, h, w)
    ih, iw = ex["image"].shape[:2]
    top, left = int(rng.integers(0, ih - h + 1)), int(rng.integers(0, iw - w + 1))
    return _crop(ex, top, left, h, w)
  return apply


@register("random_resized_crop")
def _random_resized_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Op:
  """torchvision's RandomResizedCrop: a random area fraction `scale` and aspect `ratio` (log-
  uniform), ten tries, else the central crop of the closest aspect; resized to size (bilinear,
  as torchvision resizes the PIL images the papers loaded)."""
  h, w = _hw(size)
  if not 0 < scale[0] <= scale[1] <= 1:
    raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")

  def apply(ex, rng):
    return _crop(ex, *random_resized_crop_box(*ex["image"].shape[:2], scale, ratio, rng), (h, w))
  return apply


def random_resized_crop_box(ih: int, iw: int, scale, ratio, rng) -> tuple[int, int, int, int]:
  """(top, left, height, width) of a crop of an ih × iw image, drawn by the rule of torchvision's
  RandomResizedCrop.get_params, draw for draw: rng.uniform(lo, hi) for the area fraction then the
  log aspect, per try, and rng.integers(lo, hi) for the top then the left of an accepted box."""
  area = ih * iw
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < cw <= iw and 0 < ch <= ih:
      return int(rng.integers(0, ih - ch + 1)), int(rng.integers(0, iw - cw + 1)), ch, cw
  aspect = iw / ih
  if aspect < min(ratio):
    cw, ch = iw, int(round(iw / min(ratio)))
  elif aspect > max(ratio):
    ch, cw = ih, int(round(ih * max(ratio)))
  else:
    cw, ch = iw, ih
  return (ih - ch) // 2, (iw - cw) // 2, ch, cw


ROTATE_INTERPOLATIONS = ("bilinear", "nearest")  # what the affine resampler offers


@register("rotate")
def _rotate(degrees: float = 15.0, p: float = 1.0, interpolation: str = "bilinear") -> Op:
  """Rotation by an angle drawn uniformly from [-degrees, degrees], with probability p, corners
  filled with zeros. interpolation='nearest' is torchvision's RandomRotation with its defaults
  (nearest, fill 0); 'bilinear' is fastai's."""
  _prob(p)
  if interpolation not in ROTATE_INTERPOLATIONS:
    raise ValueError(f"interpolation must be one of {ROTATE_INTERPOLATIONS}, got {interpolation!r}")

  def apply(ex, rng):
    if rng.uniform() >= p:
      return ex
    return rotate(ex, rng.uniform(-degrees, degrees), nearest=interpolation == "nearest")
  return apply


def rotate(ex: Example, angle_deg: float, nearest: bool = False) -> Example:
  """The image (and masks) rotated counter-clockwise (as displayed) by angle_deg about the image
  centre, zeros outside: torchvision's rotate(img, angle_deg) and PIL's Image.rotate."""
  h, w = ex["image"].shape[:2]
  return _affine(ex, _about_centre(h, w, angle_deg=-angle_deg), nearest=nearest)


@register("zoom")
def _zoom(max_zoom: float = 1.1, p: float = 0.75) -> Op:
  """fastai v1's rand_zoom (get_transforms' max_zoom): zoom in by a factor drawn from
  [1, max_zoom] about a random point placed so the view stays inside the image, with probability
  p."""
  _prob(p)
  if max_zoom < 1:
    raise ValueError(f"max_zoom must be >= 1, got {max_zoom}")

  def apply(ex, rng):
    if rng.uniform() >= p:
      return ex
    h, w = ex["image"].shape[:2]
    scale = rng.uniform(1.0, max_zoom)
    row_pct, col_pct = rng.uniform(), rng.uniform()
    # fastai samples input = output / scale + c in [-1, 1] coordinates, c = (1 - 1/scale)(2 pct - 1):
    # in pixels a shift of -scale · c · size / 2 after zooming about the centre.
    c = (1 - 1 / scale) * (2 * np.array([col_pct, row_pct]) - 1)
    shift = (-scale * c[0] * w / 2, -scale * c[1] * h / 2)
    return _affine(ex, _about_centre(h, w, scale=scale, shift=shift))
  return apply


@register("shift_scale_rotate")
def _shift_scale_rotate(shift: float = 0.0625, scale: float = 0.1, rotate: float = 45.0,
                        p: float = 0.5, border: str = "reflect_101") -> Op:
  """albumentations' ShiftScaleRotate: shift up to ±shift of the size, zoom by 1 ± scale, rotate
  up to ±rotate degrees, with probability p (its defaults). border: 'reflect_101', the default
  of the albumentations the papers used (cv2.BORDER_REFLECT_101; albumentations 2 changed it to
  constant), or 'constant' (zeros)."""
  _prob(p)
  if border not in BORDERS:
    raise ValueError(f"border must be one of {BORDERS}, got {border!r}")

  def apply(ex, rng):
    if rng.uniform() >= p:
      return ex
    return shift_scale_rotate(ex, angle_deg=rng.uniform(-rotate, rotate), scale=1.0 + rng.uniform(-scale, scale),
                              shift=(rng.uniform(-shift, shift), rng.uniform(-shift, shift)), border=border)
  return apply


def shift_scale_rotate(ex: Example, angle_deg: float, scale: float, shift: tuple[float, float],
                       border: str = "reflect_101") -> Example:
  """The image (and masks) rotated by angle_deg (clockwise as displayed), zoomed by `scale` about
  the centre and shifted by shift = (dx, dy) fractions of the width and height; albumentations'
  shift_scale_rotate(angle = -angle_deg, scale, dx, dy)."""
  h, w = ex["image"].shape[:2]
  return _affine(ex, _about_centre(h, w, angle_deg=angle_deg, scale=scale, shift=(shift[0] * w, shift[1] * h)),
                 border=border)


# --- colour ---------------------------------------------------------------------------------------


def _luminance(img: np.ndarray) -> np.ndarray:
  if img.shape[-1] == 1:
    return img
  return (img[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def _blend(degenerate, img, factor: float) -> np.ndarray:
  """PIL ImageEnhance: degenerate + factor · (img - degenerate), clipped to [0, 1]."""
  return np.clip(degenerate + factor * (img - degenerate), 0.0, 1.0).astype(np.float32)


def adjust_brightness(img, f):
  return _blend(np.zeros_like(img), img, f)


def adjust_contrast(img, f):
  return _blend(np.full_like(img, float(_luminance(img).mean())), img, f)


def adjust_saturation(img, f):
  return _blend(np.broadcast_to(_luminance(img), img.shape), img, f)


def adjust_sharpness(img, f):
  """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]]/13); borders are kept."""
  p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
  smooth = sum(p[1 + dy:p.shape[0] - 1 + dy, 1 + dx:p.shape[1] - 1 + dx] for dy in (-1, 0, 1)
               for dx in (-1, 0, 1)) + 4 * img
  smooth = smooth / 13.0
  smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = img[0], img[-1], img[:, 0], img[:, -1]
  return _blend(smooth, img, f)


@register("color_jitter")
def _color_jitter(brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                  p: float = 1.0) -> Op:
  """torchvision's ColorJitter (without hue): factors drawn from [1 - x, 1 + x], applied in a
  random order."""
  _prob(p)
  ops = [(adjust_brightness, brightness), (adjust_contrast, contrast), (adjust_saturation, saturation)]

  def apply(ex, rng):
    if rng.uniform() >= p:
      return ex
    img = ex["image"]
    for k in rng.permutation(len(ops)):
      fn, x = ops[k]
      if x:
        img = fn(img, rng.uniform(max(0.0, 1.0 - x), 1.0 + x))
    return {**ex, "image": img}
  return apply


@register("lighting")
def _lighting(max_lighting: float = 0.2, p: float = 0.75) -> Op:
  """fastai v1's lighting (seed 002): brightness and contrast changed in logit space, brightness
  by a change drawn from 0.5 ± max_lighting/2, contrast by a log-uniform scale in
  [1 - max_lighting, 1 / (1 - max_lighting)], each with probability p."""
  _prob(p)
  if not 0 <= max_lighting < 1:
    raise ValueError(f"max_lighting must be in [0, 1), got {max_lighting}")

  def apply(ex, rng):
    change = scale = None
    if rng.uniform() < p:
      change = rng.uniform(0.5 - max_lighting / 2, 0.5 + max_lighting / 2)
    if rng.uniform() < p:
      scale = math.exp(rng.uniform(math.log(1 - max_lighting), -math.log(1 - max_lighting)))
    if change is None and scale is None:
      return ex
    return {**ex, "image": lighting(ex["image"], change, scale)}
  return apply


def lighting(img: np.ndarray, change: float | None = None, scale: float | None = None) -> np.ndarray:
  """fastai v1's brightness(change) then contrast(scale) (its order): on the logit of the pixels,
  clamped to [1e-7, 1 - 1e-7] as fastai's logit_ does, add logit(change) and multiply by scale;
  back through the sigmoid. change = 0.5 and scale = 1 leave the image (nearly) as it is."""
  x = np.clip(img, 1e-7, 1 - 1e-7)
  logit = np.log(x / (1 - x))
  if change is not None:
    logit = logit + math.log(change / (1 - change))
  if scale is not None:
    logit = logit * scale
  return (1 / (1 + np.exp(-logit))).astype(np.float32)


# --- RandAugment ------------------------------------------------------------------------------------

# Seed 001's RandAugment operations, with the magnitude ranges of the RandAugment implementation
# its authors used (ildoonet/pytorch-randaugment, augment_list): level = m / 30 maps linearly onto
# each range. Translation and cutout are its absolute-pixel ops (TranslateXabs / TranslateYabs up
# to 100 px, CutoutAbs up to 40 px), not the fractional TranslateX / Cutout it leaves unused.
RAND_AUGMENT_OPS = ("rotate", "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
                    "cutout", "translate_x", "translate_y")
_RANGES = {"rotate": (0.0, 30.0), "shear_x": (0.0, 0.3), "shear_y": (0.0, 0.3),
           "translate_x": (0.0, 100.0), "translate_y": (0.0, 100.0), "cutout": (0.0, 40.0),
           "color": (0.1, 1.9), "contrast": (0.1, 1.9), "brightness": (0.1, 1.9),
           "sharpness": (0.1, 1.9)}
_PIXEL_OPS = ("translate_x", "translate_y", "cutout")
_CUTOUT_FILL = np.array([125, 123, 114], np.float32) / 255.0  # CutoutAbs's colour


def _rand_augment_op(name: str, ex: Example, v: float, rng) -> Example:
  """ildoonet's operation at magnitude v, with its draws: a sign for the geometric ops (each flips
  v with probability 1/2) and CutoutAbs's centre."""
  centre = None
  if name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
    v = -v if rng.uniform() < 0.5 else v
  elif name == "cutout":
    h, w = ex["image"].shape[:2]
    # CutoutAbs draws np.random.uniform(w), which numpy reads as uniform(low=w, high=1): x in
    # (1, w], then y in (1, h].
    centre = (rng.uniform(1, w), rng.uniform(1, h))
  return rand_augment_op(ex, name, v, centre)


def rand_augment_op(ex: Example, name: str, v: float, centre=None) -> Example:
  """ildoonet's operation `name` at its signed value v, as its PIL call does it. Rotate:
  img.rotate(v) (counter-clockwise about the centre); shears and translations: img.transform(
  AFFINE, (1, v, 0, 0, 1, 0) and the like), so output (x, y) reads input (x + v y, y): shears
  about the top-left corner, content moved by -v px; all nearest neighbour, black outside; masks
  follow. CutoutAbs: the square from (int(cx - v/2), int(cy - v/2)), clipped at 0, to v px
  further, both ends included as PIL's ImageDraw.rectangle draws them (int(v) + 1 px a side),
  painted (125, 123, 114) on the image only: masks keep the anatomy. Color, Contrast,
  Brightness, Sharpness: ImageEnhance with factor v."""
  if name == "rotate":
    return rotate(ex, v, nearest=True)
  affine = {"shear_x": [[1, v, 0], [0, 1, 0]], "shear_y": [[1, 0, 0], [v, 1, 0]],
            "translate_x": [[1, 0, v], [0, 1, 0]], "translate_y": [[1, 0, 0], [0, 1, v]]}
  if name in affine:
    return _affine(ex, np.array(affine[name] + [[0, 0, 1]], np.float64), nearest=True)
  if name == "cutout":
    if v < 0:
      return ex
    left, top = int(max(0.0, centre[0] - v / 2)), int(max(0.0, centre[1] - v / 2))
    side = int(v) + 1
    img = ex["image"].copy()
    img[top:top + side, left:left + side] = _CUTOUT_FILL if img.shape[-1] == 3 else _CUTOUT_FILL.mean()
    return {**ex, "image": img}
  fn = {"color": adjust_saturation, "contrast": adjust_contrast, "brightness": adjust_brightness,
        "sharpness": adjust_sharpness}[name]
  return {**ex, "image": fn(ex["image"], v)}


@register("rand_augment")
def _rand_augment(n: int = 2, m: float = 9.0, ops=RAND_AUGMENT_OPS, ref_size=None) -> Op:
  """RandAugment(n, m): n operations drawn uniformly (with replacement) from `ops`, each at
  magnitude m on a 0–30 scale (rotation, shear and translation take a random sign). Translation
  and cutout are in pixels, as in ildoonet's implementation; with ref_size they are pixels of a
  ref_size-pixel image, scaled to the image's size (a small image then moves as much, relatively,
  as a ref_size one)."""
  if n < 0 or not 0 <= m <= 30:
    raise ValueError(f"rand_augment needs n >= 0 and 0 <= m <= 30, got n={n}, m={m}")
  if ref_size is not None and ref_size <= 0:
    raise ValueError(f"rand_augment ref_size must be positive, got {ref_size}")
  unknown = [o for o in ops if o not in _RANGES]
  if unknown:
    raise ValueError(f"unknown RandAugment op(s) {unknown}; known: {sorted(_RANGES)}")

  def apply(ex, rng):
    for k in rng.integers(0, len(ops), n):
      lo, hi = _RANGES[ops[k]]
      v = lo + (m / 30.0) * (hi - lo)
      if ref_size and ops[k] in _PIXEL_OPS:
        v *= min(ex["image"].shape[:2]) / ref_size
      ex = _rand_augment_op(ops[k], ex, v, rng)
    return ex
  return apply
