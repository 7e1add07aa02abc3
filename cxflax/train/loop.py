"""The main job's modes: train (one or more stages), eval, cv, lr_find, predict.

Training runs the config's stages one after another (one stage unless config.stages is set),
each with its own image size, epochs, optimizer and frozen groups; a checkpoint records the
stage it was taken in, so a run resumes inside the right stage with the right optimizer state
and input position.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from cxflax import config as config_lib
from cxflax import parallel
from cxflax.data import pipeline
from cxflax.data.pipeline import Input, create_input
from cxflax.data.sources import RelabeledSource, image_folder, make_source, mask_file
from cxflax.errors import CheckpointError, ConfigError, DataError
from cxflax.train import build
from cxflax.train import checkpoint as ckpt_lib
from cxflax.train import losses as losses_lib
from cxflax.train import metrics as metrics_lib
from cxflax.train import optim
from cxflax.train.steps import create_train_state, make_eval_step, make_train_step


def prepare_workdir(workdir: str) -> str:
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir!r} exists and is not a directory")
  os.makedirs(workdir, exist_ok=True)
  return workdir


def checkpoint_meta(config, task: str, class_names, stage: int = 0, stage_start: int = 0) -> dict[str, Any]:
  """What a checkpoint records about the run that made it (checked again on restore)."""
  return {"model": config.model if not config.ensemble.kind else f"ensemble:{config.ensemble.kind}",
          "head": config.head, "num_outputs": build.num_outputs(task, class_names), "task": task,
          "class_names": list(class_names or []), "image_size": config.data.image_size,
          "stage": stage, "stage_start": stage_start, "config": config.to_dict()}


# --- evaluation ----------------------------------------------------------------------------------


def run_evaluation(eval_step, variables, batches, mesh) -> dict[str, np.ndarray]:
  """Predictions, labels and example indices for every example of `batches`, padding removed."""
  parts: dict[str, list] = {"pred": [], "label": [], "index": []}
  for out in eval_step.outputs(variables, batches, mesh):
    keep = parallel.gather(out["valid"]) > 0
    for k in parts:
      parts[k].append(parallel.gather(out[k])[keep])
  return {k: np.concatenate(v) for k, v in parts.items()}


def score(task: str, class_names, result: dict, round_predictions: bool = False) -> dict:
  if task == "segmentation":
    return metrics_lib.segmentation_metrics(result["pred"], class_names)
  if task == "regression":
    pred = np.round(result["pred"]) if round_predictions else result["pred"]
    return metrics_lib.regression_metrics(pred, result["label"])
  n = len(class_names)
  if task == "embedding":
    return metrics_lib.embedding_metrics(result["pred"], result["label"], n, class_names)
  return metrics_lib.classification_metrics(result["pred"].argmax(-1), result["label"], n,
                                            probs=result["pred"], class_names=class_names)


def _baseline(task, class_names, train_labels, eval_labels) -> dict:
  if task == "segmentation":  # eval_labels: per-image pixel counts of each class
    return metrics_lib.segmentation_baseline(eval_labels, class_names)
  kind = "regression" if task == "regression" else "classification"
  return metrics_lib.baseline_metrics(kind, train_labels, eval_labels,
                                      None if kind == "regression" else len(class_names))


def _headline(task: str) -> str:
  return {"regression": "mae", "segmentation": "jaccard"}.get(task, "accuracy")


_TRIVIAL = {"regression": "training mean", "segmentation": "every pixel lung"}


def _summary(task: str, metrics: dict, base: dict) -> str:
  key = _headline(task)
  extra = [k for k in ("rmse", "macro_f1", "auc", "dice") if k in metrics and k != key]
  others = ", ".join(f"{k}={metrics[k]:.4f}" for k in extra)
  return (f"eval {key}={metrics[key]:.4f} ({others}) | trivial baseline "
          f"({_TRIVIAL.get(task, 'majority class')}) {key}={base[key]:.4f}")


# --- training --------------------------------------------------------------------------------------


def _class_alpha(config, labels: np.ndarray, class_names):
  if config.loss != "focal":
    return None
  if config.focal_alpha:
    alpha = np.asarray(config.focal_alpha, np.float32)
    if len(alpha) != len(class_names):
      raise ConfigError(f"config.focal_alpha has {len(alpha)} values for {len(class_names)} classes")
    return alpha
  return losses_lib.inverse_frequency(labels, len(class_names))


def _pseudo_labelled(config, mesh) -> RelabeledSource | None:
  """The examples of config.pseudo_label.split, labelled by the averaged predictions of
  config.pseudo_label.runs (their last_n checkpoints each)."""
  p = config.pseudo_label
  if not p.runs:
    return None
  source = make_source(config.data, p.split, unlabeled_ok=True)
  preds = predict_source([(r, s) for r in p.runs for s in ckpt_lib.find_steps(r, last_n=p.last_n)[1]], source,
                         config.eval_batch_size, mesh)
  if source.task == "classification":
    labels = preds.argmax(-1)
  else:
    labels = np.round(preds) if p.round else preds
  logging.info("pseudo-labelling: %d examples of the %s split labelled by %d run(s)", len(source),
               p.split, len(p.runs))
  return RelabeledSource(source, labels)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config's model (stage by stage) on config's data, evaluating every epoch; resumes
  from the latest checkpoint in workdir. Returns the final evaluation metrics."""
  config = config_lib.finalize(config)
  workdir = prepare_workdir(workdir)
  mesh = parallel.make_mesh()
  stages = config_lib.stage_configs(config)
  extra = _pseudo_labelled(config, mesh)

  first = create_input(stages[0], jax.process_index(), jax.process_count(), extra)
  task = build.task_of(config, first.task)
  config_lib.check_task(config, first.task)
  class_names = first.class_names
  model = build.build_model(config, task, class_names)
  variables = build.initial_variables(config, model, first.image_shape(), config.seed)
  parameter_overview.log_parameter_overview(variables["params"], msg=f"{config.model} parameters")
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  alpha = _class_alpha(config, first.source.labels()[first.train_indices], class_names)

  ckpts = ckpt_lib.Checkpoints(ckpt_lib.checkpoint_dir(workdir), config.keep_checkpoints)
  rep = parallel.replicated(mesh)
  model_target = ckpt_lib.abstract({"params": params, "batch_stats": batch_stats}, rep)
  latest = ckpts.latest_step()
  resume_stage, resume_meta = 0, None
  if latest is not None:
    ckpts.check_compatible(latest, checkpoint_meta(config, task, class_names), model_target)
    resume_meta = ckpts.meta(latest)
    resume_stage = int(resume_meta.get("stage", 0))

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if latest is None:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  eval_step = make_eval_step(model, task, mesh)
  global_step = 0
  metrics, result, inp = {}, None, first
  t0 = time.time()
  for s, sc in enumerate(stages):
    inp = first if s == 0 else create_input(sc, jax.process_index(), jax.process_count(), extra)
    steps_per_epoch = inp.steps_per_epoch
    stage_steps = int(math.ceil(sc.num_epochs * steps_per_epoch))
    stage_start = global_step
    global_step += stage_steps
    if s < resume_stage:
      continue
    tx, schedule = optim.make_optimizer(sc, steps_per_epoch, params)
    state = create_train_state(model, tx, {"params": params, "batch_stats": batch_stats}, mesh, stage_start)
    train_iter = iter(inp.train())
    if resume_meta is not None and s == resume_stage:
      restored, opt = ckpts.restore_training(
          latest, model_target, ckpt_lib.abstract({"step": state.step, "opt_state": state.opt_state}, rep),
          train_iter)
      state = state.replace(step=opt["step"], opt_state=opt["opt_state"], **restored)
      logging.info("resumed from %s/%d (stage %d of %d)", ckpts.directory, latest, s + 1, len(stages))
      resume_meta = None
    held_out = (f"fold {sc.fold} of {sc.num_folds}" if sc.data.eval_split == "fold"
                else f"the {sc.data.eval_split} split")
    logging.info("stage %d of %d: %d training / %d evaluation examples (%s, evaluating on %s), "
                 "%d px, %d steps per epoch, steps %d-%d", s + 1, len(stages), len(inp.train_indices),
                 len(inp.eval_indices), sc.data.source, held_out, sc.data.image_size, steps_per_epoch,
                 stage_start + 1, global_step)
    meta = checkpoint_meta(config, task, class_names, s, stage_start)
    state, metrics, result, halted = _train_stage(sc, model, state, train_iter, inp, eval_step, schedule,
                                                  writer, ckpts, meta, mesh, stage_start, global_step,
                                                  alpha, task, class_names)
    params, batch_stats = state.params, state.batch_stats
    if halted:
      ckpts.close()
      return metrics
  ckpts.wait()
  writer.flush()
  if result is None:  # resumed after the last step: evaluate what was restored
    restored = ckpts.restore_model(latest, model_target)
    result = run_evaluation(eval_step, restored, inp.eval(), mesh)
    metrics = score(task, class_names, result, config.round_predictions)
  train_labels = inp.source.labels()[inp.train_indices]
  base = _baseline(task, class_names, train_labels, result["label"])
  _write_json(workdir, "final_metrics.json", {"step": global_step, "metrics": metrics, "baseline": base,
                                              "train_seconds": time.time() - t0})
  _announce(f"Final (step {global_step}): {_summary(task, metrics, base)}")
  ckpts.close()
  return metrics


def _train_stage(config, model, state, train_iter, inp: Input, eval_step, schedule, writer, ckpts,
                 meta, mesh, stage_start: int, stage_end: int, alpha, task, class_names):
  """The steps of one stage; returns (state, last metrics, last evaluation, halted)."""
  steps_per_epoch = inp.steps_per_epoch
  train_step = make_train_step(model, config, mesh, alpha)
  report = periodic_actions.ReportProgress(num_train_steps=stage_end, writer=writer,
                                           every_steps=config.log_every_steps, every_secs=None)
  eval_every = max(1, int(config.eval_every_epochs * steps_per_epoch))
  ckpt_every = max(1, int(config.checkpoint_every_epochs * steps_per_epoch))
  halt = config.halt_after_steps or stage_end
  step = int(state.step)
  pending: list[dict] = []
  metrics, result = {}, None
  while step < min(stage_end, halt):
    state, step_metrics = train_step(state, parallel.shard_batch(next(train_iter), mesh))
    step += 1
    local = step - stage_start
    pending.append(step_metrics)
    report(step)
    if local % config.log_every_steps == 0 or step == stage_end:
      means = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
      means["learning_rate"] = float(schedule(local - 1))
      if not all(map(np.isfinite, means.values())):
        raise FloatingPointError(f"non-finite training metrics at step {step}: {means}; lower "
                                 "config.learning_rate or check the data")
      writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
      pending = []
    if local % eval_every == 0 or step == stage_end:
      with report.timed("eval"):
        result = run_evaluation(eval_step, {"params": state.params, "batch_stats": state.batch_stats},
                                inp.eval(), mesh)
        metrics = score(task, class_names, result, config.round_predictions)
      scalars = metrics_lib.scalar_metrics(metrics)
      writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
      logging.info("epoch %.2f, step %d: %s", local / steps_per_epoch, step,
                   ", ".join(f"{k}={v:.4f}" for k, v in scalars.items() if "/" not in k))
    if local % ckpt_every == 0 or step in (stage_end, halt):
      with report.timed("checkpoint"):
        ckpts.save(step, state, train_iter, meta)
  if step < stage_end:
    ckpts.wait()
    writer.flush()
    logging.info("halted at step %d (config.halt_after_steps); run again to resume", step)
    return state, metrics, result, True
  return state, metrics, result, False


# --- other modes -------------------------------------------------------------------------------------


def evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None) -> dict:
  """Restores the latest checkpoint of workdir (or `checkpoint`) and evaluates it on config's
  evaluation split; writes eval_metrics.json in workdir."""
  config = config_lib.finalize(config)
  workdir = prepare_workdir(workdir)
  mesh = parallel.make_mesh()
  path = checkpoint or ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(path) and not checkpoint:
    raise CheckpointError(f"no checkpoint to evaluate: {path} does not exist (train first, "
                          "or pass --checkpoint=PATH)")
  directory, [step] = ckpt_lib.find_steps(path, what="checkpoint to evaluate")
  ckpts = ckpt_lib.Checkpoints(directory, create=False)
  inp = create_input(config, jax.process_index(), jax.process_count())
  task = build.task_of(config, inp.task)
  model = build.build_model(config, task, inp.class_names)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1,) + inp.image_shape(), np.float32)))
  target = ckpt_lib.abstract({"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})},
                             parallel.replicated(mesh))
  ckpts.check_compatible(step, checkpoint_meta(config, task, inp.class_names), target)
  variables = ckpts.restore_model(step, target)
  ckpts.close()
  result = run_evaluation(make_eval_step(model, task, mesh), variables, inp.eval(), mesh)
  metrics = score(task, inp.class_names, result, config.round_predictions)
  base = _baseline(task, inp.class_names, inp.source.labels()[inp.train_indices], result["label"])
  where = os.path.join(directory, str(step))
  _write_json(workdir, "eval_metrics.json", {"checkpoint": where, "step": step, "metrics": metrics,
                                             "baseline": base, "num_examples": int(len(result["label"]))})
  _announce(f"Checkpoint {where}: {_summary(task, metrics, base)}")
  return metrics


def cross_validate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains every fold (workdir/fold_K, each resumable) and writes per-fold and averaged metrics
  to workdir/cv_metrics.json."""
  workdir = prepare_workdir(workdir)
  per_fold = []
  for k in range(config.num_folds):
    c = ml_collections.ConfigDict(config.to_dict())
    c.fold = k
    fold_dir = os.path.join(workdir, f"fold_{k}")
    done = os.path.join(fold_dir, "final_metrics.json")
    if os.path.isfile(done):
      with open(done) as f:
        per_fold.append(json.load(f)["metrics"])
      logging.info("fold %d already trained (%s)", k, done)
      continue
    logging.info("cross-validation: fold %d of %d", k + 1, config.num_folds)
    per_fold.append(train_and_evaluate(c, fold_dir))
  summary = {"folds": per_fold, "mean": {}, "std": {}}
  for key in metrics_lib.scalar_metrics(per_fold[0]):
    values = [f[key] for f in per_fold]
    summary["mean"][key] = float(np.nanmean(values))
    summary["std"][key] = float(np.nanstd(values))
  if "confusion_matrix" in per_fold[0]:
    summary["confusion_matrix"] = np.sum([f["confusion_matrix"] for f in per_fold], axis=0).tolist()
  _write_json(workdir, "cv_metrics.json", summary)
  headline = "mae" if "mae" in summary["mean"] else "accuracy"
  _announce(f"Cross-validation over {config.num_folds} folds: {headline}={summary['mean'][headline]:.4f} "
            f"± {summary['std'][headline]:.4f}" + (f", macro_f1={summary['mean']['macro_f1']:.4f}"
                                                   if "macro_f1" in summary["mean"] else ""))
  return summary


def predict_source(runs: list[tuple[str, int]], source, batch_size: int, mesh) -> np.ndarray:
  """The average over (run, step) checkpoints of their predictions (regressed values or class
  probabilities) for every example of `source`, each run preprocessing as it was trained."""
  total = None
  for path, step in runs:
    run = build.load_run(path, step)
    d = run.config.data
    batches = pipeline.eval_dataset(source, np.arange(len(source)), pp=d.eval_pp, global_batch=batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    task = run.meta["task"]
    result = run_evaluation(make_eval_step(run.model, task, mesh), run.variables, batches, mesh)
    pred = np.empty((len(source),) + result["pred"].shape[1:], np.float64)
    pred[result["index"]] = result["pred"]
    total = pred if total is None else total + pred
  return total / len(runs)


def predict(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Averages the predictions of config.predict.runs (default: workdir) over their last
  config.predict.last_n checkpoints for config.predict.split; writes workdir/predictions_<split>.csv
  (header-less 'name,prediction' for regression, as the Per-COVID-19 challenge takes them) and,
  where the split is labelled, its metrics."""
  config = config_lib.finalize(config)
  workdir = prepare_workdir(workdir)
  mesh = parallel.make_mesh()
  p = config.predict
  runs = [(r, s) for r in (p.runs or (workdir,)) for s in ckpt_lib.find_steps(r, last_n=p.last_n)[1]]
  source = image_folder(p.images) if p.images else make_source(config.data, p.split, unlabeled_ok=True)
  first = build.load_run(*runs[0])
  if first.meta["task"] == "segmentation":
    if len(runs) != 1:
      raise ConfigError(f"segmentation predicts from one checkpoint; got {len(runs)} (set "
                        "config.predict.last_n=1 and at most one of config.predict.runs)")
    return predict_masks(first, source, config.eval_batch_size, mesh, os.path.join(workdir, "masks"))
  preds = predict_source(runs, source, config.eval_batch_size, mesh)
  split = "images" if p.images else p.split
  out = os.path.join(workdir, f"predictions_{split}.csv")
  names = [source.example_name(i) for i in range(len(source))]
  if jax.process_index() == 0:
    with open(out, "w", newline="") as f:
      w = csv.writer(f)
      for name, v in zip(names, preds):
        if np.ndim(v) == 0:
          w.writerow([name, f"{(np.round(v) if p.round else v):.4f}"])
        else:
          w.writerow([name, source.class_names[int(np.argmax(v))]] + [f"{x:.6f}" for x in v])
  labels = source.labels()
  message = f"Predictions of {len(runs)} checkpoint(s) for {len(source)} {split} examples written to {out}"
  if not np.any(np.isnan(labels.astype(np.float64))):
    task = "regression" if preds.ndim == 1 else "classification"
    result = {"pred": np.round(preds) if (p.round and task == "regression") else preds, "label": labels}
    metrics = score(task, source.class_names, result)
    _write_json(workdir, f"predict_metrics_{split}.json", {"runs": runs, "metrics": metrics})
    message += f"; {_headline(task)}={metrics[_headline(task)]:.4f}"
  _announce(message)
  return out


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
  step = make_eval_step(run.model, "segmentation", mesh, with_masks=True)
  os.makedirs(out_dir, exist_ok=True)
  from PIL import Image
  written = 0
  for out in step.outputs(run.variables, batches, mesh):
    keep = parallel.gather(out["valid"]) > 0
    for i, mask, (h, w) in zip(parallel.gather(out["index"])[keep], parallel.gather(out["mask"])[keep],
                               parallel.gather(out["source_size"])[keep]):
      if jax.process_index() == 0:
        img = Image.fromarray((mask > 0).astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
        img.save(paths[int(i)])
      written += 1
      if written % 100 == 0:
        logging.info("masks: %d of %d written", written, len(source))
  _announce(f"Lung masks of {written} images written to {out_dir} (checkpoint {run.path}); "
            f"use them with --config.data.mask_dir={out_dir}")
  return out_dir


def lr_find(config: ml_collections.ConfigDict, workdir: str) -> float:
  """fastai's learning-rate range test: one step per rate, rates growing exponentially from
  lr_find.start to lr_find.end, stopping when the smoothed loss exceeds 4x its minimum. Writes
  lr_find.csv and lr_find.png and returns the suggested rate (steepest descent of the loss)."""
  config = config_lib.finalize(config)
  workdir = prepare_workdir(workdir)
  mesh = parallel.make_mesh()
  inp = create_input(config, jax.process_index(), jax.process_count())
  task = build.task_of(config, inp.task)
  model = build.build_model(config, task, inp.class_names)
  variables = build.initial_variables(config, model, inp.image_shape(), config.seed)
  f = config.lr_find
  n = max(2, int(f.steps))
  rates = f.start * (f.end / f.start) ** (np.arange(n) / (n - 1))
  table = jax.numpy.asarray(rates, jax.numpy.float32)
  tx, _ = optim.make_optimizer(config, n, variables["params"],
                               schedule_fn=lambda t: table[jax.numpy.minimum(t, n - 1)])
  state = create_train_state(model, tx, variables, mesh)
  alpha = _class_alpha(config, inp.source.labels()[inp.train_indices], inp.class_names)
  step = make_train_step(model, config, mesh, alpha)
  it = iter(inp.train())
  rows, smooth, best = [], 0.0, math.inf
  for i in range(n):
    state, m = step(state, parallel.shard_batch(next(it), mesh))
    loss = float(m["loss"])
    smooth = 0.98 * smooth + 0.02 * loss
    smoothed = smooth / (1 - 0.98 ** (i + 1))
    rows.append((float(rates[i]), loss, smoothed))
    best = min(best, smoothed)
    if not np.isfinite(loss) or (i > 5 and smoothed > 4 * best):
      break
  suggested = suggest_learning_rate([r[0] for r in rows], [r[2] for r in rows])
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "lr_find.csv"), "w", newline="") as fh:
      w = csv.writer(fh)
      w.writerow(["learning_rate", "loss", "smoothed_loss"])
      w.writerows(rows)
    _plot_lr_find(os.path.join(workdir, "lr_find.png"), rows, suggested)
  _announce(f"LR range test over {len(rows)} steps: suggested learning rate {suggested:.3g} "
            f"(steepest descent of the smoothed loss); see {os.path.join(workdir, 'lr_find.png')}")
  return suggested


def suggest_learning_rate(rates, smoothed) -> float:
  """The rate where the smoothed loss falls fastest (per decade), before its minimum, ignoring
  the first tenth of the sweep (fastai's skip_start); a tenth of the rate at the minimum if the
  loss never falls."""
  lrs, sm = np.log10(np.asarray(rates)), np.asarray(smoothed, np.float64)
  start = max(1, len(sm) // 10)
  end = start + int(np.argmin(sm[start:])) + 1
  if end - start < 3:
    return float(rates[end - 1]) / 10
  slopes = np.gradient(sm[start:end], lrs[start:end])
  return float(rates[start + int(np.argmin(slopes))])


def _plot_lr_find(path: str, rows, suggested: float, size=(640, 420)) -> None:
  """Smoothed loss against log learning rate, as a PNG (drawn with PIL: no plotting library)."""
  from PIL import Image, ImageDraw
  w, h = size
  left, right, top, bottom = 60, 20, 20, 50
  img = Image.new("RGB", size, "white")
  d = ImageDraw.Draw(img)
  x = np.log10([r[0] for r in rows])
  y = np.array([r[2] for r in rows])
  y = np.clip(y, None, np.nanmin(y) * 4 if np.nanmin(y) > 0 else np.nanmax(y))
  sx = lambda v: left + (v - x.min()) / max(x.max() - x.min(), 1e-9) * (w - left - right)
  sy = lambda v: h - bottom - (v - np.nanmin(y)) / max(np.nanmax(y) - np.nanmin(y), 1e-9) * (h - top - bottom)
  d.rectangle([left, top, w - right, h - bottom], outline="black")
  d.line([(sx(a), sy(b)) for a, b in zip(x, y) if np.isfinite(b)], fill="navy", width=2)
  sug = sx(math.log10(suggested))
  d.line([(sug, top), (sug, h - bottom)], fill="red", width=1)
  for e in range(int(math.floor(x.min())), int(math.ceil(x.max())) + 1):
    if x.min() <= e <= x.max():
      d.text((sx(e) - 12, h - bottom + 8), f"1e{e}", fill="black")
  d.text((left, h - 20), f"learning rate (log scale); suggested {suggested:.2g}", fill="black")
  d.text((5, top), "loss", fill="black")
  img.save(path)


def _announce(line: str) -> None:
  logging.info(line)
  if jax.process_index() == 0:
    print(line, flush=True)


def _write_json(workdir: str, name: str, payload: dict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, name), "w") as f:
      json.dump(payload, f, indent=2, default=float)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
