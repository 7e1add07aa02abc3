"""Label tables (CSV with or without a header, xlsx) and the bad-data policy every file layout
shares: a bad entry stops the run naming its file and line, or, under
config.data.on_bad_data='skip', is left out and counted in the log."""

from __future__ import annotations

import csv
import os
import re
from typing import Callable, Sequence

from absl import logging

from cxflax.data.images import read_image
from cxflax.data.sources.base import Entry, FileSource
from cxflax.errors import ConfigError, DataError


class Problems:
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


def check_files(entries: list[Entry], problems: Problems) -> list[Entry]:
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


def norm(s: str) -> str:
  """A name as compared with another: case, spaces, '_' and '-' ignored."""
  return re.sub(r"[\s_\-]", "", str(s)).lower()


def read_table(path: str) -> list[tuple[int, list[str]]]:
  """(line number, cells) of every non-empty row of a .csv or .xlsx file."""
  if not os.path.isfile(path):
    raise DataError(f"label file {path} is missing")
  if path.lower().endswith((".xlsx", ".xlsm")):
    import openpyxl
    try:
      book = openpyxl.load_workbook(path, read_only=True, data_only=True)
      rows = [(n, ["" if c is None else str(c) for c in row])
              for n, row in enumerate(book.worksheets[0].iter_rows(values_only=True), start=1)]
    except Exception as e:  # openpyxl raises many types for files that are not workbooks
      raise DataError(f"{path}: cannot read spreadsheet ({type(e).__name__}: {e})") from None
  else:
    try:
      with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(enumerate(csv.reader(f), start=1))
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not a UTF-8 text file ({e})") from None
    except csv.Error as e:  # e.g. a field past csv's size limit: not a table
      raise DataError(f"{path}: not a readable CSV table ({e})") from None
  rows = [(n, r) for n, r in rows if any(c.strip() for c in r)]
  if not rows:
    raise DataError(f"{path} is empty")
  return rows


def read_lines(path: str) -> list[tuple[int, str]]:
  """(line number, stripped text) of every non-empty line of a text listing."""
  try:
    with open(path, encoding="utf-8") as f:
      return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not a UTF-8 text file ({e})") from None


def pick_columns(rows, columns: Sequence[str], path: str, aliases: dict[str, Sequence[str]] | None = None,
                 optional: Sequence[str] = (), problems: Problems | None = None
                 ) -> list[tuple[int, dict[str, str]]]:
  """Rows as {column: value}. A first row naming the columns (case, spaces, '_' and '-' ignored;
  `aliases` give other accepted names) is a header; without one, columns are taken in order.
  A row too short for the required columns, or with values beyond the columns its header names
  (a value in a field of its own that shifted the others, like an unquoted comma), is reported
  to `problems` (an error without); without a header, fields after the expected ones are the
  user's own and ignored."""
  aliases = aliases or {}
  names = {c: [norm(c)] + [norm(a) for a in aliases.get(c, ())] for c in columns}
  first = [norm(c) for c in rows[0][1]]
  found = {c: next((first.index(a) for a in names[c] if a in first), None) for c in columns}
  if any(v is not None for v in found.values()):
    absent = [c for c, v in found.items() if v is None and c not in optional]
    if absent:
      raise DataError(f"{path}: header {rows[0][1]} lacks column(s) {absent}; expected {list(columns)}")
    header, order, rows = rows[0][1], found, rows[1:]
  else:
    header, order = None, {c: i for i, c in enumerate(columns)}
  required = [c for c in columns if c not in optional]
  out = []
  for n, row in rows:
    message = None
    if len(row) <= max(order[c] for c in required):
      message = f"{path}, line {n}: expected columns {list(columns)}, got {len(row)} field(s): {row}"
    elif header is not None and any(f.strip() for f in row[len(header):]):
      message = f"{path}, line {n}: {len(row)} fields where the header names {len(header)}: {row}"
    if message is not None:
      if problems is None:
        raise DataError(message)
      problems(message)
      continue
    out.append((n, {c: (row[i].strip() if i is not None and i < len(row) else "")
                    for c, i in order.items()}))
  return out


def parse_percentage(value: str, where: str, problems: Problems) -> float | None:
  """An infection percentage in 0..100, or None after reporting the bad value."""
  try:
    v = float(value)
  except ValueError:
    problems(f"{where}: percentage {value!r} is not a number")
    return None
  if not 0.0 <= v <= 100.0:  # also catches NaN
    problems(f"{where}: percentage {v} is outside 0..100")
    return None
  return v


def class_index(value: str, classes: Sequence[str], where: str, problems: Problems,
                aliases: dict[str, str] | None = None) -> int | None:
  """Index of `value` in `classes` (compared as by norm; `aliases` map other names to a class),
  or None after reporting an unknown class."""
  key = norm(value)
  lookup = {norm(c): i for i, c in enumerate(classes)}
  lookup.update({norm(a): classes.index(c) for a, c in (aliases or {}).items()})
  if key not in lookup:
    problems(f"{where}: unknown class {value!r} (known: {', '.join(classes)})")
    return None
  return lookup[key]


def need_dir(path: str, what: str) -> str:
  """`path`, or an error naming the layout (`what`) that expects that folder."""
  if not os.path.isdir(path):
    raise DataError(f"{what}: folder {path} is missing")
  return path


def is_number(s: str) -> bool:
  """Whether a cell reads as a number (a csv source regresses when every label does)."""
  try:
    float(s)
    return True
  except ValueError:
    return False


def verify_images(source: FileSource, problems: Problems, threads: int = 8) -> FileSource:
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


def read_files(data_config, name: str, split: str,
               read: Callable[[str, Problems, object], FileSource]) -> FileSource:
  """`read(root, problems, window)` of a file layout, framed by the checks all of them share:
  config.data.root first, every image decoded after (when asked for, and always when skipping)."""
  root = data_config.root
  if not root:
    raise ConfigError(f"config.data.root must point at the {name} dataset folder")
  if not os.path.isdir(root):
    raise DataError(f"{name}: config.data.root {root!r} is not a directory")
  problems = Problems(f"{name} {split}", data_config.on_bad_data)
  try:
    source = read(root, problems, data_config.window or None)
    if data_config.verify_images or data_config.on_bad_data == "skip":
      source = verify_images(source, problems)
  except DataError as e:
    if not problems.found:
      raise
    # e.g. nothing left: say what was skipped on the way
    raise DataError(f"{e} ({len(problems.found)} bad entr{'y' if len(problems.found) == 1 else 'ies'} "
                    f"skipped under config.data.on_bad_data='skip', e.g. {problems.found[0]})") from None
  return source
