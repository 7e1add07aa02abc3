"""Data sources: the datasets of the papers as they sit on disk, and the built-in phantom.

A source is random access: it knows, without reading pixels, how many examples it has and each
one's label and subject (for subject-grouped, stratified folds). ``load(i)`` reads example i:
'image' (H, W, C) uint8 / uint16 (float32 in [0, 1] for windowed DICOM) and 'label' (float32
percentage for regression, int32 class index for classification), plus masks where known.

Layouts (``config.data.source``, rooted at ``config.data.root``):

  per_covid19  Per-COVID-19 challenge: Train/, Val/ [, Test/], Train.csv (Slice_Name,
               Covid-19_percentage, Subject; header optional), Val.csv where labelled; or the
               original release: Images/ and Database_new.xlsx / .csv (image name, percentage,
               fold, subject).
  covidx       COVID-Net: train/, test/ and label files of "patientid filename label [source]"
               lines (3 classes normal/pneumonia/COVID-19, or v1's 4: normal/bacteria/viral/COVID-19).
  covid_ct     UCSD-AI4H COVID-CT: CT_COVID/, CT_NonCOVID/ (or under Images-processed/) and
               Data-split/{COVID,NonCOVID}/{train,val,test}CT_{COVID,NonCOVID}.txt.
  flannel      FLANNEL's data: covid-chestxray-dataset/ (metadata.csv, images/; AP/PA X-rays)
               and Kaggle's chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}; classes COVID-19,
               viral, bacterial, normal.
  folder       one folder per class (root/<class>/, or root/<split>/<class>/).
  csv          a CSV of path,label[,subject] per split (config.data.train_file, ...).
  phantom      the built-in procedural data.

Bad entries — a listed file that is missing, a percentage outside 0..100, an unknown class — are
errors that name the file and line, or, with config.data.on_bad_data='skip', are left out and
counted in the log.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import re
from typing import Any, Sequence

import numpy as np
from absl import logging

from cxflax.data import phantom as phantom_lib
from cxflax.data.images import IMAGE_EXTENSIONS, read_image
from cxflax.errors import ConfigError, DataError

TASKS = ("regression", "classification")
SPLITS = ("train", "val", "test")
FLANNEL_CLASSES = ("COVID-19", "viral", "bacterial", "normal")
COVIDX3_CLASSES = ("normal", "pneumonia", "COVID-19")
COVIDX4_CLASSES = ("normal", "bacteria", "viral", "COVID-19")
COVID_CT_CLASSES = ("NonCOVID", "COVID")


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

  def strata(self) -> np.ndarray:
    """What folds are stratified by: the class, or the severity category of a percentage."""
    labels = self.labels()
    if self.task == "classification":
      return labels.astype(np.int64)
    return np.array([phantom_lib.severity_class(float(v)) for v in labels], np.int64)

  def load(self, i: int) -> dict[str, Any]:
    raise NotImplementedError

  def describe(self, i: int) -> str:
    """Where example i comes from (a file path, a row), for error messages."""
    raise NotImplementedError

  def example_name(self, i: int) -> str:
    """Example i's file name (as prediction files list it)."""
    raise NotImplementedError


class PhantomSource(Source):
  """The built-in procedural data (see cxflax.data.phantom): CT regression or CXR classes."""

  def __init__(self, kind: str = "ct", num_subjects: int = 64, image_size: int = 512,
               slices_per_subject=(3, 6), seed: int = 0, covid_labels: bool = False,
               covid_min_percentage: float = 0.0):
    self.phantom = phantom_lib.Phantom(kind, num_subjects, image_size, tuple(slices_per_subject), seed)
    self._labels = None
    self.covid_labels = covid_labels and kind == "ct"
    self.covid_min_percentage = float(covid_min_percentage)
    if not 0.0 <= self.covid_min_percentage < 100.0:
      raise ConfigError(f"phantom covid_min_percentage must be in [0, 100), got {covid_min_percentage}")
    if kind == "cxr":
      self.task, self.class_names = "classification", phantom_lib.CXR_CLASS_NAMES
    elif self.covid_labels:  # COVID-CT-like: a slice is COVID when lesions cover > min % of its lung
      self.task, self.class_names = "classification", COVID_CT_CLASSES

  def __len__(self):
    return len(self.phantom)

  def subjects(self):
    return [f"phantom{self.phantom.subject(i):05d}" for i in range(len(self))]

  def labels(self):
    if self._labels is None:  # CT labels come from rendering the masks: compute them once
      if self.phantom.kind == "cxr":
        self._labels = np.array([self.phantom.subject_class(self.phantom.subject(i))
                                 for i in range(len(self))], np.int32)
      else:
        pct = np.array([self.phantom.percentage(i) for i in range(len(self))], np.float32)
        self._labels = self._covid(pct).astype(np.int32) if self.covid_labels else pct
    return self._labels

  def load(self, i):
    ex = self.phantom[i]
    if self.phantom.kind == "cxr":
      label = ex["label"]
    else:
      label = np.int32(self._covid(ex["percentage"])) if self.covid_labels else ex["percentage"]
    return dict(image=ex["image"], label=label, lung_mask=ex["lung_mask"],
                lesion_mask=ex["lesion_mask"])

  def _covid(self, percentage):
    return np.asarray(percentage) > self.covid_min_percentage

  def describe(self, i):
    return f"phantom sample {i} ({self.phantom.kind}, seed {self.phantom.seed})"

  def example_name(self, i):
    return f"Image_{i:05d}.png"  # the name export.py gives it


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
    dtype = np.int32 if task == "classification" else np.float32
    self._labels = np.asarray([e.label for e in entries], dtype)

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
    self._labels = np.asarray(labels, np.int32 if base.task == "classification" else np.float32)

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
    from PIL import Image
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

  def strata(self):
    return self.base.strata()

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
  paths = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                 if p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p))
  if not paths:
    raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
  entries = [Entry(p, np.nan, os.path.relpath(p, folder), p) for p in paths]
  return FileSource(folder, entries, "regression")


class _Problems:
  """Collects bad entries: raises on the first under 'error', counts and logs them under 'skip'."""

  def __init__(self, name: str, policy: str):
    if policy not in ("error", "skip"):
      raise ConfigError(f"config.data.on_bad_data must be 'error' or 'skip', got {policy!r}")
    self.name, self.policy, self.found, self._reported = name, policy, [], 0

  def __call__(self, message: str) -> None:
    if self.policy == "error":
      raise DataError(message)
    self.found.append(message)

  def report(self) -> None:
    """Logs the entries skipped since the last report."""
    new = self.found[self._reported:]
    self._reported = len(self.found)
    if new:
      logging.warning("%s: skipped %d bad entr%s (config.data.on_bad_data='skip'), e.g. %s",
                      self.name, len(new), "y" if len(new) == 1 else "ies", "; ".join(new[:3]))


def _check_files(entries: list[Entry], problems: _Problems) -> list[Entry]:
  """Entries whose file exists; the others are reported (by path and listing line)."""
  kept = []
  missing = [e for e in entries if not os.path.isfile(e.path)]
  if missing and problems.policy == "error":
    listed = ", ".join(f"{e.path} ({e.where})" for e in missing[:5])
    raise DataError(f"{problems.name}: {len(missing)} listed image(s) missing: {listed}"
                    + (" ..." if len(missing) > 5 else ""))
  for e in entries:
    if os.path.isfile(e.path):
      kept.append(e)
    else:
      problems(f"{e.path} ({e.where}) is missing")
  return kept


# --- tables (CSV with or without header, xlsx) -------------------------------------------------


def _norm(s: str) -> str:
  return re.sub(r"[\s_\-]", "", str(s)).lower()


def read_table(path: str) -> list[tuple[int, list[str]]]:
  """(line number, cells) of every non-empty row of a .csv or .xlsx file."""
  if not os.path.isfile(path):
    raise DataError(f"label file {path} is missing")
  if path.lower().endswith((".xlsx", ".xlsm")):
    import openpyxl
    try:
      book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:
      raise DataError(f"{path}: cannot read spreadsheet ({type(e).__name__}: {e})") from None
    rows = [(n, ["" if c is None else str(c) for c in row])
            for n, row in enumerate(book.worksheets[0].iter_rows(values_only=True), start=1)]
  else:
    try:
      with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(enumerate(csv.reader(f), start=1))
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not a UTF-8 text file ({e})") from None
  rows = [(n, r) for n, r in rows if any(c.strip() for c in r)]
  if not rows:
    raise DataError(f"{path} is empty")
  return rows


def pick_columns(rows, columns: Sequence[str], path: str, aliases: dict[str, Sequence[str]] | None = None,
                 optional: Sequence[str] = ()) -> list[tuple[int, dict[str, str]]]:
  """Rows as {column: value}. A first row naming the columns (case, spaces, '_' and '-' ignored;
  `aliases` give other accepted names) is a header; without one, columns are taken in order."""
  aliases = aliases or {}
  names = {c: [_norm(c)] + [_norm(a) for a in aliases.get(c, ())] for c in columns}
  first = [_norm(c) for c in rows[0][1]]
  found = {c: next((first.index(a) for a in names[c] if a in first), None) for c in columns}
  if any(v is not None for v in found.values()):
    absent = [c for c, v in found.items() if v is None and c not in optional]
    if absent:
      raise DataError(f"{path}: header {rows[0][1]} lacks column(s) {absent}; expected {list(columns)}")
    order, rows = found, rows[1:]
  else:
    order = {c: i for i, c in enumerate(columns)}
  required = [c for c in columns if c not in optional]
  out = []
  for n, row in rows:
    if len(row) <= max(order[c] for c in required):
      raise DataError(f"{path}, line {n}: expected columns {list(columns)}, got {len(row)} "
                      f"field(s): {row}")
    out.append((n, {c: (row[i].strip() if i is not None and i < len(row) else "")
                    for c, i in order.items()}))
  return out


def _percentage(value: str, where: str, problems: _Problems) -> float | None:
  try:
    v = float(value)
  except ValueError:
    problems(f"{where}: percentage {value!r} is not a number")
    return None
  if not 0.0 <= v <= 100.0:  # also catches NaN
    problems(f"{where}: percentage {v} is outside 0..100")
    return None
  return v


def _class_index(value: str, classes: Sequence[str], where: str, problems: _Problems,
                 aliases: dict[str, str] | None = None) -> int | None:
  key = _norm(value)
  lookup = {_norm(c): i for i, c in enumerate(classes)}
  lookup.update({_norm(a): classes.index(c) for a, c in (aliases or {}).items()})
  if key not in lookup:
    problems(f"{where}: unknown class {value!r} (known: {', '.join(classes)})")
    return None
  return lookup[key]


# --- layouts -------------------------------------------------------------------------------------


def _need_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise DataError(f"{what}: folder {path} is missing")
  return path


def per_covid19(root: str, split: str, problems: _Problems, window=None,
                unlabeled_ok: bool = False) -> FileSource:
  """Per-COVID-19, challenge layout or original release (see the module docstring). With
  unlabeled_ok, a split without its label file (the challenge's Val/) lists its images with NaN
  labels, for prediction and pseudo-labelling."""
  columns = ("Slice_Name", "Covid-19_percentage", "Subject")
  challenge = os.path.isfile(os.path.join(root, "Train.csv")) or os.path.isdir(os.path.join(root, "Train"))
  if challenge or split != "train":
    folder = os.path.join(root, split.capitalize())
    table = os.path.join(root, f"{split.capitalize()}.csv")
    _need_dir(folder, "per_covid19")
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
                        aliases={"Slice_Name": ("image", "name"), "Covid-19_percentage": ("percentage",)})
    name_col, pct_col, subj_col = columns
  else:
    folder = _need_dir(os.path.join(root, "Images"), "per_covid19 (original release)")
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
                                 "Subject": ("subject_id", "patient", "patient_id")})
    name_col, pct_col, _, subj_col = cols
  entries = []
  for n, row in rows:
    where = f"{os.path.basename(table)} line {n}"
    pct = _percentage(row[pct_col], where, problems)
    if pct is not None:
      entries.append(Entry(os.path.join(folder, row[name_col]), pct, row[subj_col] or row[name_col], where))
  entries = _check_files(entries, problems)
  problems.report()
  return FileSource(f"per_covid19 {split}", entries, "regression", window=window)


def _find_list(root: str, split: str, given: str) -> str:
  if given:
    return given if os.path.isabs(given) else os.path.join(root, given)
  candidates = sorted(p for p in glob.glob(os.path.join(root, f"{split}*.txt")))
  if len(candidates) != 1:
    raise DataError(f"covidx: cannot tell the {split} label file in {root} (found "
                    f"{[os.path.basename(c) for c in candidates] or 'none'}); set "
                    f"config.data.{split}_file")
  return candidates[0]


def covidx(root: str, split: str, problems: _Problems, list_file: str = "", window=None,
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
  folder = _need_dir(os.path.join(root, split), "covidx")
  with open(path, encoding="utf-8") as f:
    lines = [(n, line.split()) for n, line in enumerate(f, start=1) if line.strip()]
  if not lines:
    raise DataError(f"{path} is empty")
  raw = {_norm(t[2]) for _, t in lines if len(t) >= 3}
  classes = tuple(class_names) or (COVIDX4_CLASSES if raw & {"bacteria", "viral"} else COVIDX3_CLASSES)
  entries = []
  for n, tokens in lines:
    where = f"{os.path.basename(path)} line {n}"
    if len(tokens) < 3:
      problems(f"{where}: expected 'patientid filename label [source]', got {' '.join(tokens)!r}")
      continue
    label = _class_index(tokens[2], classes, where, problems,
                         aliases={"covid19": "COVID-19", "covid": "COVID-19"})
    if label is not None:
      entries.append(Entry(os.path.join(folder, tokens[1]), label, tokens[0], where))
  entries = _check_files(entries, problems)
  problems.report()
  return FileSource(f"covidx {split}", entries, "classification", classes, window)


def covid_ct(root: str, split: str, problems: _Problems, window=None) -> FileSource:
  """UCSD-AI4H COVID-CT with its Data-split lists (file names may contain '%')."""
  base = os.path.join(root, "Images-processed") if os.path.isdir(os.path.join(root, "Images-processed")) else root
  entries = []
  for label, cls in enumerate(COVID_CT_CLASSES):
    folder = _need_dir(os.path.join(base, f"CT_{cls}"), "covid_ct")
    listing = os.path.join(root, "Data-split", cls, f"{split}CT_{cls}.txt")
    if not os.path.isfile(listing):
      raise DataError(f"covid_ct: split list {listing} is missing")
    with open(listing, encoding="utf-8") as f:
      for n, line in enumerate(f, start=1):
        name = line.strip()
        if name:
          # Slices of one scan share the name before '%' (e.g. '12%0.png', '12%1.png').
          subject = f"{cls}/{os.path.splitext(name)[0].split('%')[0]}"
          entries.append(Entry(os.path.join(folder, name), label, subject,
                               f"{os.path.relpath(listing, root)} line {n}"))
  entries = _check_files(entries, problems)
  problems.report()
  return FileSource(f"covid_ct {split}", entries, "classification", COVID_CT_CLASSES, window)


def _flannel_class(finding: str) -> str | None:
  f = finding.lower()
  if "covid" in f:
    return "COVID-19"
  if "viral" in f:
    return "viral"
  if "bacterial" in f:
    return "bacterial"
  if "no finding" in f:
    return "normal"
  return None


def flannel(root: str, split: str, problems: _Problems, window=None) -> FileSource:
  """FLANNEL's data: AP/PA X-rays of covid-chestxray-dataset plus Kaggle's chest_xray."""
  if split != "train":
    raise DataError("flannel has one pool of images split by folds; use config.data.eval_split='fold'")
  entries, other = [], 0
  cxr = os.path.join(root, "covid-chestxray-dataset")
  meta = os.path.join(cxr, "metadata.csv")
  if os.path.isfile(meta):
    rows = pick_columns(read_table(meta), ("patientid", "finding", "view", "modality", "folder", "filename"),
                        meta, optional=("modality", "folder"))
    for n, row in rows:
      if row["view"].split(" ")[0].upper() not in ("AP", "PA") or row["modality"] not in ("", "X-ray"):
        continue
      cls = _flannel_class(row["finding"])
      if cls is None:
        other += 1
        continue
      folder = os.path.join(cxr, row["folder"] or "images")
      entries.append(Entry(os.path.join(folder, row["filename"]), FLANNEL_CLASSES.index(cls),
                           f"cxr/{row['patientid']}", f"metadata.csv line {n}"))
  kaggle = os.path.join(root, "chest_xray")
  for sub in ("train", "val", "test"):
    for group in ("NORMAL", "PNEUMONIA"):
      for path in sorted(glob.glob(os.path.join(kaggle, sub, group, "*"))):
        name = os.path.basename(path)
        if not name.lower().endswith(IMAGE_EXTENSIONS):
          continue
        if group == "NORMAL":
          cls = "normal"
        elif "virus" in name.lower():
          cls = "viral"
        elif "bacteria" in name.lower():
          cls = "bacterial"
        else:
          problems(f"{path}: PNEUMONIA image named neither '*virus*' nor '*bacteria*'")
          continue
        # person12_bacteria_45.jpeg → person12; IM-0115-0001.jpeg → IM-0115
        subject = name.split("_")[0] if "_" in name else "-".join(name.split("-")[:2])
        entries.append(Entry(path, FLANNEL_CLASSES.index(cls), f"kaggle/{subject}", f"chest_xray/{sub}/{group}"))
  if not entries:
    raise DataError(f"flannel: no images under {cxr} (metadata.csv) or {kaggle}/{{train,val,test}}/"
                    "{NORMAL,PNEUMONIA}")
  if other:
    logging.info("flannel: %d AP/PA X-rays of covid-chestxray-dataset have other findings and are "
                 "not used", other)
  entries = _check_files(entries, problems)
  problems.report()
  return FileSource("flannel", entries, "classification", FLANNEL_CLASSES, window)


def folder_source(root: str, split: str, problems: _Problems, class_names=(), window=None) -> FileSource:
  """One folder per class: root/<split>/<class>/ if present, else (train only) root/<class>/."""
  base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
  if base == root and split != "train":
    raise DataError(f"folder: {root} has no {split}/ subfolder")
  found = sorted(d for d in os.listdir(_need_dir(base, "folder")) if os.path.isdir(os.path.join(base, d))
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
    for path in sorted(glob.glob(os.path.join(base, cls, "*"))):
      if path.lower().endswith(IMAGE_EXTENSIONS):
        stem = os.path.splitext(os.path.basename(path))[0]
        entries.append(Entry(path, label, f"{cls}/{stem}", f"{cls}/"))
  problems.report()
  return FileSource(f"folder {split}", entries, "classification", classes, window)


def csv_source(root: str, split: str, problems: _Problems, table: str, class_names=(),
               window=None) -> FileSource:
  """A CSV of path,label[,subject]: numeric labels make a regression task unless class_names
  are given; paths are relative to the CSV's folder."""
  if not table:
    raise ConfigError(f"the csv source needs config.data.{split}_file")
  table = table if os.path.isabs(table) else os.path.join(root, table)
  rows = pick_columns(read_table(table), ("path", "label", "subject"), table,
                      aliases={"path": ("image", "file", "filename"), "label": ("class", "target")},
                      optional=("subject",))
  base = os.path.dirname(table)
  numeric = not class_names and all(_is_number(r["label"]) for _, r in rows)
  classes = tuple(class_names) or (None if numeric else tuple(sorted({r["label"] for _, r in rows})))
  entries = []
  for n, row in rows:
    where = f"{os.path.basename(table)} line {n}"
    if classes is None:
      label = float(row["label"])
      if not np.isfinite(label):
        problems(f"{where}: label {row['label']!r} is not finite")
        continue
    else:
      label = _class_index(row["label"], classes, where, problems)
      if label is None:
        continue
    path = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
    entries.append(Entry(path, label, row.get("subject") or row["path"], where))
  entries = _check_files(entries, problems)
  problems.report()
  return FileSource(f"csv {os.path.basename(table)}", entries,
                    "regression" if classes is None else "classification", classes, window)


def _is_number(s: str) -> bool:
  try:
    float(s)
    return True
  except ValueError:
    return False


SOURCES = ("phantom", "per_covid19", "covidx", "covid_ct", "flannel", "folder", "csv", "tfds")


def make_source(data_config, split: str = "train", unlabeled_ok: bool = False) -> Source:
  """The source named by ``config.data.source`` for `split` ('train', 'val' or 'test');
  unlabeled_ok lets a split without labels through (per_covid19's Val/, for prediction)."""
  name = data_config.source
  if split not in SPLITS:
    raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
  if name not in SOURCES:
    raise ConfigError(f"unknown data source {name!r}; known sources: {', '.join(SOURCES)}")
  source = _make_base_source(data_config, name, split, unlabeled_ok)
  if data_config.get("mask_dir"):
    source = WithMasks(source, data_config.mask_dir)
  if data_config.get("target", "label") != "label":
    source = SegmentationTarget(source, data_config.target)
  return source


def _make_base_source(data_config, name: str, split: str, unlabeled_ok: bool) -> Source:
  if name == "phantom":
    p = data_config.phantom
    return PhantomSource(p.kind, p.num_subjects, data_config.image_size, p.slices_per_subject,
                         p.seed + 1_000_003 * SPLITS.index(split), p.get("covid_labels", False),
                         p.get("covid_min_percentage", 0.0))
  if name == "tfds":
    from cxflax.data.tfds_source import TfdsSource
    return TfdsSource(data_config.tfds_name, split, data_config.root)
  root = data_config.root
  if not root:
    raise ConfigError(f"config.data.root must point at the {name} dataset folder")
  if not os.path.isdir(root):
    raise DataError(f"{name}: config.data.root {root!r} is not a directory")
  problems = _Problems(f"{name} {split}", data_config.on_bad_data)
  window = data_config.window or None
  if name == "per_covid19":
    source = per_covid19(root, split, problems, window, unlabeled_ok)
  elif name == "covidx":
    source = covidx(root, split, problems, data_config.get(f"{split}_file", ""), window,
                    data_config.class_names)
  elif name == "covid_ct":
    source = covid_ct(root, split, problems, window)
  elif name == "flannel":
    source = flannel(root, split, problems, window)
  elif name == "folder":
    source = folder_source(root, split, problems, data_config.class_names, window)
  else:
    source = csv_source(root, split, problems, data_config.get(f"{split}_file", ""),
                        data_config.class_names, window)
  if data_config.verify_images or data_config.on_bad_data == "skip":
    source = verify_images(source, problems)
  return source


def verify_images(source: FileSource, problems: _Problems, threads: int = 8) -> FileSource:
  """Decodes every image once, up front, so that a corrupt file stops the run before training
  (or, under on_bad_data='skip', is left out) rather than failing deep inside an epoch."""
  from concurrent.futures import ThreadPoolExecutor

  def check(i):
    try:
      read_image(source.paths[i], source.window)
      return None
    except DataError as e:
      return f"{e} ({source.wheres[i]})"

  logging.info("%s: verifying %d images", source.name, len(source))
  with ThreadPoolExecutor(threads) as pool:
    results = list(pool.map(check, range(len(source))))
  bad = [i for i, r in enumerate(results) if r]
  for i in bad:
    problems(results[i])
  problems.report()
  if not bad:
    return source
  keep = [i for i in range(len(source)) if not results[i]]
  return source.subset(keep)
