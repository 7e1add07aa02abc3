"""Reading image files into arrays, with errors that name the file.

PNG, JPEG (and other PIL formats), 8- or 16-bit, grayscale or RGB, come back as uint8 / uint16
arrays. DICOM comes back as uint16 stored values (MONOCHROME1 inverted), or, given a CT window,
as float32 in [0, 1] computed from Hounsfield units (rescale slope and intercept applied).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from cxflax.errors import DataError
from cxflax.files import atomic_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")

# CT windows (centre, width) in Hounsfield units.
WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0), "soft_tissue": (50.0, 350.0),
           "bone": (400.0, 1800.0)}


def parse_window(window) -> tuple[float, float] | None:
  """None, a preset name ('lung', 'mediastinum', ...) or (centre, width), as a pair or as the
  text config.data.window holds ('(-600, 1500)' or '-600,1500') → (centre, width)."""
  if window in (None, "", ()):
    return None
  if isinstance(window, str):
    if window in WINDOWS:
      return WINDOWS[window]
    try:
      pair = tuple(float(p) for p in window.strip().strip("()").split(","))
    except ValueError:
      pair = ()
    if len(pair) != 2:
      raise ValueError(f"unknown CT window {window!r}; use one of {sorted(WINDOWS)} or (centre, width)")
    window = pair
  centre, width = (float(v) for v in window)
  if width <= 0:
    raise ValueError(f"CT window width must be positive, got {width}")
  return centre, width


def is_dicom(path: str) -> bool:
  if path.lower().endswith((".dcm", ".dicom")):
    return True
  try:
    with open(path, "rb") as f:
      head = f.read(132)
    return head[128:132] == b"DICM"
  except OSError:
    return False


def read_dicom(path: str, window=None) -> np.ndarray:
  """A DICOM file's pixels: (H, W, 1) uint16 stored values (MONOCHROME1 inverted so that bright is
  dense), or with `window` float32 in [0, 1] over Hounsfield units (slope/intercept applied)."""
  import pydicom
  window = parse_window(window)
  try:
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
    monochrome1 = str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1"
  except FileNotFoundError:
    raise DataError(f"{path}: DICOM file not found") from None
  except Exception as e:  # pydicom raises many types for bad or unsupported files
    other = _pil_format(path)
    if other:
      raise DataError(f"{path}: not a DICOM file but {other} image data; give it its format's "
                      "extension") from None
    raise DataError(f"{path}: cannot read DICOM pixels ({type(e).__name__}: {e})") from None
  if raw.ndim != 2 or raw.size == 0:
    raise DataError(f"{path}: expected a single 2-D DICOM frame, got pixel array of shape {raw.shape}")
  values = raw.astype(np.float64) * slope + intercept
  if window is not None:
    if not np.isfinite(values).all():
      raise DataError(f"{path}: DICOM pixels are not finite after rescale (slope {slope}, "
                      f"intercept {intercept})")
    centre, width = window
    out = np.clip((values - (centre - width / 2)) / width, 0.0, 1.0)
    return (1.0 - out if monochrome1 else out).astype(np.float32)[..., None]
  if not np.issubdtype(raw.dtype, np.integer):
    raise DataError(f"{path}: floating-point DICOM pixels ({raw.dtype}) need config.data.window")
  stored = raw.astype(np.int64)
  if monochrome1:
    stored = stored.max() + stored.min() - stored
  stored = stored - min(0, int(stored.min()))  # signed storage: shift to non-negative
  if stored.max() > 65535:
    raise DataError(f"{path}: DICOM values exceed 16 bits")
  return stored.astype(np.uint16)[..., None]


def _number(ds, keyword: str, default: float) -> float:
  """A numeric DICOM attribute, `default` when absent or empty."""
  value = getattr(ds, keyword, None)
  return default if value is None or value == "" else float(value)


def _pil_format(path: str) -> str | None:
  """'PNG', 'JPEG', 'TIFF' or 'BMP' if PIL finds that format in a file, else None: for telling a
  user that a file named .dcm is another kind of image (formats with looser signatures, such as
  TGA, would match damaged DICOM files too)."""
  try:
    with Image.open(path, formats=("PNG", "JPEG", "TIFF", "BMP")) as im:
      return im.format
  except Exception:  # none of those, or unreadable: no hint to give
    return None


def read_image(path: str | os.PathLike, window=None) -> np.ndarray:
  """An image file as an (H, W, C) array: uint8, or uint16 for 16-bit files; C is 1 or 3.

  PNG and JPEG, 8- or 16-bit, grayscale or RGB (alpha dropped, palettes expanded); DICOM (see
  read_dicom; `window` applies to DICOM only).
  """
  path = os.fspath(path)
  if is_dicom(path):
    return read_dicom(path, window)
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
  except DataError:
    raise
  except FileNotFoundError:
    raise DataError(f"{path}: image file not found") from None
  except Image.DecompressionBombError as e:  # not an OSError: PIL's guard against huge images
    raise DataError(f"{path}: {e} (PIL.Image.MAX_IMAGE_PIXELS sets the limit)") from None
  except Exception as e:  # PIL's decoders raise many types for corrupt files (OSError, SyntaxError,
    # struct.error, EOFError, IndexError, ...): each is a bad file, not a bug
    raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.size == 0:
    raise DataError(f"{path}: image is empty")
  return arr


def _palette_has_color(im: Image.Image) -> bool:
  rgb = np.asarray(im.convert("RGB"))
  return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def write_image(path: str | os.PathLike, array: np.ndarray, quality: int | None = None) -> None:
  """Writes an (H, W[, 1 or 3]) uint8 or uint16 array as PNG (or as the extension says; `quality`
  for JPEG, PIL's default otherwise). Every image file cxflax writes is written here."""
  arr = np.asarray(array)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if not ((arr.dtype == np.uint16 and arr.ndim == 2) or arr.dtype == np.uint8):
    raise ValueError(f"write_image: expected uint8, or 2-D uint16, got {arr.dtype} {arr.shape}")
  options = {} if quality is None else {"quality": quality}
  path = os.fspath(path)
  fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
  if fmt is None:
    raise ValueError(f"write_image: {path}: not an image file extension PIL writes")
  # Written beside the file, then renamed over it: a process killed mid-write (a predict's masks,
  # an export) leaves no truncated image that a later run would find corrupt.
  with atomic_file(path, "wb", sync=False) as f:
    Image.fromarray(arr).save(f, format=fmt, **options)  # uint16 → 16-bit grayscale ('I;16')


def write_mask(path: str | os.PathLike, mask: np.ndarray, size: tuple[int, int]) -> None:
  """A mask (nonzero inside) as a 0/255 PNG of `size` (H, W), nearest-neighbour resized: the
  files config.data.mask_dir reads back."""
  arr = (np.asarray(mask) > 0).astype(np.uint8) * 255
  h, w = (int(v) for v in size)
  if arr.shape != (h, w):
    arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.NEAREST))
  write_image(path, arr)
