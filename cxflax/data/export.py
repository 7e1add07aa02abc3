"""Writes phantom data to disk in the layouts of the real datasets, to test their readers.

    python -m cxflax.data.export per_covid19 --out /tmp/Per-COVID-19 --subjects 100 --size 512

per_covid19 is the Per-COVID-19 challenge release: ``Train/Image_NNNNN.png`` (8-bit grayscale),
``Train.csv`` without a header (``Slice_Name,Covid-19_percentage,Subject``), and ``Val/`` images
from other subjects, unlabeled as in the challenge (``--val-labels`` adds a ``Val.csv``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

from cxflax.data.images import write_image
from cxflax.data.phantom import Phantom


def _write_split(phantom: Phantom, folder: str, csv_path: str | None, progress: str) -> None:
  os.makedirs(folder, exist_ok=True)
  rows, t0 = [], time.time()
  for i in range(len(phantom)):
    ex = phantom[i]
    write_image(os.path.join(folder, ex["name"]), ex["image"])
    rows.append((ex["name"], f"{float(ex['percentage']):.4f}", ex["subject"]))
    if (i + 1) % 200 == 0 or i + 1 == len(phantom):
      print(f"{progress}: {i + 1}/{len(phantom)} images ({time.time() - t0:.0f}s)", file=sys.stderr)
  if csv_path:
    with open(csv_path, "w", newline="") as f:
      csv.writer(f).writerows(rows)


def export_per_covid19(root: str, num_subjects: int = 100, image_size: int = 512,
                       num_val_subjects: int = 20, seed: int = 0, val_labels: bool = False,
                       slices_per_subject=(3, 6)) -> None:
  """Phantom CT slices in the Per-COVID-19 challenge layout under `root` (see module docstring).

  Train holds Phantom('ct', num_subjects, image_size, seed=seed) in order, so that sample i of
  that phantom is row i of Train.csv; Val holds other subjects (seed + 1).
  """
  train = Phantom("ct", num_subjects, image_size, tuple(slices_per_subject), seed)
  _write_split(train, os.path.join(root, "Train"), os.path.join(root, "Train.csv"), "Train")
  if num_val_subjects:
    val = Phantom("ct", num_val_subjects, image_size, tuple(slices_per_subject), seed + 1)
    _write_split(val, os.path.join(root, "Val"),
                 os.path.join(root, "Val.csv") if val_labels else None, "Val")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m cxflax.data.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("layout", choices=["per_covid19"])
  parser.add_argument("--out", required=True, help="folder to write (created)")
  parser.add_argument("--subjects", type=int, default=100)
  parser.add_argument("--val-subjects", type=int, default=20)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--val-labels", action="store_true", help="also write Val.csv")
  args = parser.parse_args(argv)
  if os.path.isfile(args.out):
    parser.error(f"--out {args.out!r} is a file")
  export_per_covid19(args.out, args.subjects, args.size, args.val_subjects, args.seed, args.val_labels)
  print(f"wrote {args.layout} layout to {args.out}")


if __name__ == "__main__":
  main()
