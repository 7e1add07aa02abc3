"""--mode=describe: the effective settings of every training stage of a config, printed and
written as `recipe.json` in the workdir, without training.

What a reader holds against the paper: model, head, image size, batches, optimizer (with how its
weight decay is applied), schedule (in epochs and in optimizer updates), loss and its
parameters, frozen parameters and per-group rates, preprocessing, folds, ensemble and predict
settings, and the recipe's listed departures from its paper. Keys are config field paths where
a field holds the setting ('optim.learning_rate'), so that a key names what to override; the
derived ones (updates, rates per group) are listed in the README's "Describe" section.
"""

from __future__ import annotations

import json
import math
import os

import jax
import ml_collections

from cxflax import config as config_lib
from cxflax.errors import CxflaxError
from cxflax.train import optim
from cxflax.train.losses import LOSSES
from cxflax.train.workdir import announce, prepare_workdir, write_json

MODEL_FIELDS = ("model", "head", "head_kwargs", "pool", "head_dropout", "drop_rate", "backbone_classes",
                "drop_path_rate", "dtype", "init_from")
DATA_FIELDS = ("data.source", "data.image_size", "data.train_pp", "data.eval_pp", "data.eval_split",
               "num_folds", "fold", "data.stratify", "seed")


def describe(config, workdir: str) -> dict:
  """The settings of every stage and the recipe's departures; printed and written to
  `workdir/recipe.json`."""
  stages = config_lib.stage_configs(config_lib.finalize(config))
  recipe = {"stages": [stage_settings(c) for c in stages],
            "departures": {path: reason for path, reason in config.departures}}
  workdir = prepare_workdir(workdir)
  write_json(workdir, "recipe.json", recipe)
  if jax.process_index() == 0:
    print(format_recipe(recipe), flush=True)
  announce(f"describe: {len(stages)} stage(s), {len(recipe['departures'])} departure(s) from the paper; "
           f"wrote {os.path.join(workdir, 'recipe.json')}")
  return recipe


def stage_settings(c: ml_collections.ConfigDict) -> dict:
  """One finalized stage config's effective settings, keyed by field path."""
  s: dict = {}
  for key in MODEL_FIELDS + DATA_FIELDS:
    s[key] = _get(c, key)
  examples, steps = _training_size(c, s)
  accum = c.optim.grad_accum_steps
  s["batch_size"], s["eval_batch_size"], s["optim.grad_accum_steps"] = c.batch_size, c.eval_batch_size, accum
  s["examples_per_update"] = c.batch_size * accum
  s["num_epochs"] = c.num_epochs
  s["train_examples"], s["steps_per_epoch"] = examples, steps
  # Every epoch ends with an update (the batches left over make the last one): see optim.
  updates = None if steps is None else optim.updates_per_epoch(steps, accum)
  s["updates_per_epoch"] = _number(updates)
  s["total_updates"] = None if updates is None else int(math.ceil(c.num_epochs * updates))
  s.update(_optimizer(c.optim))
  s.update(_schedule(c.schedule, c.num_epochs, updates))
  s["loss.name"] = c.loss.name
  for f in LOSSES.info(c.loss.name).get("fields", ()):
    s[f"loss.{f}"] = json_ready(c.loss[f])
  if c.patches.num:
    s.update({f"patches.{k}": json_ready(v) for k, v in c.patches.items()})
  if c.ensemble.kind:
    s.update({f"ensemble.{k}": json_ready(v) for k, v in c.ensemble.items()})
  s.update({f"predict.{k}": json_ready(v) for k, v in c.predict.items()})
  s["round_predictions"], s["keep_checkpoints"] = c.round_predictions, c.keep_checkpoints
  s.update({f"lr_find.{k}": json_ready(v) for k, v in c.lr_find.items()})
  s.update({f"{group}.{k}": json_ready(v) for group in ("eval", "explain") for k, v in c[group].items()})
  if c.pseudo_label.runs:
    s.update({f"pseudo_label.{k}": json_ready(v) for k, v in c.pseudo_label.items()})
  return s


def _optimizer(o) -> dict:
  info = optim.OPTIMIZERS.info(o.name)
  s = {"optim.name": o.name, "optim.learning_rate": o.learning_rate}
  for f in info.get("fields", ()):
    s[f"optim.{f}"] = json_ready(o[f])
  if o.weight_decay:
    s["optim.weight_decay_applied"] = info.get("weight_decay", "")
  for f in ("grad_clip_norm", "sam_rho"):
    if o[f]:
      s[f"optim.{f}"] = o[f]
  if o.sam_rho:
    s["optim.sam_per_device"] = o.sam_per_device
  if o.param_groups:
    s["optim.param_groups"], s["optim.group_lr_range"] = list(o.param_groups), list(o.group_lr_range)
  rates = optim.group_learning_rates(o)
  patterns = list(o.param_groups) or [".*"]
  s["optim.groups"] = [{"params": p, "learning_rate": _number(r)} for p, r in zip(patterns, rates)]
  s["optim.freeze"] = list(o.freeze)
  if o.freeze:
    s["optim.train_frozen_bn"] = o.train_frozen_bn
  return s


def _schedule(sc, num_epochs: float, updates_per_epoch: float | None) -> dict:
  """The schedule's fields; each in epochs also in optimizer updates (a period of 0 is the run)."""
  s = {"schedule.name": sc.name, "schedule.unit": sc.unit}
  for f in optim.SCHEDULES.info(sc.name).get("fields", ()):
    s[f"schedule.{f}"] = json_ready(sc[f])
    if f.endswith("_epochs"):
      epochs = sc[f] or (num_epochs if f == "period_epochs" else 0)
      s[f"schedule.{f[:-len('_epochs')]}_updates"] = (
          None if updates_per_epoch is None else _number(epochs * updates_per_epoch))
  return s


def _training_size(c, s: dict) -> tuple[int | None, int | None]:
  """(training examples, batches per epoch) where the data can be read; else (None, None) and
  why under 'train_examples_unknown'."""
  from cxflax.data import pipeline
  try:
    _, train_idx, _, _ = pipeline.split_examples(c)
  except CxflaxError as e:
    s["train_examples_unknown"] = str(e)
    return None, None
  return len(train_idx), len(train_idx) // c.batch_size


def format_recipe(recipe: dict) -> str:
  lines = []
  for i, stage in enumerate(recipe["stages"]):
    lines.append(f"stage {i + 1} of {len(recipe['stages'])}")
    width = max(map(len, stage))
    lines += [f"  {k.ljust(width)}  {json.dumps(v)}" for k, v in stage.items()]
  if recipe["departures"]:
    lines.append("departures from the paper")
    width = max(map(len, recipe["departures"]))
    lines += [f"  {k.ljust(width)}  {v}" for k, v in recipe["departures"].items()]
  return "\n".join(lines)


def _get(c, path: str):
  node = c
  for part in path.split("."):
    node = node[part]
  return json_ready(node)


def json_ready(v):
  """JSON-ready: ConfigDicts as dicts, tuples as lists."""
  if isinstance(v, ml_collections.ConfigDict):
    v = v.to_dict()
  if isinstance(v, dict):
    return {k: json_ready(x) for k, x in v.items()}
  if isinstance(v, (tuple, list)):
    return [json_ready(x) for x in v]
  return v


def _number(x: float | None):
  """An integral float as an int (10.0 updates → 10)."""
  return int(x) if isinstance(x, float) and x.is_integer() else x
