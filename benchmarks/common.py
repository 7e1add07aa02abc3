"""Timing, tables and JSON output shared by the benchmark scripts.

Machines here are noisy: every figure is reported beside a reference measured in the same run,
and each timing is the median of several repeats after a warm-up (compilation excluded).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import jax
import numpy as np


def rel_diff(a, b) -> float:
  """How far outputs `a` are from the reference `b`: the largest absolute difference over the
  largest absolute reference value (so that a faster path that computes something else shows)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def time_call(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time (seconds) of fn(*args), blocking on jax results."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def time_alternately(fns: dict[str, Callable], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
  """Median wall time (seconds) of each zero-argument call in `fns`, timed in turns (the order
  reversed every round) so that a drift of the machine's speed during the run, or the state
  an earlier measurement leaves behind, weighs on all of them alike."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  for r in range(repeats):
    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
      t = time.perf_counter()
      jax.block_until_ready(fns[name]())
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
  widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
  print("  ".join(c.ljust(widths[c]) for c in columns))
  print("  ".join("-" * widths[c] for c in columns))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
  return "" if v is None else str(v)


def write_json(path: str, name: str, rows: Sequence[dict], machine: dict | None = None, **extra) -> str:
  """`machine`: what a script measured elsewhere reports of its devices (benchmarks.gpu_check,
  whose own process leaves the GPU alone); by default this process's jax devices."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                         **(machine if machine is not None else
                            {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()]})},
             "rows": list(rows), **extra}
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  return path


def default_out(name: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
