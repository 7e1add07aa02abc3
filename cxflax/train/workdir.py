"""What every mode does with its workdir: makes it (and checks it can be written before any data
is loaded), locks it against a second run, writes its results there atomically and announces its
headline. Every process runs the same mode; only process 0 writes, locks and prints."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
from typing import Iterator

import jax
from absl import logging

from cxflax.errors import ConfigError, WorkdirError
from cxflax.files import atomic_file, os_error_reason

LOCK_FILE = "cxflax.lock"  # in the workdir of a running train, ensemble or cv: {"pid", "host"}

_held: set[str] = set()  # lock files this process holds


def prepare_workdir(workdir: str) -> str:
  """workdir as an absolute path, created if missing; a file there is a ConfigError, and a folder
  that cannot be made or written (read-only disk, permissions) is a WorkdirError now rather than
  at the first checkpoint, after the data has been loaded and the model compiled."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir!r} exists and is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create --workdir {workdir}: {os_error_reason(e)}") from None
  probe = os.path.join(workdir, f".cxflax-write-test.{socket.gethostname()}.{os.getpid()}")
  try:
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"cannot write to --workdir {workdir}: {os_error_reason(e)}") from None
  return workdir


def write_json(workdir: str, name: str, payload: dict) -> None:
  """workdir/name: the mode's results (numpy scalars written as floats), written atomically."""
  if jax.process_index() == 0:
    with atomic_file(os.path.join(workdir, name)) as f:
      json.dump(payload, f, indent=2, default=float)


@contextlib.contextmanager
def checkpoint_writes(directory: str) -> Iterator[None]:
  """Turns a failure to write a checkpoint (a full or read-only disk: an OSError, or the
  ValueError orbax's tensorstore raises with the OS error code) into a WorkdirError naming the
  checkpoint directory. The checkpoint being written is left incomplete, which orbax ignores:
  a rerun resumes from the last complete one."""
  try:
    yield
  except (OSError, ValueError) as e:
    code = e.errno if isinstance(e, OSError) else _tensorstore_errno(str(e))
    if isinstance(e, WorkdirError) or code is None:
      raise
    raise WorkdirError(f"cannot write a checkpoint to {directory}: {os_error_reason(e, code)}; the last "
                       "complete checkpoint is kept: free space, then run the same command again "
                       "to resume from it") from None


def _tensorstore_errno(message: str) -> int | None:
  """The OS error code in a tensorstore error message ("... [os_error_code='28']"), if any."""
  m = re.search(r"os_error_code='?(\d+)", message)
  return int(m.group(1)) if m else None


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds workdir/cxflax.lock (this process's pid and host) while a run writes the workdir, so
  that a second run started on it is refused instead of both writing the same checkpoints. A
  lock left by a process that is gone (killed, out of memory) is replaced with a warning. Only
  process 0 takes it; the others learn whether it could."""
  path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
  error = None
  if jax.process_index() == 0:
    try:
      _acquire(path)
    except WorkdirError as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))) and error is None:
      error = WorkdirError(f"process 0 could not lock {path} (its error says why)")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if jax.process_index() == 0:
      _held.discard(path)
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _acquire(path: str) -> None:
  """Creates the lock file at `path` (its contents complete before it appears: a hard link of a
  written temporary), replacing a stale one."""
  if path in _held:
    raise WorkdirError(f"{os.path.dirname(path)} is already locked by this process ({path})")
  me = {"pid": os.getpid(), "host": socket.gethostname()}
  tmp = f"{path}.{me['pid']}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(me, f)
    for _ in range(2):
      try:
        _create_exclusive(tmp, path, me)
        _held.add(path)
        return
      except FileExistsError:
        pass
      holder = _read_lock(path)
      if holder is not None and (holder.get("host") != me["host"]
                                 or (holder.get("pid") != me["pid"] and _alive(holder.get("pid")))):
        raise WorkdirError(
            f"{os.path.dirname(path)} is in use by another run: lock file {path} holds pid "
            f"{holder.get('pid')} on host {holder.get('host')}. Wait for that run to end, or, if it "
            f"is no longer running, remove {path}")
      logging.warning("replacing the stale lock %s (%s): its process is no longer running", path,
                      holder if holder is not None else "unreadable")
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    raise WorkdirError(f"cannot lock {os.path.dirname(path)}: {path} keeps reappearing")
  except OSError as e:
    if isinstance(e, WorkdirError):
      raise
    raise WorkdirError(f"cannot create the lock file {path}: {os_error_reason(e)}") from None
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


def _create_exclusive(tmp: str, path: str, content: dict) -> None:
  """Makes `path` a hard link of `tmp`, or raises FileExistsError. Where the filesystem has no
  hard links (some network and FUSE mounts), creates it exclusively and writes it instead."""
  try:
    os.link(tmp, path)
  except FileExistsError:
    raise
  except OSError as e:
    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
      raise
    with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
      json.dump(content, f)


def _read_lock(path: str) -> dict | None:
  """The lock file's {"pid", "host"}, or None where it is gone or unreadable."""
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else None
  except (OSError, ValueError):
    return None


def _alive(pid) -> bool:
  """Whether a process with this pid runs on this host (one of another user counts)."""
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def announce(line: str) -> None:
  """A mode's result line: logged, and printed to stdout once (where scripts and users read it)."""
  logging.info(line)
  if jax.process_index() == 0:
    print(line, flush=True)
