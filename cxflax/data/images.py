"""Reading image files into arrays, with errors that name the file."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxflax.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_image(path: str | os.PathLike) -> np.ndarray:
  """An image file as an (H, W, C) array: uint8, or uint16 for 16-bit files; C is 1 or 3.

  PNG and JPEG, 8- or 16-bit, grayscale or RGB (alpha dropped, palettes expanded).
  """
  path = os.fspath(path)
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.int64)
        if arr.min() < 0 or arr.max() > 65535:
          raise DataError(f"{path}: 32-bit image values outside 0..65535 are not supported")
        arr = arr.astype(np.uint16)
      elif mode == "F":
        raise DataError(f"{path}: floating-point images are not supported; save as 8- or 16-bit")
      elif mode in ("L", "1", "LA", "P", "PA"):
        im = im.convert("RGB") if mode in ("P", "PA") and _palette_has_color(im) else im.convert("L")
        arr = np.asarray(im)
      else:
        arr = np.asarray(im.convert("RGB"))
  except FileNotFoundError:
    raise DataError(f"{path}: image file not found") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.size == 0:
    raise DataError(f"{path}: image is empty")
  return arr


def _palette_has_color(im: Image.Image) -> bool:
  rgb = np.asarray(im.convert("RGB"))
  return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def write_image(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes an (H, W[, 1 or 3]) uint8 or uint16 array as PNG (or as the extension says)."""
  arr = np.asarray(array)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if (arr.dtype == np.uint16 and arr.ndim == 2) or arr.dtype == np.uint8:
    Image.fromarray(arr).save(path)  # uint16 → 16-bit grayscale ('I;16')
  else:
    raise ValueError(f"write_image: expected uint8, or 2-D uint16, got {arr.dtype} {arr.shape}")
