"""--mode=train (and ensemble): the config's stages one after another, evaluating every epoch.

One stage unless config.stages is set; each has its own image size, epochs, optimizer and frozen
groups. A checkpoint records the stage it was taken in, so a run resumes inside the right stage
with the right optimizer state and input position.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview

from cxflax import config as config_lib
from cxflax import parallel
from cxflax.data.pipeline import Input, create_input, eval_dataset
from cxflax.data.sources import RelabeledSource, make_source
from cxflax.errors import DivergenceError, Interrupted
from cxflax.models.patches import PatchClassifier
from cxflax.train import build
from cxflax.train import checkpoint as ckpt_lib
from cxflax.train import metrics as metrics_lib
from cxflax.train import optim, tasks
from cxflax.train.explain import (EXPLAINED_TASKS, draw_saliency, image_grid, label_text, render_overlay,
                                  saliency_function)
from cxflax.train.predict import predict_source
from cxflax.train.scoring import run_evaluation
from cxflax.train.steps import EvalStep, create_train_state, make_eval_step, make_train_step
from cxflax.train.summaries import MetricWriter, Progress
from cxflax.train.tasks import Task
from cxflax.train.workdir import announce, checkpoint_writes, prepare_workdir, write_json


@dataclasses.dataclass
class _Run:
  """What every stage of one training run shares."""
  config: ml_collections.ConfigDict  # the whole run's (each stage has its own, _Stage.config)
  model: nn.Module
  task: Task
  class_names: Any
  alpha: Any  # the focal loss's class weights, or None
  mesh: Any
  eval_step: EvalStep
  writer: MetricWriter
  ckpts: ckpt_lib.Checkpoints
  skipped: int = 0  # updates skipped for non-finite values (config.on_nonfinite='skip') in this process
  preemption: "Preemption | None" = None


@dataclasses.dataclass
class _Stage:
  """One stage: its config and input, and the global steps start+1 .. end it trains."""
  index: int
  count: int
  config: ml_collections.ConfigDict
  inp: Input
  start: int
  end: int


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config's model (stage by stage) on config's data, evaluating every epoch; resumes
  from the latest checkpoint in workdir. Returns the final evaluation metrics."""
  config = config_lib.finalize(config)
  workdir = prepare_workdir(workdir)
  mesh = parallel.make_mesh()
  stage_configs = config_lib.stage_configs(config)
  extra = pseudo_labelled(config, mesh)

  start = build.training_start(config, stage_configs[0], extra)
  first, task, model, variables, alpha = start.inp, start.task, start.model, start.variables, start.alpha
  class_names = first.class_names
  parameter_overview.log_parameter_overview(variables["params"], msg=f"{config.model} parameters")

  ckpts = ckpt_lib.Checkpoints(ckpt_lib.checkpoint_dir(workdir), config.keep_checkpoints)
  model_target = ckpt_lib.abstract(variables, parallel.replicated(mesh))
  latest = ckpts.latest_step()
  resume_stage = 0
  if latest is not None:  # the same run, in the stage it was checkpointed in
    resume_stage = int(ckpts.meta(latest).get("stage", 0))
    ckpts.check_compatible(latest, build.checkpoint_meta(config, task, class_names, resume_stage), model_target,
                           accept=config.checkpoint_mismatch == "accept")

  writer = MetricWriter(workdir if jax.process_index() == 0 else None)
  if latest is None:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  run = _Run(config, model, task, class_names, alpha, mesh, make_eval_step(model, task, mesh), writer, ckpts,
             preemption=Preemption())
  metrics, result, stage = {}, None, None
  t0 = time.time()
  with run.preemption:
    for stage in _stages(stage_configs, first, extra):
      if stage.index < resume_stage:
        continue
      resume = latest if stage.index == resume_stage else None
      state, train_iter, rate_at = _start_stage(run, stage, variables, resume)
      state, metrics, result, stopped = _train_stage(run, stage, state, train_iter, rate_at)
      variables = {"params": state.params, "batch_stats": state.batch_stats}
      if stopped:
        ckpts.close()
        writer.close()
        if stopped == "interrupted":  # (announced by _train_stage): the command exits with 130
          raise Interrupted()
        return metrics
  with checkpoint_writes(ckpts.directory):
    ckpts.wait()
  if result is None:  # resumed after the last step: evaluate what was restored
    restored = ckpts.restore_model(latest, model_target)
    result = run_evaluation(run.eval_step, restored, stage.inp.eval(), mesh)
    metrics = task.metrics(result, class_names, config.round_predictions)
  base = task.baseline(class_names, stage.inp.source.labels()[stage.inp.train_indices], result["label"])
  write_json(workdir, "final_metrics.json", {"step": stage.end, "metrics": metrics, "baseline": base,
                                             "train_seconds": time.time() - t0})
  announce(f"Final (step {stage.end}): {task.summary(metrics, base)}")
  ckpts.close()
  writer.close()
  return metrics


def pseudo_labelled(config, mesh) -> RelabeledSource | None:
  """The examples of config.pseudo_label.split, labelled by the averaged predictions of
  config.pseudo_label.runs (their last_n checkpoints each)."""
  p = config.pseudo_label
  if not p.runs:
    return None
  source = make_source(config.data, p.split, unlabeled_ok=True)
  runs = [(r, s) for r in p.runs for s in ckpt_lib.find_steps(r, last_n=p.last_n)[1]]
  preds = predict_source(runs, source, config.eval_batch_size, mesh, accept=config.checkpoint_mismatch == "accept")
  labels = tasks.resolve(config, source.task).labels_of(preds, p.round)
  logging.info("pseudo-labelling: %d examples of the %s split labelled by %d run(s)", len(source),
               p.split, len(p.runs))
  return RelabeledSource(source, labels)


def _stages(configs, first: Input, extra) -> Iterator[_Stage]:
  """Each stage with its input and global steps. Stages a resumed run skips are made too: their
  lengths place the later stages' steps."""
  end = 0
  for s, sc in enumerate(configs):
    inp = first if s == 0 else create_input(sc, jax.process_index(), jax.process_count(), extra)
    start, end = end, end + int(math.ceil(sc.num_epochs * inp.steps_per_epoch))
    yield _Stage(s, len(configs), sc, inp, start, end)


def _start_stage(run: _Run, stage: _Stage, variables: dict, resume_step: int | None):
  """(train state, training input iterator, rate_at) of a stage: a fresh optimizer at the
  stage's first step, or everything restored from checkpoint `resume_step`; rate_at(i) is the
  learning rate the stage's batch i (0-based) is applied with."""
  c = stage.config
  tx, rate_at = optim.training_optimizer(c, variables["params"], stage.inp.steps_per_epoch)
  state = create_train_state(run.model, tx, variables, run.mesh, stage.start)
  train_iter = iter(stage.inp.train())
  if resume_step is not None:
    rep = parallel.replicated(run.mesh)
    restored, opt = run.ckpts.restore_training(
        resume_step, ckpt_lib.abstract(variables, rep),
        ckpt_lib.abstract({"step": state.step, "opt_state": state.opt_state}, rep), train_iter)
    state = state.replace(step=opt["step"], opt_state=opt["opt_state"], **restored)
    logging.info("resumed from %s/%d (stage %d of %d)", run.ckpts.directory, resume_step, stage.index + 1,
                 stage.count)
  sc, inp = stage.config, stage.inp
  held_out = (f"fold {sc.fold} of {sc.num_folds}" if sc.data.eval_split == "fold"
              else f"the {sc.data.eval_split} split")
  logging.info("stage %d of %d: %d training / %d evaluation examples (%s, evaluating on %s), "
               "%d px, %d steps per epoch, steps %d-%d", stage.index + 1, stage.count, len(inp.train_indices),
               len(inp.eval_indices), sc.data.source, held_out, sc.data.image_size, inp.steps_per_epoch,
               stage.start + 1, stage.end)
  return state, train_iter, rate_at


def _as_trained(config: ml_collections.ConfigDict, stage: _Stage) -> ml_collections.ConfigDict:
  """The run's config with the stage's image size and preprocessing as run (the training split's
  statistics in place of normalize('dataset')): what eval and predict re-read from a checkpoint
  of this stage."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.image_size = stage.config.data.image_size
  c.data.train_pp, c.data.eval_pp = stage.inp.train_pp, stage.inp.eval_pp
  return c


def _train_stage(run: _Run, stage: _Stage, state, train_iter, rate_at):
  """The steps of one stage; returns (state, last metrics, last evaluation, why it stopped early:
  'halted', 'preempted', 'interrupted', or None at the stage's end)."""
  config, inp, stage_start, stage_end = stage.config, stage.inp, stage.start, stage.end
  steps_per_epoch = inp.steps_per_epoch
  meta = build.checkpoint_meta(_as_trained(run.config, stage), run.task, run.class_names, stage.index,
                               stage_start)
  train_step = make_train_step(run.model, config, run.mesh, run.alpha)
  writer = run.writer
  report = Progress(stage_end, writer, config.log_every_steps, config.batch_size)
  eval_every = max(1, int(config.eval_every_epochs * steps_per_epoch))
  ckpt_every = max(1, int(config.checkpoint_every_epochs * steps_per_epoch))
  halt = config.halt_after_steps or stage_end
  step = int(state.step)
  pending: list[tuple[int, dict]] = []  # (step, metrics) since the last log line
  unchecked: list[tuple[int, dict]] = []  # (step, metrics) not yet checked for non-finite values
  metrics, result = {}, None
  pictures = _EvalPictures(run, stage)
  first, preempted = True, False
  while step < min(stage_end, halt):
    batch = next(train_iter)
    state, step_metrics = train_step(state, parallel.shard_batch(batch, run.mesh))
    step += 1
    if first:  # what this (fresh or resumed) stage trains on, once
      _write_inputs(run, batch, step)
      first = False
    local = step - stage_start
    pending.append((step, step_metrics))
    unchecked.append((step, step_metrics))
    report(step)
    log_now = local % config.log_every_steps == 0 or step == stage_end
    eval_now = local % eval_every == 0 or step == stage_end
    preempted = run.preemption is not None and run.preemption.reached(step)
    save_now = local % ckpt_every == 0 or step in (stage_end, halt) or preempted
    if log_now or eval_now or save_now:  # nothing non-finite is logged, evaluated or saved
      run.skipped += _check_finite(unchecked, config.on_nonfinite)
      unchecked = []
    elif jax.process_count() == 1:  # steps already done are checked without waiting: a diverged
      # run stops soon after. (Processes finish steps at different times: with several, every
      # one checks at the same steps, above, so that all stop at the same one.)
      ready = next((i for i, (_, m) in enumerate(unchecked) if not m["finite"].is_ready()), len(unchecked))
      run.skipped += _check_finite(unchecked[:ready], config.on_nonfinite)
      unchecked = unchecked[ready:]
    if log_now:
      means = _mean_metrics(pending)
      # The rate the update this batch feeds is applied with (the schedule counts updates, not
      # batches, when gradients are accumulated).
      means["learning_rate"] = rate_at(local - 1)
      if config.on_nonfinite == "skip":
        means["skipped_updates"] = run.skipped
      writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
      pending = []
    if eval_now:
      with report.timed("eval"):
        result = _evaluate_in_training(run, state, inp, step, local / steps_per_epoch)
        metrics = run.task.metrics(result, run.class_names, config.round_predictions)
      scalars = metrics_lib.scalar_metrics(metrics)
      writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
      with report.timed("eval"):
        pictures.write(step, state)
      logging.info("epoch %.2f, step %d: %s", local / steps_per_epoch, step,
                   ", ".join(f"{k}={v:.4f}" for k, v in scalars.items() if "/" not in k))
    if save_now:
      with report.timed("checkpoint"), checkpoint_writes(run.ckpts.directory):
        run.ckpts.save(step, state, train_iter, meta)
    if local % steps_per_epoch == 0 or step == stage_end:
      # Steps are dispatched asynchronously: the epoch's time is its steps' once they are done.
      jax.block_until_ready(step_metrics)
      report.end_epoch(int(math.ceil(local / steps_per_epoch)), step)
    if preempted:
      break
  if not preempted and step == stage_end and stage.index + 1 < stage.count:
    # A signal during the stage's last evaluation or save: stop here (that step is saved), not
    # after the next stage's setup and compile. (Several processes agree at steps only, above.)
    preempted = jax.process_count() == 1 and run.preemption.requested is not None
  if preempted or step < stage_end:  # (preempted at a stage's last step too: it is saved)
    with checkpoint_writes(run.ckpts.directory):
      run.ckpts.wait()
    stopped = "interrupted" if preempted and run.preemption.interrupted else "preempted" if preempted else "halted"
    why = {"interrupted": "interrupted at step {} (Ctrl-C): checkpoint saved",
           "preempted": "preempted at step {} (SIGTERM): checkpoint saved",
           "halted": "halted at step {} (config.halt_after_steps)"}[stopped].format(step)
    announce(f"{why}; run the same command again to resume")
    return state, metrics, result, stopped
  return state, metrics, result, None


def _evaluate_in_training(run: _Run, state, inp, step: int, epoch: float) -> dict:
  """The training loop's evaluation; non-finite predictions there name the step and what to
  change. (Training's own check passed: the loss and gradients were finite, but parameters or
  BatchNorm statistics grown too large overflow the evaluation-mode forward pass.)"""
  try:
    return run_evaluation(run.eval_step, {"params": state.params, "batch_stats": state.batch_stats},
                          inp.eval(), run.mesh)
  except DivergenceError as e:
    saved = run.ckpts.latest_step()
    raise DivergenceError(
        f"training diverged by step {step} (epoch {epoch:.2f}): its loss and gradients were finite, but "
        f"evaluating its parameters fails: {e}. Nothing from this step is saved"
        + (f" (the last checkpoint is step {saved})" if saved is not None else "")
        + ". Lower config.optim.learning_rate (or set config.optim.grad_clip_norm)") from e


def _write_inputs(run: _Run, batch: dict, step: int) -> None:
  """TensorBoard's grid (train/inputs) of the first config.tensorboard_images inputs of a batch as
  augmented, titled with their labels: what the model trains on. A segmentation's mask is drawn
  over its image, and a patch classifier's lung-mask channel (where its patches are drawn from)
  over the image channels."""
  n = min(run.config.tensorboard_images, len(batch["image"]))
  if not n or jax.process_index() > 0:
    return
  mask_last = isinstance(run.model, PatchClassifier)
  pictures = []
  for j in range(n):
    image, label = np.asarray(batch["image"][j], np.float32), np.asarray(batch["label"][j])
    if label.ndim == 2:  # segmentation: the label is the mask
      shown, heat, title = image, label, "mask"
    else:
      shown, heat = (image[..., :-1], image[..., -1]) if mask_last else (image, None)
      title = f"label {label_text(label, run.class_names)}"
    pictures.append(render_overlay(shown, heat, title))
  run.writer.write_images(step, {"train/inputs": image_grid(pictures)[None]})


class _EvalPictures:
  """At each evaluation, TensorBoard's grid (eval/saliency) of the first config.tensorboard_images
  evaluation examples with prediction, label and Grad-CAM map (explain.py's; regression and
  classification only). The examples are preprocessed and the map function compiled once per
  stage; process 0 alone computes them (on a host copy of the replicated variables where there are
  several processes) and writes."""

  def __init__(self, run: _Run, stage: _Stage):
    inp, self.run, self.batch = stage.inp, run, None
    n = min(run.config.tensorboard_images, len(inp.eval_indices))
    if n and jax.process_index() == 0 and run.task.name in EXPLAINED_TASKS:
      [self.batch] = list(eval_dataset(inp.eval_source, inp.eval_indices[:n], pp=inp.eval_pp, global_batch=n))
      self.compute = saliency_function(run.model, None, run.config.explain.layer)

  def write(self, step: int, state) -> None:
    if self.batch is None:
      return
    run, images = self.run, np.asarray(self.batch["image"])
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if jax.process_count() > 1:  # a call on them would span the other processes' devices
      variables = jax.device_get(variables)
    result = jax.device_get(self.compute(variables, images))
    mask_last = isinstance(run.model, PatchClassifier)
    pictures = [draw_saliency(result, images, self.batch["label"], j, list(run.class_names or []), mask_last,
                              run.config.explain.alpha)[0] for j in range(len(images))]
    run.writer.write_images(step, {"eval/saliency": image_grid(pictures)[None]})


class Preemption:
  """SIGTERM, what SLURM and cloud preemption send, asks the run to save a checkpoint at the next
  step boundary and stop cleanly; the same command resumes from there. Several processes agree
  on that step through JAX's preemption sync point (its distributed runtime receives the signal).
  On one process Ctrl-C (SIGINT) does the same, and the command then exits with code 130; a
  second Ctrl-C stops at once."""

  def __init__(self):
    self.requested: str | None = None  # 'SIGTERM' or 'SIGINT', once a signal has asked
    self._previous: dict = {}

  def __enter__(self) -> "Preemption":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._notice) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _notice(self, signum, frame) -> None:
    if signum == signal.SIGINT:
      if self.requested:
        raise KeyboardInterrupt
      logging.warning("Ctrl-C: saving a checkpoint at the next step boundary, then stopping (Ctrl-C again "
                      "stops at once)")
      self.requested = "SIGINT"
    else:
      logging.warning("SIGTERM: saving a checkpoint at the next step boundary, then stopping")
      self.requested = self.requested or "SIGTERM"

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested is not None
    from jax.experimental import multihost_utils
    return bool(multihost_utils.reached_preemption_sync_point(step))

  @property
  def interrupted(self) -> bool:
    """Ctrl-C, not preemption, stopped the run."""
    return self.requested == "SIGINT"


def _check_finite(steps: list[tuple[int, dict]], policy: str) -> int:
  """The number of (step, metrics) whose update was skipped for a non-finite loss, gradient or
  updated state (the train step keeps the state then); with policy 'error' the first one stops
  the run."""
  skipped = 0
  for step, m in steps:
    if float(jax.device_get(m["finite"])):
      continue
    if policy != "skip":
      values = {k: float(jax.device_get(m[k])) for k in ("loss", "grad_norm")}
      bad = ", ".join(f"{k}={v}" for k, v in values.items() if not np.isfinite(v))
      if not bad:  # finite loss and gradient, but the update overflowed
        bad = ("parameters, optimizer state or BatchNorm statistics after the update (loss="
               f"{values['loss']:.4g}, grad_norm={values['grad_norm']:.4g})")
      raise DivergenceError(
          f"training diverged at step {step}: non-finite {bad}; the parameters before that step "
          "are kept and nothing non-finite was saved. Lower config.optim.learning_rate (or set "
          "config.optim.grad_clip_norm), check the data, or set config.on_nonfinite='skip' to "
          "skip such updates")
    skipped += 1
    logging.warning("step %d: non-finite loss, gradient or update, skipped (config.on_nonfinite='skip')",
                    step)
  return skipped


def _mean_metrics(steps: list[tuple[int, dict]]) -> dict:
  """Each training metric's mean over the steps whose update was applied."""
  kept = [m for _, m in steps if float(jax.device_get(m["finite"]))] or [m for _, m in steps]
  return {k: float(np.mean([jax.device_get(m[k]) for m in kept])) for k in kept[0] if k != "finite"}


def _flat(d: dict, prefix: str = "") -> dict:
  """A nested config dict as {'a.b': value}: the hyperparameters the metric writer records."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
