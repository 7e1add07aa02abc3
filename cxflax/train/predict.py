"""--mode=predict: runs' (folds') and checkpoints' predictions averaged for a split or a folder
of images, written as CSV; for a segmentation run, lung masks written as PNGs."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from cxflax import config as config_lib
from cxflax import parallel
from cxflax.data import pipeline
from cxflax.data.images import write_mask
from cxflax.data.sources import image_folder, make_source, mask_file
from cxflax.errors import ConfigError, DataError
from cxflax.files import write_csv
from cxflax.train import build
from cxflax.train import checkpoint as ckpt_lib
from cxflax.train.scoring import run_evaluation
from cxflax.train.steps import make_eval_step
from cxflax.train.tasks import TASKS
from cxflax.train.workdir import announce, prepare_workdir, write_json


def predict(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Averages the predictions of config.predict.runs (default: workdir) over their last
  config.predict.last_n checkpoints for config.predict.split; writes workdir/predictions_<split>.csv
  (header-less 'name,prediction' for regression, as the Per-COVID-19 challenge takes them) and,
  where the split is labelled, its metrics. For regression, predict.clip_min clips and
  predict.round rounds every checkpoint's values, and predict.round rounds their mean too."""
  config = config_lib.finalize(config)
  workdir = prepare_workdir(workdir)
  mesh = parallel.make_mesh()
  p = config.predict
  runs = [(r, s) for r in (p.runs or (workdir,)) for s in ckpt_lib.find_steps(r, last_n=p.last_n)[1]]
  source = image_folder(p.images) if p.images else make_source(config.data, p.split, unlabeled_ok=True)
  first = build.load_run(*runs[0])
  task = TASKS.get(first.meta["task"])
  if task.per_pixel:
    if len(runs) != 1:
      raise ConfigError(f"segmentation predicts from one checkpoint; got {len(runs)} (set "
                        "config.predict.last_n=1 and at most one of config.predict.runs)")
    return predict_masks(first, source, config.eval_batch_size, mesh, os.path.join(workdir, "masks"))
  preds = predict_source(runs, source, config.eval_batch_size, mesh, round_each=p.round, clip_min=p.clip_min,
                         accept=config.checkpoint_mismatch == "accept")
  split = "images" if p.images else p.split
  out = os.path.join(workdir, f"predictions_{split}.csv")
  if jax.process_index() == 0:
    _write_predictions(out, source, preds, p.round)
  labels = source.labels()
  message = f"Predictions of {len(runs)} checkpoint(s) for {len(source)} {split} examples written to {out}"
  if not np.any(np.isnan(labels.astype(np.float64))):
    metrics = task.metrics({"pred": preds, "label": labels}, source.class_names, p.round)
    write_json(workdir, f"predict_metrics_{split}.json", {"runs": runs, "metrics": metrics})
    message += f"; {task.headline}={metrics[task.headline]:.4f}"
  announce(message)
  return out


def predict_source(runs: list[tuple[str, int]], source, batch_size: int, mesh, round_each: bool = False,
                   clip_min: float | None = None, accept: bool = False) -> np.ndarray:
  """The average over (run, step) checkpoints of their predictions (regressed values or class
  probabilities) for every example of `source`, each run preprocessing as it was trained; runs
  that predict other outputs or classes (or in another order) than each other and the source
  are refused unless `accept` (config.checkpoint_mismatch).
  Regressed values of each checkpoint are clipped below at clip_min (seed 000's authors set each
  fold's negative predictions to 0 before averaging) and rounded with round_each (seed 001: "the
  output is always rounded to the closest integer", then the models' mean is rounded again)."""
  ckpt_lib.check_same_outputs(runs, source.class_names, accept)
  total = None
  for path, step in runs:
    run = build.load_run(path, step)
    d = run.config.data
    batches = pipeline.eval_dataset(source, np.arange(len(source)), pp=d.eval_pp, global_batch=batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    step = make_eval_step(run.model, TASKS.get(run.meta["task"]), mesh)
    result = run_evaluation(step, run.variables, batches, mesh)
    pred = np.empty((len(source),) + result["pred"].shape[1:], np.float64)
    pred[result["index"]] = result["pred"]
    if clip_min is not None:
      if pred.ndim != 1:
        raise ConfigError(f"config.predict.clip_min={clip_min} clips regressed values; {path} predicts "
                          f"{pred.shape[1:]} values per example (leave clip_min None)")
      pred = np.maximum(pred, clip_min)
    if round_each and pred.ndim == 1:  # regressed values; class probabilities are left alone
      pred = np.round(pred)
    total = pred if total is None else total + pred
  return total / len(runs)


def _write_predictions(path: str, source, preds: np.ndarray, round_values: bool) -> None:
  """Header-less CSV rows (prediction_row) for every example of source."""
  write_csv(path, [prediction_row(source.example_name(i), v, source.class_names, round_values)
                   for i, v in enumerate(preds)])


def prediction_row(name: str, value, class_names, round_value: bool) -> list[str]:
  """One example's prediction as predict and eval write it: 'name,value' (regression; rounded
  with round_value) or 'name,class,probabilities...'."""
  if np.ndim(value) == 0:
    return [name, f"{(np.round(value) if round_value else value):.4f}"]
  return [name, class_names[int(np.argmax(value))]] + [f"{x:.6f}" for x in value]


def predict_masks(run: build.Run, source, batch_size: int, mesh, out_dir: str) -> str:
  """Lung masks of a segmentation run for every image of `source`, written as 0/255 PNGs of each
  image's own size to out_dir/<image name stem>.png — the layout config.data.mask_dir reads."""
  paths = [mask_file(out_dir, source.example_name(i)) for i in range(len(source))]
  seen: dict[str, int] = {}
  for i, path in enumerate(paths):
    if path in seen:
      raise DataError(f"two images would write the same mask {path}: {source.describe(seen[path])} "
                      f"and {source.describe(i)}")
    seen[path] = i
  batches = pipeline.eval_dataset(source, np.arange(len(source)), pp=run.config.data.eval_pp,
                                  global_batch=batch_size, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  step = make_eval_step(run.model, TASKS.get(run.meta["task"]), mesh, with_masks=True)
  os.makedirs(out_dir, exist_ok=True)
  written = 0
  for out in step.outputs(run.variables, batches, mesh):
    keep = parallel.gather(out["valid"]) > 0
    for i, mask, (h, w) in zip(parallel.gather(out["index"])[keep], parallel.gather(out["mask"])[keep],
                               parallel.gather(out["source_size"])[keep]):
      if jax.process_index() == 0:
        write_mask(paths[int(i)], mask, (h, w))
      written += 1
      if written % 100 == 0:
        logging.info("masks: %d of %d written", written, len(source))
  announce(f"Lung masks of {written} images written to {out_dir} (checkpoint {run.path}); "
           f"use them with --config.data.mask_dir={out_dir}")
  return out_dir
