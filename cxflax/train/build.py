"""Models and their starting variables from a config (with the input they train on); trained runs
back from their checkpoints.

A checkpoint records the config that made it (see checkpoint.py), so a run can be rebuilt from
its folder alone: ensembles name their members by folder, and prediction averages runs the same
way.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cxflax import config as config_lib
from cxflax import parallel, trees
from cxflax.data.pipeline import Input, create_input
from cxflax.errors import CheckpointError, ConfigError
from cxflax.models.ensembles import FeatureEnsemble, NeuralWeightEnsemble
from cxflax.models import create_model, timm_weights
from cxflax.models.fc_densenet import SEGMENTATION_MODELS
from cxflax.models.heads import MLPHead, Network, create_network, with_backbone
from cxflax.models.patches import PatchClassifier
from cxflax.train import checkpoint as ckpt_lib
from cxflax.train.losses import class_alpha
from cxflax.train.steps import init_variables
from cxflax.train.tasks import TASKS, Classification, Task, resolve as resolve_task

ENSEMBLES = ("", "average", "se", "flannel")


def build_model(config, task: Task, class_names=None) -> nn.Module:
  """config's network, or its ensemble of trained members (config.ensemble)."""
  kind = config.ensemble.kind
  if kind not in ENSEMBLES:
    raise ConfigError(f"config.ensemble.kind must be one of {ENSEMBLES}, got {kind!r}")
  if kind:
    return _build_ensemble(config, task, class_names)
  dtype = jnp.dtype(config_lib.resolve_dtype(config.dtype))
  if task.per_pixel:
    if config.model not in SEGMENTATION_MODELS:
      raise ConfigError(f"segmentation (config.data.target={config.data.target!r}) needs a "
                        f"segmentation model, one of {SEGMENTATION_MODELS}; got {config.model!r}")
    return create_model(config.model, num_classes=task.num_outputs(class_names), dtype=dtype)
  if config.model in SEGMENTATION_MODELS:
    raise ConfigError(f"{config.model} is a segmentation model: set config.data.target='lung_mask'")
  # Only the rates set are passed; .get: a checkpoint written before drop_rate existed still loads.
  backbone_kwargs = {k: config.get(k, 0.0) for k in ("drop_rate", "drop_path_rate") if config.get(k, 0.0)}
  head_kwargs = dict(config.head_kwargs)
  network = create_network(config.model, config.head, task.num_outputs(class_names), pool=config.pool,
                           head_dropout=config.head_dropout, dtype=dtype, backbone_kwargs=backbone_kwargs,
                           head_kwargs=head_kwargs, backbone_classes=config.backbone_classes)
  p = config.get("patches")
  if p and p.num:
    if not isinstance(task, Classification):
      raise ConfigError(f"config.patches.num > 0: patch classifiers classify; this is a {task.name} task")
    return PatchClassifier(network=network, patch_size=p.size, num_patches=p.num, aggregate=p.aggregate,
                           seed=config.seed, chunk=p.get("chunk", 0))
  return network


def checkpoint_meta(config, task: Task, class_names, stage: int = 0, stage_start: int = 0) -> dict:
  """What a checkpoint of `stage` records about the run that made it: checked again on restore
  (checkpoint.RUN_FIELDS: the stage's image size and optimizer, among others), and all that
  load_run needs to rebuild the run."""
  stages = config_lib.stage_configs(config)
  sc = stages[min(stage, len(stages) - 1)]  # a stage past the end: num_stages tells
  return {"model": config.model if not config.ensemble.kind else f"ensemble:{config.ensemble.kind}",
          "head": config.head, "num_outputs": task.num_outputs(class_names), "task": task.name,
          "class_names": list(class_names or []), "image_size": sc.data.image_size,
          "num_stages": len(stages), "optimizer": sc.optim.name,
          "stage": stage, "stage_start": stage_start, "config": config.to_dict()}


@dataclasses.dataclass
class Run:
  """A trained run restored from a checkpoint."""
  path: str
  step: int
  config: ml_collections.ConfigDict
  meta: dict
  model: nn.Module
  variables: dict


def load_run(path: str, step: int | None = None) -> Run:
  """The model, variables and config of the checkpoint at `path` (a workdir, its checkpoints/
  folder or one step's folder; the latest step unless given)."""
  directory, [step] = ckpt_lib.find_steps(path, step)
  ckpts = ckpt_lib.Checkpoints(directory, create=False)
  meta = ckpts.meta(step)
  config = ml_collections.ConfigDict(meta["config"])
  model = build_model(config, TASKS.get(meta["task"]), meta.get("class_names") or None)
  # Restored replicated over this job's devices, whatever the topology of the run that saved it
  # (a checkpoint of a multi-process run is read by one process).
  target = ckpt_lib.abstract(ckpts.stored_model(step), parallel.replicated(parallel.make_mesh()))
  variables = ckpts.restore_model(step, target)
  ckpts.close()
  return Run(os.path.join(directory, str(step)), step, config, meta, model, variables)


def _build_ensemble(config, task: Task, class_names) -> nn.Module:
  members = config.ensemble.members
  if len(members) < 2:
    raise ConfigError("config.ensemble.members must name at least two trained runs (workdirs)")
  runs = [load_run(m) for m in members]
  kind = config.ensemble.kind
  if kind == "flannel":
    return NeuralWeightEnsemble(members=tuple(r.model for r in runs),
                                activation=config.ensemble.activation)
  trunk = FeatureEnsemble(members=tuple(r.model.backbone for r in runs), se=kind == "se")
  return Network(backbone=trunk, head=MLPHead(task.num_outputs(class_names), tuple(config.ensemble.head_hidden)))


def _member_variables(config) -> list[dict]:
  out = []
  for m in config.ensemble.members:
    run = load_run(m)
    v = run.variables
    if config.ensemble.kind != "flannel":  # the members' heads are dropped: keep their backbones
      v = {col: tree["backbone"] for col, tree in v.items() if "backbone" in tree}
    out.append(v)
  return out


def initial_variables(config, model: nn.Module, image_shape, seed: int) -> dict:
  """Fresh variables, then what config.init_from and config.ensemble.members provide."""
  variables = jax.tree.map(lambda x: x, init_variables(model, image_shape, seed))
  if config.ensemble.kind:
    flat = {col: dict(tree) for col, tree in variables.items()}
    for i, member in enumerate(_member_variables(config)):
      for col, tree in member.items():
        target = flat[col]["backbone"] if config.ensemble.kind != "flannel" else flat[col]
        target[f"members_{i}"] = _fitted(target[f"members_{i}"], tree, f"ensemble member {i}")
    variables = flat
  if config.init_from:
    variables = warm_start(variables, config.init_from, config.model)
  return variables


@dataclasses.dataclass(frozen=True)
class Start:
  """What training starts from (the main job's first stage, lr_find, the fed-step benchmark): the
  input, the task it resolves to, the model, its initial variables (params and batch_stats) and
  the focal loss's class weights."""
  inp: Input
  task: Task
  model: nn.Module
  variables: dict
  alpha: np.ndarray | None


def training_start(config, input_config=None, extra=None) -> Start:
  """config's model and fresh variables on the input of `input_config` (config's own unless
  given: a staged run's first stage), plus `extra` training examples (pseudo-labels)."""
  inp = create_input(config if input_config is None else input_config, jax.process_index(), jax.process_count(),
                     extra)
  task = resolve_task(config, inp.task)
  model = build_model(config, task, inp.class_names)
  variables = initial_variables(config, model, inp.image_shape(), config.seed)
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  alpha = class_alpha(config.loss, inp.source.labels()[inp.train_indices], inp.class_names)
  return Start(inp, task, model, variables, alpha)


def _fitted(want, got, what: str):
  """`got` cast to the shapes and dtypes of `want`, or an error naming what does not fit."""
  match = trees.Match(want, got)
  bad = sorted(match.missing + match.wrong_shape)
  if bad:
    raise CheckpointError(f"{what} does not fit its place in the model: {bad[:5]}")
  return match.filled()


def warm_start(variables: dict, path: str, model_name: str) -> dict:
  """Variables started from `path`: timm's pretrained weights for the backbone — by name
  ('timm/resnest50d.in1k', fetched into the Hugging Face cache), as a weights file (.safetensors,
  .pth) or converted (python -m cxflax.convert) —, or a cxflax run, whose variables are copied
  wherever name and shape agree (seed 004 builds each training phase on the previous one)."""
  from cxflax.convert import META, load_converted
  if timm_weights.is_hub_name(path) and not os.path.exists(path):
    path = timm_weights.hub_weights_file(path, model_name)
  pretrained = None
  if os.path.isfile(path):
    pretrained = timm_weights.load_timm_weights(model_name, path)
  elif os.path.isfile(os.path.join(path, META)):
    pretrained = load_converted(path, model_name)
  if pretrained is not None:
    if "network" in variables["params"]:  # a patch classifier: the backbone is inside its network
      inner = with_backbone({col: tree["network"] for col, tree in variables.items()}, pretrained)
      out = {col: {**tree, "network": inner[col]} for col, tree in variables.items()}
    else:
      out = with_backbone(variables, pretrained)
    logging.info("backbone initialised from %s", path)
    return out
  source = load_run(path).variables
  copied, fresh = 0, []
  out = {}
  for col, tree in variables.items():
    match = trees.Match(tree, source.get(col, {}))
    out[col] = match.filled()
    copied += len(match.want) - len(match.fresh)
    fresh += match.fresh
  if copied == 0:
    raise CheckpointError(f"config.init_from={path!r}: no variable of that run fits this model")
  logging.info("initialised %d variables from %s; %d fresh (e.g. %s)", copied, path, len(fresh), fresh[:3])
  return out
