"""One folder per class: root/<class>/, or root/<split>/<class>/."""

from __future__ import annotations

import glob
import os

from cxflax.data.images import IMAGE_EXTENSIONS
from cxflax.data.sources.base import SPLITS, Entry, FileSource
from cxflax.data.sources.registry import register
from cxflax.data.sources.tables import Problems, need_dir, read_files
from cxflax.errors import DataError


@register("folder")
def _from_config(data_config, split, unlabeled_ok):
  return read_files(data_config, "folder", split, lambda root, problems, window: folder_source(
      root, split, problems, data_config.class_names, window))


def folder_source(root: str, split: str, problems: Problems, class_names=(), window=None) -> FileSource:
  """One folder per class: root/<split>/<class>/ if present, else (train only) root/<class>/."""
  base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
  if base == root and split != "train":
    raise DataError(f"folder: {root} has no {split}/ subfolder")
  found = sorted(d for d in os.listdir(need_dir(base, "folder")) if os.path.isdir(os.path.join(base, d))
                 and d not in SPLITS)
  classes = tuple(class_names) or tuple(found)
  if not classes:
    raise DataError(f"folder: {base} has no class subfolders")
  absent = [c for c in classes if c not in found]
  if absent:
    raise DataError(f"folder: class folder(s) {absent} missing under {base} (found {found})")
  for extra in sorted(set(found) - set(classes)):
    problems(f"{os.path.join(base, extra)}: folder of unknown class {extra!r} (known: {', '.join(classes)})")
  entries = []
  for label, cls in enumerate(classes):
    paths = [p for p in sorted(glob.glob(os.path.join(glob.escape(os.path.join(base, cls)), "*")))
             if p.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:  # a class without examples would silently drop out of training and metrics
      raise DataError(f"folder: class folder {os.path.join(base, cls)} holds no images "
                      f"({', '.join(IMAGE_EXTENSIONS)})")
    for path in paths:
      stem = os.path.splitext(os.path.basename(path))[0]
      entries.append(Entry(path, label, f"{cls}/{stem}", f"{cls}/"))
  problems.report()
  return FileSource(f"folder {split}", entries, "classification", classes, window)

