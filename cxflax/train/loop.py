"""train_and_evaluate(config, workdir) and evaluate(config, workdir): the main job's two modes."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from cxflax import config as config_lib
from cxflax import parallel
from cxflax.data.pipeline import Input, create_input
from cxflax.errors import CheckpointError, ConfigError
from cxflax.convert import load_converted
from cxflax.models.heads import create_network, with_backbone
from cxflax.train import checkpoint as ckpt_lib
from cxflax.train import metrics as metrics_lib
from cxflax.train import optim
from cxflax.train.steps import create_train_state, init_variables, make_eval_step, make_train_step


def prepare_workdir(workdir: str) -> str:
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir!r} exists and is not a directory")
  os.makedirs(workdir, exist_ok=True)
  return workdir


def num_outputs(inp: Input) -> int:
  return 1 if inp.task == "regression" else len(inp.class_names)


def build_model(config, inp: Input):
  return create_network(config.model, config.head, num_outputs(inp), pool=config.pool,
                        head_dropout=config.head_dropout, dtype=jnp.dtype(config.dtype),
                        backbone_kwargs=_backbone_kwargs(config))


def _backbone_kwargs(config) -> dict:
  return {"drop_path_rate": config.drop_path_rate} if config.drop_path_rate else {}


def checkpoint_meta(config, inp: Input) -> dict[str, Any]:
  """What a checkpoint records about the run that made it (checked again on restore)."""
  return {"model": config.model, "head": config.head, "num_outputs": num_outputs(inp),
          "task": inp.task, "class_names": list(inp.class_names or []),
          "image_size": config.data.image_size, "config": config.to_dict()}


def _setup(config, workdir: str):
  config = config_lib.finalize(config)
  workdir = prepare_workdir(workdir)
  mesh = parallel.make_mesh()
  inp = create_input(config, jax.process_index(), jax.process_count())
  config_lib.check_task(config, inp.task)
  model = build_model(config, inp)
  return config, workdir, mesh, inp, model


def _image_shape(config) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, 3)


def run_evaluation(eval_step, variables, inp: Input, mesh) -> dict[str, np.ndarray]:
  """Predictions, labels and example indices for every held-out example, padding removed."""
  parts: dict[str, list] = {"pred": [], "label": [], "index": []}
  for batch in inp.eval():
    out = eval_step(variables, parallel.shard_batch(batch, mesh))
    keep = parallel.gather(out["valid"]) > 0
    for k in parts:
      parts[k].append(parallel.gather(out[k])[keep])
  return {k: np.concatenate(v) for k, v in parts.items()}


def score(inp: Input, result: dict[str, np.ndarray]) -> dict[str, float]:
  if inp.task == "regression":
    return metrics_lib.regression_metrics(result["pred"], result["label"])
  return metrics_lib.classification_metrics(result["pred"].argmax(-1), result["label"],
                                            len(inp.class_names))


def baseline(inp: Input, eval_labels: np.ndarray) -> dict[str, float]:
  train_labels = inp.source.labels()[inp.train_indices]
  return metrics_lib.baseline_metrics(inp.task, train_labels, eval_labels,
                                      None if inp.task == "regression" else len(inp.class_names))


def _headline(inp: Input) -> str:
  return "mae" if inp.task == "regression" else "accuracy"


def _summary(inp: Input, metrics: dict, base: dict) -> str:
  key = _headline(inp)
  others = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != key)
  return (f"eval {key}={metrics[key]:.4f} ({others}) | trivial baseline "
          f"({'training mean' if inp.task == 'regression' else 'majority class'}) "
          f"{key}={base[key]:.4f}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains config's model on config's data, evaluating every epoch; resumes from the latest
  checkpoint in workdir. Returns the final evaluation metrics."""
  config, workdir, mesh, inp, model = _setup(config, workdir)
  steps_per_epoch = inp.steps_per_epoch
  total_steps = int(math.ceil(config.num_epochs * steps_per_epoch))
  held_out = (f"fold {config.fold} of {config.num_folds}" if config.data.eval_split == "fold"
              else f"the {config.data.eval_split} split")
  logging.info("data: %d training / %d evaluation examples (%s, evaluating on %s); %d steps per "
               "epoch, %d steps", len(inp.train_indices), len(inp.eval_indices), config.data.source,
               held_out, steps_per_epoch, total_steps)

  schedule = optim.make_schedule(config, steps_per_epoch)
  tx = optim.make_optimizer(config, schedule)
  variables = init_variables(model, _image_shape(config), config.seed)
  if config.init_from:
    variables = with_backbone(variables, load_converted(config.init_from, config.model))
    logging.info("backbone initialised from %s", config.init_from)
  parameter_overview.log_parameter_overview(variables["params"], msg=f"{config.model} parameters")
  state = create_train_state(model, tx, variables, mesh)
  train_iter = iter(inp.train())

  meta = checkpoint_meta(config, inp)
  ckpts = ckpt_lib.Checkpoints(ckpt_lib.checkpoint_dir(workdir), config.keep_checkpoints)
  latest = ckpts.latest_step()
  if latest is not None:
    rep = parallel.replicated(mesh)
    model_target = ckpt_lib.abstract({"params": state.params, "batch_stats": state.batch_stats}, rep)
    ckpts.check_compatible(latest, meta, model_target)
    restored, opt = ckpts.restore_training(
        latest, model_target, ckpt_lib.abstract({"step": state.step, "opt_state": state.opt_state}, rep),
        train_iter)
    state = state.replace(step=opt["step"], opt_state=opt["opt_state"], **restored)
    logging.info("resumed from %s/%d", ckpts.directory, latest)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if latest is None:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps, every_secs=None)
  train_step = make_train_step(model, config, mesh)
  eval_step = make_eval_step(model, inp.task, mesh)

  step = int(state.step)
  eval_every = max(1, int(config.eval_every_epochs * steps_per_epoch))
  ckpt_every = max(1, int(config.checkpoint_every_epochs * steps_per_epoch))
  pending: list[dict] = []
  metrics: dict[str, float] = {}
  t0 = time.time()
  halt = config.halt_after_steps or total_steps
  while step < min(total_steps, halt):
    batch = parallel.shard_batch(next(train_iter), mesh)
    state, step_metrics = train_step(state, batch)
    step += 1
    pending.append(step_metrics)
    report(step)
    if step % config.log_every_steps == 0 or step == total_steps:
      means = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
      means["learning_rate"] = float(schedule(step - 1))
      if not all(map(np.isfinite, means.values())):
        raise FloatingPointError(f"non-finite training metrics at step {step}: {means}; lower "
                                 "config.learning_rate or check the data")
      writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
      pending = []
    if step % eval_every == 0 or step == total_steps:
      with report.timed("eval"):
        result = run_evaluation(eval_step, {"params": state.params, "batch_stats": state.batch_stats},
                                inp, mesh)
        metrics = score(inp, result)
      writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
      logging.info("epoch %.2f, step %d: %s", step / steps_per_epoch, step,
                   ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if step % ckpt_every == 0 or step in (total_steps, halt):
      with report.timed("checkpoint"):
        ckpts.save(step, state, train_iter, meta)
  ckpts.wait()
  writer.flush()
  if step < total_steps:
    logging.info("halted at step %d of %d (config.halt_after_steps); run again to resume", step,
                 total_steps)
    ckpts.close()
    return metrics

  if not metrics:  # resumed at the end: evaluate what was restored
    result = run_evaluation(eval_step, {"params": state.params, "batch_stats": state.batch_stats},
                            inp, mesh)
    metrics = score(inp, result)
  base = baseline(inp, result["label"])
  _write_json(workdir, "final_metrics.json", {"step": step, "metrics": metrics, "baseline": base,
                                              "train_seconds": time.time() - t0})
  line = f"Final (step {step}): {_summary(inp, metrics, base)}"
  logging.info(line)
  if jax.process_index() == 0:
    print(line, flush=True)
  ckpts.close()
  return metrics


def evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None
             ) -> dict[str, float]:
  """Restores the latest checkpoint of workdir (or `checkpoint`) and evaluates it; writes
  eval_metrics.json in workdir."""
  config, workdir, mesh, inp, model = _setup(config, workdir)
  directory, step = (ckpt_lib.resolve(checkpoint) if checkpoint
                     else (ckpt_lib.checkpoint_dir(workdir), None))
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint to evaluate: {directory} does not exist (train first, "
                          "or pass --checkpoint=PATH)")
  ckpts = ckpt_lib.Checkpoints(directory, create=False)
  step = ckpts.latest_step() if step is None else step
  if step is None or step not in ckpts.all_steps():
    raise CheckpointError(f"no checkpoint to evaluate in {directory}"
                          + (f" (steps there: {ckpts.all_steps()})" if ckpts.all_steps() else ""))
  shapes = jax.eval_shape(lambda: init_variables(model, _image_shape(config), config.seed))
  target = ckpt_lib.abstract({"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})},
                             parallel.replicated(mesh))
  ckpts.check_compatible(step, checkpoint_meta(config, inp), target)
  variables = ckpts.restore_model(step, target)
  result = run_evaluation(make_eval_step(model, inp.task, mesh), variables, inp, mesh)
  metrics = score(inp, result)
  base = baseline(inp, result["label"])
  _write_json(workdir, "eval_metrics.json", {
      "checkpoint": os.path.join(directory, str(step)), "step": step, "metrics": metrics,
      "baseline": base, "num_examples": int(len(result["label"]))})
  line = f"Checkpoint {directory}/{step}: {_summary(inp, metrics, base)}"
  logging.info(line)
  if jax.process_index() == 0:
    print(line, flush=True)
  ckpts.close()
  return metrics


def _write_json(workdir: str, name: str, payload: dict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, name), "w") as f:
      json.dump(payload, f, indent=2)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
