"""--mode=eval (one checkpoint on the evaluation split) and --mode=cv (every fold trained, their
metrics averaged)."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from cxflax import config as config_lib
from cxflax import parallel
from cxflax.data.pipeline import create_input
from cxflax.errors import CheckpointError, WorkdirError
from cxflax.train import build
from cxflax.train import checkpoint as ckpt_lib
from cxflax.train import explain
from cxflax.train import metrics as metrics_lib
from cxflax.train import report as report_lib
from cxflax.train import tasks
from cxflax.train.scoring import run_evaluation
from cxflax.train.steps import make_eval_step
from cxflax.train.workdir import announce, prepare_workdir, workdir_lock, write_json


def evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None,
             saliency: report_lib.Saliency | None = None) -> dict:
  """Restores the latest checkpoint of workdir (or `checkpoint`) and evaluates it on config's
  evaluation split; writes eval_metrics.json in workdir and, with config.eval.report, the
  evaluation report (cxflax/train/report.py; `saliency` maps drawn over its worst examples: by
  default Grad-CAM of a regression or classification model, none for other tasks)."""
  config = config_lib.finalize(config)
  workdir = prepare_workdir(workdir)
  mesh = parallel.make_mesh()
  path = checkpoint or ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(path) and not checkpoint:
    raise CheckpointError(f"no checkpoint to evaluate: {path} does not exist (train first, "
                          "or pass --checkpoint=PATH)")
  directory, [step] = ckpt_lib.find_steps(path, what="checkpoint to evaluate")
  ckpts = ckpt_lib.Checkpoints(directory, create=False)
  # Evaluated at the image size of the stage it was taken in, which the check compares.
  stage = int(ckpts.meta(step).get("stage", 0))
  stages = config_lib.stage_configs(config)
  inp = create_input(stages[min(stage, len(stages) - 1)], jax.process_index(), jax.process_count())
  task = tasks.resolve(config, inp.task)
  model = build.build_model(config, task, inp.class_names)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1,) + inp.image_shape(), np.float32)))
  target = ckpt_lib.abstract({"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})},
                             parallel.replicated(mesh))
  ckpts.check_compatible(step, build.checkpoint_meta(config, task, inp.class_names, stage), target,
                         accept=config.checkpoint_mismatch == "accept")
  variables = ckpts.restore_model(step, target)
  ckpts.close()
  result = run_evaluation(make_eval_step(model, task, mesh), variables, inp.eval(), mesh)
  metrics = task.metrics(result, inp.class_names, config.round_predictions)
  base = task.baseline(inp.class_names, inp.source.labels()[inp.train_indices], result["label"])
  where = os.path.join(directory, str(step))
  write_json(workdir, "eval_metrics.json", {"checkpoint": where, "step": step, "metrics": metrics,
                                            "baseline": base, "num_examples": int(len(result["label"]))})
  report = {}
  if config.eval.report and jax.process_index() == 0:
    if saliency is None and task.name in explain.EXPLAINED_TASKS:  # not embeddings, not segmentation
      saliency = explain.report_saliency(model, variables, inp.eval_source, inp.eval_pp, config.explain.layer)
    summary = {"checkpoint": where, "step": step, "stage": stage, "task": task.name, "model": config.model,
               "head": config.head, "loss": config.loss.name, "data": config.data.source,
               "evaluated on": (f"fold {config.fold} of {config.num_folds}" if config.data.eval_split == "fold"
                                else f"split {config.data.eval_split}"),
               "image size": stages[min(stage, len(stages) - 1)].data.image_size,
               "examples": int(len(result["label"])), "round predictions": config.round_predictions}
    report = report_lib.write_report(workdir, task.name, result, inp.eval_source, inp.class_names, metrics,
                                     summary=summary, config_text=config.to_json_best_effort(indent=2),
                                     round_predictions=config.round_predictions,
                                     samples=config.eval.bootstrap_samples, seed=config.eval.seed,
                                     worst=config.eval.worst, saliency=saliency)
  announce(f"Checkpoint {where}: {task.summary(metrics, base)}"
           + (f"; report: {os.path.join(workdir, 'report.html')}" if report else ""))
  return metrics


def cross_validate(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Trains every fold (workdir/fold_K, each resumable) and writes per-fold and averaged metrics
  to workdir/cv_metrics.json. A fold whose training stops early (preempted, or
  config.halt_after_steps) stops the cross-validation too: None, and the same command resumes."""
  from cxflax.train import train  # the train loop: only cv trains here
  workdir = prepare_workdir(workdir)
  per_fold = []
  for k in range(config.num_folds):
    c = ml_collections.ConfigDict(config.to_dict())
    c.fold = k
    fold_dir = os.path.join(workdir, f"fold_{k}")
    done = os.path.join(fold_dir, "final_metrics.json")
    metrics = _fold_result(done)
    if metrics is not None:
      per_fold.append(metrics)
      logging.info("fold %d already trained (%s)", k, done)
      continue
    logging.info("cross-validation: fold %d of %d", k + 1, config.num_folds)
    with workdir_lock(prepare_workdir(fold_dir)):
      per_fold.append(train.train_and_evaluate(c, fold_dir))
    if not os.path.isfile(done):  # stopped before its last step: it resumes on the next run
      announce(f"cross-validation stopped in fold {k} of {config.num_folds}; run the same command "
               "again to resume")
      return None
  cv = {"folds": per_fold, "mean": {}, "std": {}}
  for key in metrics_lib.scalar_metrics(per_fold[0]):
    values = [f[key] for f in per_fold]
    cv["mean"][key] = float(np.nanmean(values))
    cv["std"][key] = float(np.nanstd(values))
  if "confusion_matrix" in per_fold[0]:
    cv["confusion_matrix"] = np.sum([f["confusion_matrix"] for f in per_fold], axis=0).tolist()
  write_json(workdir, "cv_metrics.json", cv)
  key = "mae" if "mae" in cv["mean"] else "accuracy"
  announce(f"Cross-validation over {config.num_folds} folds: {key}={cv['mean'][key]:.4f} "
           f"± {cv['std'][key]:.4f}" + (f", macro_f1={cv['mean']['macro_f1']:.4f}"
                                        if "macro_f1" in cv["mean"] else ""))
  return cv


def _fold_result(path: str) -> dict | None:
  """The metrics of a finished fold from its final_metrics.json, or None where the fold is
  unfinished: no such file, or one that cannot be read (cut short by a full disk before results
  were written atomically, or damaged since). That one is moved aside to <path>.unreadable, so
  that only a result of the fold's next training counts, and the fold is trained again (it
  resumes from its last checkpoint)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      metrics = json.load(f)["metrics"]
    if not isinstance(metrics, dict) or not metrics:
      raise ValueError("no metrics in it")
    return metrics
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning("%s cannot be read (%s: %s): the fold counts as unfinished and is trained again; "
                    "the file is moved to %s.unreadable", path, type(e).__name__, e, path)
    try:
      if jax.process_index() == 0:
        os.replace(path, path + ".unreadable")
    except OSError as moved:
      raise WorkdirError(f"cannot move the unreadable {path} aside: {moved}") from None
    return None
