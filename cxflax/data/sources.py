"""Data sources: random-access datasets with cheap metadata and pixels loaded on demand.

A source knows, without reading pixels, how many examples it has and each one's subject (for
subject-grouped folds); labels may cost a little more (phantom labels are computed from its
masks). ``load(i)`` returns the example: 'image' (H, W, C) uint8/uint16 and 'label' (float32
percentage for regression, int32 class index for classification), plus masks where known.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import numpy as np

from cxflax.data import phantom as phantom_lib
from cxflax.data.images import read_image
from cxflax.errors import ConfigError, DataError

TASKS = ("regression", "classification")


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


class PhantomSource(Source):
  """The built-in procedural data (see cxflax.data.phantom): CT regression or CXR classes."""

  def __init__(self, kind: str = "ct", num_subjects: int = 64, image_size: int = 512,
               slices_per_subject=(3, 6), seed: int = 0):
    self.phantom = phantom_lib.Phantom(kind, num_subjects, image_size, tuple(slices_per_subject), seed)
    self._labels = None
    if kind == "cxr":
      self.task, self.class_names = "classification", phantom_lib.CXR_CLASS_NAMES

  def __len__(self):
    return len(self.phantom)

  def subjects(self):
    return [f"phantom{self.phantom.subject(i):05d}" for i in range(len(self))]

  def labels(self):
    if self._labels is None:  # CT labels come from rendering the masks: compute them once
      if self.task == "classification":
        self._labels = np.array([self.phantom.subject_class(self.phantom.subject(i))
                                 for i in range(len(self))], np.int32)
      else:
        self._labels = np.array([self.phantom.percentage(i) for i in range(len(self))], np.float32)
    return self._labels

  def load(self, i):
    ex = self.phantom[i]
    label = ex["label"] if self.task == "classification" else ex["percentage"]
    return dict(image=ex["image"], label=label, lung_mask=ex["lung_mask"],
                lesion_mask=ex["lesion_mask"])

  def describe(self, i):
    return f"phantom sample {i} ({self.phantom.kind}, seed {self.phantom.seed})"


class PerCovid19Source(Source):
  """The Per-COVID-19 challenge layout: ``Train/``, ``Val/`` and ``Train.csv``.

  Train.csv rows are ``Slice_Name, Covid-19_percentage, Subject`` with or without a header row
  (the reference code reads it header-less). The challenge's Val/ is unlabeled; a ``Val.csv`` of
  the same form, where present, labels it.
  """
  COLUMNS = ("Slice_Name", "Covid-19_percentage", "Subject")

  def __init__(self, root: str, split: str = "train"):
    if split not in ("train", "val"):
      raise ConfigError(f"per_covid19 split must be 'train' or 'val', got {split!r}")
    if not os.path.isdir(root):
      raise DataError(f"per_covid19 root {root!r} is not a directory")
    self.root, self.split = root, split
    folder = os.path.join(root, "Train" if split == "train" else "Val")
    csv_path = os.path.join(root, "Train.csv" if split == "train" else "Val.csv")
    if not os.path.isdir(folder):
      raise DataError(f"per_covid19: image folder {folder!r} is missing")
    if not os.path.isfile(csv_path):
      raise DataError(f"per_covid19: label file {csv_path!r} is missing"
                      + (" (the challenge's Val/ is unlabeled; add a Val.csv to evaluate on it)"
                         if split == "val" else ""))
    rows = _read_label_csv(csv_path, self.COLUMNS)
    self._paths, self._labels, self._subjects = [], [], []
    missing = []
    for line, (name, pct, subject) in rows:
      try:
        value = float(pct)
      except ValueError:
        raise DataError(f"{csv_path}, line {line}: percentage {pct!r} is not a number") from None
      if not 0.0 <= value <= 100.0:  # also catches NaN
        raise DataError(f"{csv_path}, line {line}: percentage {value} is outside 0..100")
      path = os.path.join(folder, name)
      if not os.path.isfile(path):
        missing.append(f"{name} (line {line})")
      self._paths.append(path)
      self._labels.append(value)
      self._subjects.append(subject.strip())
    if missing:
      raise DataError(f"{csv_path} lists {len(missing)} image(s) missing from {folder}: "
                      + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if not self._paths:
      raise DataError(f"{csv_path} lists no images")

  def __len__(self):
    return len(self._paths)

  def subjects(self):
    return list(self._subjects)

  def labels(self):
    return np.asarray(self._labels, np.float32)

  def load(self, i):
    return dict(image=read_image(self._paths[i]), label=np.float32(self._labels[i]))

  def describe(self, i):
    return self._paths[i]


def _read_label_csv(path: str, columns: tuple[str, ...]) -> list[tuple[int, list[str]]]:
  """(line number, fields in `columns` order) for each row of a CSV with or without a header.

  A header is recognised when its fields name the columns (case and spacing ignored); without one,
  the first len(columns) fields are taken in order.
  """
  with open(path, newline="", encoding="utf-8-sig") as f:
    lines = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(c.strip() for c in row)]
  if not lines:
    raise DataError(f"{path} is empty")
  norm = lambda s: s.strip().lower().replace(" ", "").replace("_", "").replace("-", "")
  first = [norm(c) for c in lines[0][1]]
  order = list(range(len(columns)))
  if any(norm(c) in first for c in columns):
    absent = [c for c in columns if norm(c) not in first]
    if absent:
      raise DataError(f"{path}: header {lines[0][1]} lacks column(s) {absent}; expected {list(columns)}")
    order = [first.index(norm(c)) for c in columns]
    lines = lines[1:]
  out = []
  for n, row in lines:
    if len(row) <= max(order):
      raise DataError(f"{path}, line {n}: expected {len(columns)} columns "
                      f"({', '.join(columns)}), got {len(row)}: {row}")
    out.append((n, [row[k] for k in order]))
  return out


SOURCES = ("phantom", "per_covid19")


def make_source(data_config, split: str = "train") -> Source:
  """The source named by ``config.data.source``, read from ``config.data.root``."""
  name = data_config.source
  if name == "phantom":
    p = data_config.phantom
    return PhantomSource(p.kind, p.num_subjects, data_config.image_size, p.slices_per_subject,
                         p.seed + (0 if split == "train" else 1_000_003))
  if name == "per_covid19":
    if not data_config.root:
      raise ConfigError("config.data.root must point at the Per-COVID-19 folder "
                        "(the one holding Train/ and Train.csv)")
    return PerCovid19Source(data_config.root, split)
  raise ConfigError(f"unknown data source {name!r}; known sources: {', '.join(SOURCES)}")
