"""The Source interface and the sources built from others (relabelled, joined, with masks, as
segmentation targets), and the file-backed source the layout readers fill.

A source is random access: it knows, without reading pixels, how many examples it has and each
one's label and subject (for subject-grouped, stratified folds). ``load(i)`` reads example i:
'image' (H, W, C) uint8 / uint16 (float32 in [0, 1] for windowed DICOM) and 'label' (float32
percentage for regression, int32 class index for classification), plus masks where known.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from cxflax.data.images import IMAGE_EXTENSIONS, read_image
from cxflax.errors import DataError

TASKS = ("regression", "classification")
SPLITS = ("train", "val", "test")


class Source:
  """Base class; see the module docstring."""
  task: str = "regression"
  class_names: tuple[str, ...] | None = None

  def __len__(self) -> int:
    raise NotImplementedError

  def subjects(self) -> list[str]:
    raise NotImplementedError

  def labels(self) -> np.ndarray:
    raise NotImplementedError

  def load(self, i: int) -> dict[str, Any]:
    raise NotImplementedError

  def describe(self, i: int) -> str:
    """Where example i comes from (a file path, a row), for error messages."""
    raise NotImplementedError

  def example_name(self, i: int) -> str:
    """Example i's file name (as prediction files list it)."""
    raise NotImplementedError


def label_array(labels, task: str) -> np.ndarray:
  """Labels as every source holds them: int32 class indices, or float32 values."""
  return np.asarray(labels, np.int32 if task == "classification" else np.float32)


@dataclasses.dataclass
class Entry:
  """One example of a file-based dataset: its file, label, subject, and where it was listed."""
  path: str
  label: Any
  subject: str
  where: str


class FileSource(Source):
  """Examples read from image files; built by the layout readers below."""

  def __init__(self, name: str, entries: Sequence[Entry], task: str,
               class_names: tuple[str, ...] | None = None, window=None):
    if not entries:
      raise DataError(f"{name}: the split has no examples")
    self.name, self.task, self.class_names, self.window = name, task, class_names, window
    self.paths = [e.path for e in entries]
    self.wheres = [e.where for e in entries]
    self._subjects = [e.subject for e in entries]
    self._labels = label_array([e.label for e in entries], task)

  def __len__(self):
    return len(self.paths)

  def subjects(self):
    return list(self._subjects)

  def labels(self):
    return self._labels

  def load(self, i):
    return dict(image=read_image(self.paths[i], self.window), label=self._labels[i])

  def describe(self, i):
    return f"{self.paths[i]} ({self.wheres[i]})"

  def example_name(self, i):
    return os.path.basename(self.paths[i])

  def subset(self, keep: Sequence[int]) -> "FileSource":
    entries = [Entry(self.paths[i], self._labels[i], self._subjects[i], self.wheres[i]) for i in keep]
    return FileSource(self.name, entries, self.task, self.class_names, self.window)


class RelabeledSource(Source):
  """Another source's examples with new labels (pseudo-labels predicted by a trained model)."""

  def __init__(self, base: Source, labels: np.ndarray):
    if len(labels) != len(base):
      raise ValueError(f"{len(labels)} labels for a source of {len(base)} examples")
    self.base, self.task, self.class_names = base, base.task, base.class_names
    self._labels = label_array(labels, base.task)

  def __len__(self):
    return len(self.base)

  def subjects(self):
    return [f"pseudo/{s}" for s in self.base.subjects()]

  def labels(self):
    return self._labels

  def load(self, i):
    return {**self.base.load(i), "label": self._labels[i]}

  def describe(self, i):
    return f"{self.base.describe(i)} (pseudo-labelled)"

  def example_name(self, i):
    return self.base.example_name(i)


class ConcatSource(Source):
  """Two sources of the same task one after the other (indices of the second start at len(a))."""

  def __init__(self, a: Source, b: Source):
    if a.task != b.task or a.class_names != b.class_names:
      raise DataError(f"cannot join a {a.task} source with a {b.task} source (or other classes)")
    self.a, self.b, self.task, self.class_names = a, b, a.task, a.class_names

  def __len__(self):
    return len(self.a) + len(self.b)

  def subjects(self):
    return self.a.subjects() + self.b.subjects()

  def labels(self):
    return np.concatenate([self.a.labels(), self.b.labels()])

  def _pick(self, i):
    return (self.a, i) if i < len(self.a) else (self.b, i - len(self.a))

  def load(self, i):
    src, j = self._pick(i)
    return src.load(j)

  def describe(self, i):
    src, j = self._pick(i)
    return src.describe(j)

  def example_name(self, i):
    src, j = self._pick(i)
    return src.example_name(j)


SEGMENTATION_CLASSES = ("background", "lung")


def mask_file(mask_dir: str, image_name: str) -> str:
  """Where a lung mask of image `image_name` lives (and where --mode=predict writes it)."""
  return os.path.join(mask_dir, os.path.splitext(image_name)[0] + ".png")


def read_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
  """A mask file as uint8 0/1 of `shape` (nearest-neighbour resized if it differs): any value
  above half the file's maximum is inside."""
  m = read_image(path)[..., 0].astype(np.float32)
  m = (m > 0.5 * max(float(m.max()), 1.0)).astype(np.uint8)
  if m.shape != tuple(shape):
    m = np.asarray(Image.fromarray(m).resize((shape[1], shape[0]), Image.NEAREST))
  return m


class WrappedSource(Source):
  """Another source's examples, everything delegated to it; subclasses change one thing."""

  def __init__(self, base: Source):
    self.base, self.task, self.class_names = base, base.task, base.class_names

  def __len__(self):
    return len(self.base)

  def subjects(self):
    return self.base.subjects()

  def labels(self):
    return self.base.labels()

  def load(self, i):
    return self.base.load(i)

  def describe(self, i):
    return self.base.describe(i)

  def example_name(self, i):
    return self.base.example_name(i)


class WithMasks(WrappedSource):
  """Another source's examples with their lung masks read from files (config.data.mask_dir:
  <mask_dir>/<image name stem>.png, as a segmentation run's --mode=predict writes them). Every
  mask file is checked up front."""

  def __init__(self, base: Source, mask_dir: str, key: str = "lung_mask"):
    super().__init__(base)
    if not os.path.isdir(mask_dir):
      raise DataError(f"config.data.mask_dir {mask_dir!r} is not a directory")
    self.key = key
    self.paths = [mask_file(mask_dir, base.example_name(i)) for i in range(len(base))]
    missing = [i for i, path in enumerate(self.paths) if not os.path.isfile(path)]
    if missing:
      raise DataError(f"{len(missing)} of {len(base)} images have no mask in {mask_dir}, e.g. "
                      f"{base.describe(missing[0])}: {self.paths[missing[0]]} not found")

  def load(self, i):
    ex = dict(self.base.load(i))
    ex[self.key] = read_mask(self.paths[i], ex["image"].shape[:2])
    return ex

  def describe(self, i):
    return f"{self.base.describe(i)} (mask {self.paths[i]})"


class SegmentationTarget(WrappedSource):
  """A source whose lung masks are the targets (config.data.target='lung_mask'): per-pixel
  classes background / lung. Folds stay grouped and stratified as the base source's."""

  def __init__(self, base: Source, key: str = "lung_mask"):
    super().__init__(base)
    self.key, self.task, self.class_names = key, "segmentation", SEGMENTATION_CLASSES

  def load(self, i):
    ex = self.base.load(i)
    if self.key not in ex:
      raise DataError(f"{self.base.describe(i)}: no {self.key} to segment (for files on disk, set "
                      "config.data.mask_dir to the folder of mask PNGs)")
    return ex


def image_folder(folder: str) -> FileSource:
  """Every image under `folder` (recursively), unlabeled: what a trained model is asked about."""
  if not os.path.isdir(folder):
    raise DataError(f"{folder!r} is not a directory of images")
  paths = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), "**", "*"), recursive=True)
                 if p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p))
  if not paths:
    raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
  entries = [Entry(p, np.nan, os.path.relpath(p, folder), p) for p in paths]
  return FileSource(folder, entries, "regression")

