"""Writing a file so that a kill or a full disk never leaves half of it: the one place for this,
used by the modes' results (cxflax.train) and by the data writers (cxflax.data), which must not
import jax (reading a config or exporting a dataset does not start it)."""

from __future__ import annotations

import contextlib
import csv
import errno
import os
from typing import IO, Iterator

from cxflax.errors import WorkdirError


def os_error_reason(e: Exception, code: int | None = None) -> str:
  """An OS error as its message and code name: 'No space left on device (ENOSPC)'."""
  code = code if code is not None else getattr(e, "errno", None)
  if code is None:
    return str(e)
  return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", newline: str | None = None,
                sync: bool = True) -> Iterator[IO]:
  """A file object whose contents replace `path` only once all of them are written (a temporary
  file beside it, then a rename): a run killed or out of disk mid-write leaves the previous file
  whole and no temporary behind. A disk error is a WorkdirError naming `path`. `sync=False`
  skips the fsync, for files written by the thousand (images) where a power cut, not a kill, is
  the only way to lose one."""
  path = os.fspath(path)
  tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(tmp, mode, newline=newline) as f:
      yield f
      if sync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError) and not isinstance(e, WorkdirError):
      kept = " (the previous file is left as it was)" if os.path.exists(path) else ""
      raise WorkdirError(f"cannot write {path}: {os_error_reason(e)}{kept}") from None
    raise


def write_csv(path: str | os.PathLike, rows, header=None) -> None:
  """A CSV file (header row, if given, then `rows`), written atomically by the calling process."""
  with atomic_file(path, newline="") as f:
    w = csv.writer(f)
    if header:
      w.writerow(header)
    w.writerows(rows)


def write_text(path: str | os.PathLike, lines) -> None:
  """A text file of `lines`, each ended by a newline, written atomically."""
  with atomic_file(path) as f:
    f.writelines(line + "\n" for line in lines)
