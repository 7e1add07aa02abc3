"""Writes phantom data to disk in the layouts of the real datasets, to test their readers.

    python -m cxflax.data.export per_covid19 --out /tmp/Per-COVID-19 --subjects 100 --size 512
    python -m cxflax.data.export covidx --out /tmp/COVIDx --subjects 80 --size 256

Layouts (see the modules of cxflax/data/sources/ for what each reader expects):
  per_covid19           challenge release: Train/ + header-less Train.csv, Val/ (unlabeled unless
                        --val-labels writes Val.csv)
  per_covid19_original  original release: Images/ + Database_new.xlsx (name, percentage, fold, subject)
  covidx                train/, test/, train_COVIDx.txt, test_COVIDx.txt (--four-class for v1's labels)
  covid_ct              Images-processed/CT_{COVID,NonCOVID}/ + Data-split lists ('%' in names)
  flannel               covid-chestxray-dataset/{metadata.csv,images/} + chest_xray/{train,val,test}/
  folder                <class>/ folders
  csv                   images/ + train.csv (path,label,subject)
CT layouts use CT phantoms (per_covid19*, covid_ct: COVID = any lesion); X-ray layouts use CXR
phantoms (normal, bacterial, viral, COVID-19).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from cxflax.data.images import write_image
from cxflax.data.phantom import CXR_CLASS_NAMES, Phantom
from cxflax.errors import CxflaxError
from cxflax.files import atomic_file, os_error_reason, write_csv, write_text


class _Progress:
  def __init__(self, what: str, total: int):
    self.what, self.total, self.done, self.t0 = what, total, 0, time.time()

  def step(self):
    self.done += 1
    if self.done % 200 == 0 or self.done == self.total:
      print(f"{self.what}: {self.done}/{self.total} images ({time.time() - self.t0:.0f}s)", file=sys.stderr)


def _write_split(phantom: Phantom, folder: str, csv_path: str | None, progress: str) -> None:
  os.makedirs(folder, exist_ok=True)
  rows, bar = [], _Progress(progress, len(phantom))
  for i in range(len(phantom)):
    ex = phantom[i]
    write_image(os.path.join(folder, ex["name"]), ex["image"])
    rows.append((ex["name"], f"{float(ex['percentage']):.4f}", ex["subject"]))
    bar.step()
  if csv_path:
    write_csv(csv_path, rows)


def export_per_covid19(root: str, num_subjects: int = 100, image_size: int = 512,
                       num_val_subjects: int = 20, seed: int = 0, val_labels: bool = False,
                       slices_per_subject=(3, 6)) -> None:
  """Phantom CT slices in the Per-COVID-19 challenge layout under `root`.

  Train holds Phantom('ct', num_subjects, image_size, seed=seed) in order, so that sample i of
  that phantom is row i of Train.csv; Val holds other subjects (seed + 1).
  """
  train = Phantom("ct", num_subjects, image_size, tuple(slices_per_subject), seed)
  _write_split(train, os.path.join(root, "Train"), os.path.join(root, "Train.csv"), "Train")
  if num_val_subjects:
    val = Phantom("ct", num_val_subjects, image_size, tuple(slices_per_subject), seed + 1)
    _write_split(val, os.path.join(root, "Val"),
                 os.path.join(root, "Val.csv") if val_labels else None, "Val")


def export_per_covid19_original(root: str, num_subjects: int = 40, image_size: int = 256,
                                seed: int = 0, num_folds: int = 5) -> None:
  """The original Per-COVID-19 release: Images/ and Database_new.xlsx with a header row of image
  name, percentage, fold and subject (row i is Phantom('ct', ..., seed) sample i)."""
  import openpyxl
  p = Phantom("ct", num_subjects, image_size, seed=seed)
  folder = os.path.join(root, "Images")
  os.makedirs(folder, exist_ok=True)
  book = openpyxl.Workbook()
  sheet = book.active
  sheet.append(["Image", "Percentage", "Fold", "Subject"])
  bar = _Progress("Images", len(p))
  for i in range(len(p)):
    ex = p[i]
    write_image(os.path.join(folder, ex["name"]), ex["image"])
    sheet.append([ex["name"], round(float(ex["percentage"]), 4), p.subject(i) % num_folds, ex["subject"]])
    bar.step()
  with atomic_file(os.path.join(root, "Database_new.xlsx"), "wb") as f:
    book.save(f)


def _subject_split(phantom: Phantom, fractions) -> list[str]:
  """A split name per sample, assigning whole subjects by the cumulative `fractions`."""
  names, bounds = list(fractions), np.cumsum(list(fractions.values()))
  out = []
  for i in range(len(phantom)):
    u = (phantom.subject(i) + 0.5) / phantom.num_subjects
    out.append(names[int(np.searchsorted(bounds, u, side="right").clip(0, len(names) - 1))])
  return out


def _rgb(image: np.ndarray) -> np.ndarray:
  return np.repeat(image, 3, axis=-1)


def export_covidx(root: str, num_subjects: int = 80, image_size: int = 256, seed: int = 0,
                  four_class: bool = False) -> None:
  """COVIDx: train/ and test/ images (RGB PNG and JPEG, as COVIDx mixes them) and label files of
  'patientid filename label source' lines."""
  names = {"normal": "normal", "bacterial": "bacteria" if four_class else "pneumonia",
           "viral": "viral" if four_class else "pneumonia", "covid19": "COVID-19"}
  p = Phantom("cxr", num_subjects, image_size, (1, 2), seed)
  splits = _subject_split(p, {"train": 0.75, "test": 0.25})
  lines = {"train": [], "test": []}
  bar = _Progress("COVIDx", len(p))
  for i in range(len(p)):
    ex, split = p[i], splits[i]
    os.makedirs(os.path.join(root, split), exist_ok=True)
    name = ex["name"].replace(".png", ".jpg" if i % 3 == 0 else ".png")
    write_image(os.path.join(root, split, name), _rgb(ex["image"]), quality=95)
    lines[split].append(f"{ex['subject']} {name} {names[CXR_CLASS_NAMES[int(ex['label'])]]} phantom")
    bar.step()
  for split, rows in lines.items():
    write_text(os.path.join(root, f"{split}_COVIDx.txt"), rows)


def export_covid_ct(root: str, num_subjects: int = 40, image_size: int = 256, seed: int = 0) -> None:
  """UCSD-AI4H COVID-CT: slices with lesions are COVID, the others NonCOVID; file names carry
  '%' like the real ones ('<subject>%<slice>.png'); Data-split lists by subject (60/20/20)."""
  p = Phantom("ct", num_subjects, image_size, (2, 4), seed)
  splits = _subject_split(p, {"train": 0.6, "val": 0.2, "test": 0.2})
  lists = {(cls, s): [] for cls in ("COVID", "NonCOVID") for s in ("train", "val", "test")}
  bar = _Progress("COVID-CT", len(p))
  for i in range(len(p)):
    ex = p[i]
    cls = "COVID" if ex["percentage"] > 0 else "NonCOVID"
    name = f"{p.subject(i)}%{i}.png"
    folder = os.path.join(root, "Images-processed", f"CT_{cls}")
    os.makedirs(folder, exist_ok=True)
    write_image(os.path.join(folder, name), ex["image"])
    lists[(cls, splits[i])].append(name)
    bar.step()
  for (cls, split), names in lists.items():
    folder = os.path.join(root, "Data-split", cls)
    os.makedirs(folder, exist_ok=True)
    write_text(os.path.join(folder, f"{split}CT_{cls}.txt"), names)


_FINDINGS = {"covid19": "Pneumonia/Viral/COVID-19", "viral": "Pneumonia/Viral/Influenza",
             "bacterial": "Pneumonia/Bacterial/Streptococcus", "normal": "No Finding"}


def export_flannel(root: str, num_subjects: int = 80, image_size: int = 256, seed: int = 0) -> None:
  """FLANNEL's inputs: COVID-19, viral and some bacterial X-rays (AP/PA) in
  covid-chestxray-dataset with metadata.csv (plus lateral and CT rows, which readers must
  skip), normal and pneumonia X-rays in Kaggle's chest_xray/{train,val,test}/."""
  p = Phantom("cxr", num_subjects, image_size, (1, 1), seed)
  cxr = os.path.join(root, "covid-chestxray-dataset")
  os.makedirs(os.path.join(cxr, "images"), exist_ok=True)
  rows, bar = [], _Progress("FLANNEL", len(p))
  header = ["patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "view", "modality",
            "folder", "filename"]
  for i in range(len(p)):
    ex = p[i]
    cls = CXR_CLASS_NAMES[int(ex["label"])]
    if cls in ("covid19", "viral") or (cls == "bacterial" and i % 2 == 0):
      name = f"{ex['subject']}-{i}.png"
      write_image(os.path.join(cxr, "images", name), ex["image"])
      rows.append([ex["subject"], "", "M", "60", _FINDINGS[cls], "Y", "PA" if i % 2 else "AP",
                   "X-ray", "images", name])
    else:
      sub = ("train", "val", "test")[i % 3]
      group = "NORMAL" if cls == "normal" else "PNEUMONIA"
      folder = os.path.join(root, "chest_xray", sub, group)
      os.makedirs(folder, exist_ok=True)
      name = (f"IM-{p.subject(i):04d}-{i:04d}.jpeg" if cls == "normal"
              else f"person{p.subject(i)}_{'bacteria' if cls == 'bacterial' else 'virus'}_{i}.jpeg")
      write_image(os.path.join(folder, name), ex["image"], quality=95)
    bar.step()
  rows.append(["lateral1", "", "F", "50", "Pneumonia/Viral/COVID-19", "Y", "L", "X-ray", "images", "lateral.png"])
  rows.append(["ct1", "", "F", "50", "Pneumonia/Viral/COVID-19", "Y", "Axial", "CT", "images", "ct.png"])
  write_csv(os.path.join(cxr, "metadata.csv"), rows, header)


def export_folder(root: str, num_subjects: int = 40, image_size: int = 128, seed: int = 0) -> None:
  """One folder per CXR class."""
  p = Phantom("cxr", num_subjects, image_size, (1, 1), seed)
  for i in range(len(p)):
    ex = p[i]
    folder = os.path.join(root, CXR_CLASS_NAMES[int(ex["label"])])
    os.makedirs(folder, exist_ok=True)
    write_image(os.path.join(folder, ex["name"]), ex["image"])


def export_csv(root: str, num_subjects: int = 40, image_size: int = 128, seed: int = 0) -> None:
  """images/ and train.csv (header path,label,subject) with the CXR class names."""
  p = Phantom("cxr", num_subjects, image_size, (1, 2), seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  rows = []
  for i in range(len(p)):
    ex = p[i]
    write_image(os.path.join(root, "images", ex["name"]), ex["image"])
    rows.append([f"images/{ex['name']}", CXR_CLASS_NAMES[int(ex["label"])], ex["subject"]])
  write_csv(os.path.join(root, "train.csv"), rows, ["path", "label", "subject"])


LAYOUTS = {"per_covid19": export_per_covid19, "per_covid19_original": export_per_covid19_original,
           "covidx": export_covidx, "covid_ct": export_covid_ct, "flannel": export_flannel,
           "folder": export_folder, "csv": export_csv}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m cxflax.data.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("layout", choices=sorted(LAYOUTS))
  parser.add_argument("--out", required=True, help="folder to write (created)")
  parser.add_argument("--subjects", type=int, default=100)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--val-subjects", type=int, default=20, help="per_covid19: Val/ subjects")
  parser.add_argument("--val-labels", action="store_true", help="per_covid19: also write Val.csv")
  parser.add_argument("--four-class", action="store_true", help="covidx: v1's four labels")
  args = parser.parse_args(argv)
  if os.path.isfile(args.out):
    parser.error(f"--out {args.out!r} is a file")
  kwargs = dict(num_subjects=args.subjects, image_size=args.size, seed=args.seed)
  if args.layout == "per_covid19":
    kwargs.update(num_val_subjects=args.val_subjects, val_labels=args.val_labels)
  if args.layout == "covidx":
    kwargs.update(four_class=args.four_class)
  try:
    LAYOUTS[args.layout](args.out, **kwargs)
  except (CxflaxError, OSError) as e:  # a full or read-only disk: the file it could not write
    message = e if isinstance(e, CxflaxError) else f"cannot write {e.filename}: {os_error_reason(e)}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote the {args.layout} layout to {args.out}")


if __name__ == "__main__":
  main()
