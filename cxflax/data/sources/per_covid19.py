"""Per-COVID-19 (Bougourzi et al. 2021): CT slices with their infection percentage, and the
severity categories its benchmark (and seed 001's folds) derive from that percentage.

Challenge layout: Train/, Val/ [, Test/], Train.csv (Slice_Name, Covid-19_percentage, Subject;
header optional), Val.csv where labelled. Original release: Images/ and Database_new.xlsx / .csv
(image name, percentage, fold, subject).
"""

from __future__ import annotations

import glob
import os

import numpy as np

from cxflax.data.images import IMAGE_EXTENSIONS
from cxflax.data.sources.base import Entry, FileSource
from cxflax.data.sources.registry import register
from cxflax.data.sources.tables import (Problems, check_files, need_dir, parse_percentage,
                                        pick_columns, read_files, read_table)
from cxflax.errors import DataError

# Normal 0 %, Minimal (0, 10], Moderate (10, 25], Extent (25, 50], Severe (50, 75],
# Critical (75, 100].
SEVERITY_NAMES = ("normal", "minimal", "moderate", "extent", "severe", "critical")
_SEVERITY_UPPER = (0.0, 10.0, 25.0, 50.0, 75.0)


def severity_class(percentage: float) -> int:
  """Severity category index (see SEVERITY_NAMES) of an infection percentage."""
  return int(np.searchsorted(_SEVERITY_UPPER, percentage, side="left"))


@register("per_covid19")
def _from_config(data_config, split, unlabeled_ok):
  return read_files(data_config, "per_covid19", split,
                    lambda root, problems, window: per_covid19(root, split, problems, window, unlabeled_ok))


def per_covid19(root: str, split: str, problems: Problems, window=None,
                unlabeled_ok: bool = False) -> FileSource:
  """Per-COVID-19, challenge layout or original release (see the module docstring). With
  unlabeled_ok, a split without its label file (the challenge's Val/) lists its images with NaN
  labels, for prediction and pseudo-labelling."""
  columns = ("Slice_Name", "Covid-19_percentage", "Subject")
  challenge = os.path.isfile(os.path.join(root, "Train.csv")) or os.path.isdir(os.path.join(root, "Train"))
  if challenge or split != "train":
    folder = os.path.join(root, split.capitalize())
    table = os.path.join(root, f"{split.capitalize()}.csv")
    need_dir(folder, "per_covid19")
    if not os.path.isfile(table) and unlabeled_ok:
      names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
      entries = [Entry(os.path.join(folder, n), float("nan"), n, f"{split.capitalize()}/ (unlabeled)")
                 for n in names]
      return FileSource(f"per_covid19 {split} (unlabeled)", entries, "regression", window=window)
    if not os.path.isfile(table):
      raise DataError(f"per_covid19: label file {table} is missing"
                      + (" (the challenge's Val/ and Test/ are unlabeled; add a "
                         f"{split.capitalize()}.csv to evaluate on them)" if split != "train" else ""))
    rows = pick_columns(read_table(table), columns, table,
                        aliases={"Slice_Name": ("image", "name"), "Covid-19_percentage": ("percentage",)},
                        problems=problems)
    name_col, pct_col, subj_col = columns
  else:
    folder = need_dir(os.path.join(root, "Images"), "per_covid19 (original release)")
    sheets = [p for ext in ("xlsx", "csv") for p in sorted(glob.glob(os.path.join(root, f"*.{ext}")))]
    if not sheets:
      raise DataError(f"per_covid19: {root} has neither Train.csv (challenge layout) nor a database "
                      "sheet (.xlsx or .csv) beside Images/ (original release)")
    table = sheets[0]
    cols = ("Image", "Percentage", "Fold", "Subject")
    rows = pick_columns(read_table(table), cols, table,
                        aliases={"Image": ("slice_name", "image_name", "name"),
                                 "Percentage": ("covid-19_percentage", "covid19_percentage",
                                                "covid-19 infection percentage"),
                                 "Subject": ("subject_id", "patient", "patient_id")}, problems=problems)
    name_col, pct_col, _, subj_col = cols
  entries = []
  for n, row in rows:
    where = f"{os.path.basename(table)} line {n}"
    pct = parse_percentage(row[pct_col], where, problems)
    if pct is not None:
      entries.append(Entry(os.path.join(folder, row[name_col]), pct, row[subj_col] or row[name_col], where))
  entries = check_files(entries, problems)
  problems.report()
  return FileSource(f"per_covid19 {split} ({os.path.basename(table)})", entries, "regression", window=window)

