"""A CSV of path,label[,subject] per split (config.data.train_file, ...)."""

from __future__ import annotations

import os

import numpy as np

from cxflax.data.sources.base import Entry, FileSource
from cxflax.data.sources.registry import register
from cxflax.data.sources.tables import (Problems, check_files, class_index, is_number, pick_columns,
                                        read_files, read_table)
from cxflax.errors import ConfigError


@register("csv")
def _from_config(data_config, split, unlabeled_ok):
  return read_files(data_config, "csv", split, lambda root, problems, window: csv_source(
      root, split, problems, data_config.get(f"{split}_file", ""), data_config.class_names, window))


def csv_source(root: str, split: str, problems: Problems, table: str, class_names=(),
               window=None) -> FileSource:
  """A CSV of path,label[,subject]: numeric labels make a regression task unless class_names
  are given; paths are relative to the CSV's folder. In a table whose labels mix numbers and
  names, the minority kind are bad entries (a typo must not turn a regression into classes)."""
  if not table:
    raise ConfigError(f"the csv source needs config.data.{split}_file")
  table = table if os.path.isabs(table) else os.path.join(root, table)
  rows = pick_columns(read_table(table), ("path", "label", "subject"), table,
                      aliases={"path": ("image", "file", "filename"), "label": ("class", "target")},
                      optional=("subject",), problems=problems)
  base = os.path.dirname(table)
  given = [r["label"] for _, r in rows if r["label"]]
  numeric = not class_names and 2 * sum(map(is_number, given)) >= len(given) > 0
  classes = tuple(class_names) or (None if numeric else tuple(sorted({v for v in given if not is_number(v)})))
  entries = []
  for n, row in rows:
    where = f"{os.path.basename(table)} line {n}"
    if not row["label"]:
      problems(f"{where}: no label")
      continue
    if classes is None:
      if not is_number(row["label"]):
        problems(f"{where}: label {row['label']!r} is not a number, unlike most of the table's "
                 "(set config.data.class_names to classify)")
        continue
      label = float(row["label"])
      if not np.isfinite(label):
        problems(f"{where}: label {row['label']!r} is not finite")
        continue
    else:
      label = class_index(row["label"], classes, where, problems)
      if label is None:
        continue
    if not row["path"]:
      problems(f"{where}: no image path")
      continue
    path = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
    entries.append(Entry(path, label, row.get("subject") or row["path"], where))
  entries = check_files(entries, problems)
  problems.report()
  return FileSource(f"csv {os.path.basename(table)}", entries,
                    "regression" if classes is None else "classification", classes, window)

