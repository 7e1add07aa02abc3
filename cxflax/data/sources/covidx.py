"""COVIDx (COVID-Net): train/, test/ and label files of "patientid filename label [source]"
lines; 3 classes normal/pneumonia/COVID-19, or v1's 4: normal/bacteria/viral/COVID-19."""

from __future__ import annotations

import glob
import os

from cxflax.data.sources.base import Entry, FileSource
from cxflax.data.sources.registry import register
from cxflax.data.sources.tables import (Problems, check_files, class_index, need_dir, norm, read_files,
                                        read_lines)
from cxflax.errors import DataError

COVIDX3_CLASSES = ("normal", "pneumonia", "COVID-19")
COVIDX4_CLASSES = ("normal", "bacteria", "viral", "COVID-19")


@register("covidx")
def _from_config(data_config, split, unlabeled_ok):
  return read_files(data_config, "covidx", split, lambda root, problems, window: covidx(
      root, split, problems, data_config.get(f"{split}_file", ""), window, data_config.class_names))


def _find_list(root: str, split: str, given: str) -> str:
  if given:
    return given if os.path.isabs(given) else os.path.join(root, given)
  candidates = sorted(p for p in glob.glob(os.path.join(root, f"{split}*.txt")))
  if len(candidates) != 1:
    raise DataError(f"covidx: cannot tell the {split} label file in {root} (found "
                    f"{[os.path.basename(c) for c in candidates] or 'none'}); set "
                    f"config.data.{split}_file")
  return candidates[0]


def covidx(root: str, split: str, problems: Problems, list_file: str = "", window=None,
           class_names=()) -> FileSource:
  """COVIDx label files: 'patientid filename label [source]' per line, images in root/<split>/.

  The classes are `class_names` if given, else v1's four when the file has 'bacteria' or 'viral'
  labels, else the three of later versions.
  """
  if split == "val":
    raise DataError("covidx has no validation split; use config.data.eval_split='fold' or 'test'")
  path = _find_list(root, split, list_file)
  if not os.path.isfile(path):
    raise DataError(f"covidx: label file {path} is missing")
  folder = need_dir(os.path.join(root, split), "covidx")
  lines = [(n, line.split()) for n, line in read_lines(path)]
  if not lines:
    raise DataError(f"{path} is empty")
  raw = {norm(t[2]) for _, t in lines if len(t) >= 3}
  classes = tuple(class_names) or (COVIDX4_CLASSES if raw & {"bacteria", "viral"} else COVIDX3_CLASSES)
  entries = []
  for n, tokens in lines:
    where = f"{os.path.basename(path)} line {n}"
    if len(tokens) < 3:
      problems(f"{where}: expected 'patientid filename label [source]', got {' '.join(tokens)!r}")
      continue
    label = class_index(tokens[2], classes, where, problems,
                         aliases={"covid19": "COVID-19", "covid": "COVID-19"})
    if label is not None:
      entries.append(Entry(os.path.join(folder, tokens[1]), label, tokens[0], where))
  entries = check_files(entries, problems)
  problems.report()
  return FileSource(f"covidx {split}", entries, "classification", classes, window)

