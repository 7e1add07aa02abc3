"""What every mode does with its workdir: makes it, writes its JSON results there and announces
its headline. Every process runs the same mode; only process 0 writes and prints."""

from __future__ import annotations

import json
import os

import jax
from absl import logging

from cxflax.errors import ConfigError


def prepare_workdir(workdir: str) -> str:
  """workdir as an absolute path, created if missing; a file there is a ConfigError."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir!r} exists and is not a directory")
  os.makedirs(workdir, exist_ok=True)
  return workdir


def write_json(workdir: str, name: str, payload: dict) -> None:
  """workdir/name: the mode's results (numpy scalars written as floats)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, name), "w") as f:
      json.dump(payload, f, indent=2, default=float)


def announce(line: str) -> None:
  """A mode's result line: logged, and printed to stdout once (where scripts and users read it)."""
  logging.info(line)
  if jax.process_index() == 0:
    print(line, flush=True)
