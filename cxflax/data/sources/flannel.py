"""FLANNEL's data: covid-chestxray-dataset/ (metadata.csv, images/; AP/PA X-rays) and Kaggle's
chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}; classes COVID-19, viral, bacterial, normal."""

from __future__ import annotations

import glob
import os

from absl import logging

from cxflax.data.images import IMAGE_EXTENSIONS
from cxflax.data.sources.base import Entry, FileSource
from cxflax.data.sources.registry import register
from cxflax.data.sources.tables import Problems, check_files, pick_columns, read_files, read_table
from cxflax.errors import DataError

FLANNEL_CLASSES = ("COVID-19", "viral", "bacterial", "normal")


@register("flannel")
def _from_config(data_config, split, unlabeled_ok):
  return read_files(data_config, "flannel", split,
                    lambda root, problems, window: flannel(root, split, problems, window))


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


def flannel(root: str, split: str, problems: Problems, window=None) -> FileSource:
  """FLANNEL's data: AP/PA X-rays of covid-chestxray-dataset plus Kaggle's chest_xray."""
  if split != "train":
    raise DataError("flannel has one pool of images split by folds; use config.data.eval_split='fold'")
  entries, other = [], 0
  cxr = os.path.join(root, "covid-chestxray-dataset")
  meta = os.path.join(cxr, "metadata.csv")
  if os.path.isfile(meta):
    rows = pick_columns(read_table(meta), ("patientid", "finding", "view", "modality", "folder", "filename"),
                        meta, optional=("modality", "folder"), problems=problems)
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
  entries = check_files(entries, problems)
  problems.report()
  return FileSource("flannel", entries, "classification", FLANNEL_CLASSES, window)

