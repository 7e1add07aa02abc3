"""UCSD-AI4H COVID-CT: CT_COVID/, CT_NonCOVID/ (or under Images-processed/) and
Data-split/{COVID,NonCOVID}/{train,val,test}CT_{COVID,NonCOVID}.txt."""

from __future__ import annotations

import os

from cxflax.data.sources.base import Entry, FileSource
from cxflax.data.sources.registry import register
from cxflax.data.sources.tables import Problems, check_files, need_dir, read_files, read_lines
from cxflax.errors import DataError

COVID_CT_CLASSES = ("NonCOVID", "COVID")


@register("covid_ct")
def _from_config(data_config, split, unlabeled_ok):
  return read_files(data_config, "covid_ct", split,
                    lambda root, problems, window: covid_ct(root, split, problems, window))


def covid_ct(root: str, split: str, problems: Problems, window=None) -> FileSource:
  """UCSD-AI4H COVID-CT with its Data-split lists (file names may contain '%')."""
  base = os.path.join(root, "Images-processed") if os.path.isdir(os.path.join(root, "Images-processed")) else root
  entries = []
  for label, cls in enumerate(COVID_CT_CLASSES):
    folder = need_dir(os.path.join(base, f"CT_{cls}"), "covid_ct")
    listing = os.path.join(root, "Data-split", cls, f"{split}CT_{cls}.txt")
    if not os.path.isfile(listing):
      raise DataError(f"covid_ct: split list {listing} is missing")
    for n, name in read_lines(listing):
      # Slices of one scan share the name before '%' (e.g. '12%0.png', '12%1.png').
      subject = f"{cls}/{os.path.splitext(name)[0].split('%')[0]}"
      entries.append(Entry(os.path.join(folder, name), label, subject,
                           f"{os.path.relpath(listing, root)} line {n}"))
  entries = check_files(entries, problems)
  problems.report()
  return FileSource(f"covid_ct {split}", entries, "classification", COVID_CT_CLASSES, window)

