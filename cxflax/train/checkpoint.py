"""orbax checkpoints of a run: model variables, optimizer state, data iterator, and metadata.

Layout: ``WORKDIR/checkpoints/<step>/{model, opt, data, meta}``. 'model' holds params and
batch_stats (all that evaluation needs), 'opt' the step and optimizer state, 'data' the grain
iterator's position (one file per process), 'meta' JSON describing the model and config, which is
checked on restore so that a checkpoint of another model or head is refused with a clear message.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from cxflax import trees
from cxflax.errors import CheckpointError

# Metadata fields that must agree between a checkpoint and the config restoring it.
_MODEL_FIELDS = ("model", "head", "num_outputs", "task")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpoints:
  """A run's checkpoint manager (keeps the last `max_to_keep`)."""

  def __init__(self, directory: str, max_to_keep: int | None = None, create: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    handlers = dict(model=ocp.StandardCheckpointHandler(), opt=ocp.StandardCheckpointHandler(),
                    meta=ocp.JsonCheckpointHandler(), data=grain.checkpoint.CheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, meta: dict[str, Any]) -> None:
    model = {"params": state.params, "batch_stats": state.batch_stats}
    opt = {"step": state.step, "opt_state": state.opt_state}
    items = dict(model=ocp.args.StandardSave(model), opt=ocp.args.StandardSave(opt),
                 meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items))

  def meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def check_compatible(self, step: int, meta: dict[str, Any], model_target) -> None:
    """Raises CheckpointError unless the checkpoint at `step` fits this model and config."""
    saved = self.meta(step)
    where = os.path.join(self.directory, str(step))
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {meta.get(k)!r}"
             for k in _MODEL_FIELDS if saved.get(k) != meta.get(k)]
    match = trees.Match(model_target, self.stored_model(step))
    missing, extra = match.missing, match.unexpected
    shapes = ["{}: checkpoint {}, model {}".format(k, *match.shapes(k)) for k in match.wrong_shape]
    if missing:
      diffs.append(f"{len(missing)} variable(s) missing from the checkpoint, e.g. {missing[:3]}")
    if extra:
      diffs.append(f"{len(extra)} variable(s) the model lacks, e.g. {extra[:3]}")
    if shapes:
      diffs.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
    if diffs:
      raise CheckpointError(f"checkpoint {where} was made by a different model or config:\n  "
                            + "\n  ".join(diffs))

  def stored_model(self, step: int) -> dict:
    """The model item's tree as stored: {'params', 'batch_stats'} of array metadata (shape,
    dtype), read without loading the arrays."""
    return _tree_of(self.manager.item_metadata(step)["model"])

  def restore_model(self, step: int, model_target) -> dict:
    """{'params', 'batch_stats'} restored onto the shardings of `model_target` (abstract arrays)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(model_target))).model

  def restore_training(self, step: int, model_target, opt_target, data_iterator):
    """(model variables, {'step', 'opt_state'}) restored, and the data iterator moved to its
    saved position."""
    items = dict(model=ocp.args.StandardRestore(model_target),
                 opt=ocp.args.StandardRestore(opt_target))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      r = self.manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
      raise CheckpointError(f"cannot resume from {os.path.join(self.directory, str(step))} "
                            f"(was the optimizer or data config changed?): {e}") from None
    return r.model, r.opt

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _tree_of(metadata) -> dict:
  tree = getattr(metadata, "tree", metadata)
  return dict(tree)


def abstract(tree, sharding) -> Any:
  """ShapeDtypeStructs of `tree` placed on `sharding`: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def resolve(path: str) -> tuple[str, int | None]:
  """(checkpoint directory, step) for --checkpoint: a run's workdir, its checkpoints/ folder, or
  one step's folder (…/checkpoints/1200). step None means the latest."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint path {path!r} does not exist")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, "model")):
    return os.path.dirname(path), int(base)
  return path, None


def find_steps(path: str, step: int | None = None, last_n: int = 1,
               what: str = "checkpoint") -> tuple[str, list[int]]:
  """(checkpoint directory, steps) for `path` (see resolve): `step` if given, else the step
  `path` names, else its last `last_n` steps. Every mode that reads checkpoints chooses them
  here, so they all refuse a missing one alike: with an error naming `what` and the steps there."""
  directory, named = resolve(path)
  step = step if step is not None else named
  if not os.path.isdir(directory):
    raise CheckpointError(f"no {what}: {directory} is not a directory")
  ckpts = Checkpoints(directory, create=False)
  steps = sorted(ckpts.all_steps())
  ckpts.close()
  chosen = steps[-last_n:] if step is None else [step]
  if not chosen or chosen[0] not in steps:
    raise CheckpointError(f"no {what}{'' if step is None else f' at step {step}'} in {directory}"
                          + (f" (steps there: {steps})" if steps else ""))
  return directory, chosen
