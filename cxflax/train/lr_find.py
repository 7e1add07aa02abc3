"""--mode=lr_find: fastai v1's learning-rate range test (Learner.lr_find, then
recorder.plot(skip_start=10, skip_end=5, suggestion=True)), written as CSV and a plot, with the
suggested rate."""

from __future__ import annotations

import math
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from cxflax import config as config_lib
from cxflax import parallel
from cxflax.files import atomic_file, write_csv
from cxflax.train import build
from cxflax.train import optim
from cxflax.train.steps import create_train_state, make_train_step
from cxflax.train.workdir import announce, prepare_workdir


def lr_find(config: ml_collections.ConfigDict, workdir: str) -> float:
  """fastai v1's LRFinder: one step per rate, step i at lr_find.start · (end / start) ^ (i / steps)
  (so the sweep stops one step short of `end`), the loss smoothed as fastai's SmoothenValue(0.98)
  (moving average with bias correction), stopping once the smoothed loss exceeds 4x its best or is
  not finite. Writes lr_find.csv and lr_find.png and returns the suggested rate
  (suggest_learning_rate)."""
  config = config_lib.finalize(config)
  workdir = prepare_workdir(workdir)
  mesh = parallel.make_mesh()
  start = build.training_start(config)
  inp, model, variables = start.inp, start.model, start.variables
  f = config.lr_find
  n = int(f.steps)
  rates = f.start * (f.end / f.start) ** (np.arange(n) / n)
  table = jax.numpy.asarray(rates, jax.numpy.float32)
  # The head's group sweeps the rates; the other groups keep their ratio to it.
  head_lr = optim.group_learning_rates(config.optim)[-1]
  tx, _ = optim.make_optimizer(config.optim, variables["params"],
                               lambda lr: lambda t: lr / head_lr * table[jax.numpy.minimum(t, n - 1)])
  state = create_train_state(model, tx, variables, mesh)
  step = make_train_step(model, config, mesh, start.alpha)
  it = iter(inp.train())
  rows, smooth, best = [], 0.0, math.inf
  for i in range(n):
    state, m = step(state, parallel.shard_batch(next(it), mesh))
    loss = float(m["loss"])
    smooth = 0.98 * smooth + 0.02 * loss
    smoothed = smooth / (1 - 0.98 ** (i + 1))
    rows.append((float(rates[i]), loss, smoothed))
    best = min(best, smoothed)
    if not np.isfinite(smoothed) or smoothed > 4 * best:  # fastai's stop_div
      break
  suggested = suggest_learning_rate([r[0] for r in rows], [r[2] for r in rows], f.skip_start, f.skip_end)
  if jax.process_index() == 0:
    write_csv(os.path.join(workdir, "lr_find.csv"), rows, header=["learning_rate", "loss", "smoothed_loss"])
    _plot_lr_find(os.path.join(workdir, "lr_find.png"), rows, suggested)
  announce(f"LR range test over {len(rows)} steps: suggested learning rate {suggested:.3g} "
           f"(steepest descent of the smoothed loss, first {f.skip_start} and last {f.skip_end} "
           f"steps skipped); see {os.path.join(workdir, 'lr_find.png')}")
  return suggested


def suggest_learning_rate(rates, smoothed, skip_start: int = 10, skip_end: int = 5) -> float:
  """fastai v1's recorder.plot(skip_start, skip_end, suggestion=True): the rate at the minimum of
  np.gradient of the smoothed losses, the first skip_start and last skip_end steps left out (the
  first steps' losses are noise around the initial loss; the last ones are the blow-up). Where
  fewer than two steps remain, fastai gives up on the gradient; we return its other printed
  figure, the rate at the lowest smoothed loss divided by 10, and say so."""
  end = len(smoothed) - skip_end
  rates, sm = np.asarray(rates, np.float64), np.asarray(smoothed, np.float64)
  if end - skip_start < 2:
    rate = float(rates[int(np.nanargmin(sm))]) / 10
    logging.warning("LR range test: %d steps leave fewer than 2 after skipping the first %d and last %d; "
                    "suggesting the rate at the lowest loss / 10 (%.3g)", len(sm), skip_start, skip_end, rate)
    return rate
  return float(rates[skip_start + int(np.argmin(np.gradient(sm[skip_start:end])))])


def _plot_lr_find(path: str, rows, suggested: float) -> None:
  """The smoothed loss against the learning rate (log scale), the suggested rate marked, as a
  640x420 PNG. The loss is clipped at 4x its minimum: the blow-up that ends the sweep would
  flatten the rest of the curve."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
  from matplotlib.figure import Figure
  rates = np.array([r[0] for r in rows])
  y = np.array([r[2] for r in rows])
  y = np.clip(y, None, np.nanmin(y) * 4 if np.nanmin(y) > 0 else np.nanmax(y))
  fig = Figure(figsize=(6.4, 4.2), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.plot(rates, y, color="navy", linewidth=2)
  ax.axvline(suggested, color="red", linewidth=1, label=f"suggested {suggested:.2g}")
  ax.set_xscale("log")
  ax.set_xlabel("learning rate (log scale)")
  ax.set_ylabel("smoothed loss")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with atomic_file(path, "wb") as f:
    fig.savefig(f, format="png")
