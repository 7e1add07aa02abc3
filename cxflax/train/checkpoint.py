"""orbax checkpoints of a run: model variables, optimizer state, data iterator, and metadata.

Layout: ``WORKDIR/checkpoints/<step>/{model, opt, data, meta}``. 'model' holds params and
batch_stats (all that evaluation needs), 'opt' the step and optimizer state, 'data' the grain
iterator's position (one file per process), 'meta' JSON describing the model and config, which is
checked on restore so that a checkpoint of another run is refused with the list of what differs.

A run killed at any point leaves nothing that looks like a checkpoint and is not one: orbax writes
each step into a temporary folder and renames it when complete (the training run removes such
leftovers when it starts), and an old step is first renamed into `todelete/` (one atomic rename),
and only then are its files removed, so that a run killed while deleting leaves no half-deleted
step for resume to choose or predict to average.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Any, Sequence

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from cxflax import trees
from cxflax.errors import CheckpointError

# What a checkpoint records about its run (build.checkpoint_meta) that a run resuming it, or eval,
# must agree with; config.checkpoint_mismatch='accept' lets them differ (the variables must fit).
RUN_FIELDS = ("model", "head", "num_outputs", "task", "class_names", "image_size", "num_stages", "optimizer")
# What checkpoints whose predictions are averaged must agree on.
OUTPUT_FIELDS = ("task", "num_outputs", "class_names")
# Where old steps go, by one atomic rename, before their files are removed.
_TODELETE = "todelete"
_ACCEPT_HINT = "set config.checkpoint_mismatch='accept' to use it anyway"
_DAMAGED_HINT = ("the checkpoint is damaged or incomplete (a copy cut short?): copy it again, or remove "
                 "that step's folder to use the step before")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpoints:
  """A run's checkpoint manager (keeps the last `max_to_keep`). create: this is the training run
  that writes here; it makes the folder and removes what a killed run left (orbax's unfinished
  temporary folders, steps being deleted). Readers (eval, predict, find_steps) pass False, so that
  they never touch a folder a run may be writing."""

  def __init__(self, directory: str, max_to_keep: int | None = None, create: bool = True):
    self.directory = os.path.abspath(directory)
    self._writer = create
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, cleanup_tmp_directories=create,
                                           todelete_subdir=_TODELETE if create else None)
    handlers = dict(model=ocp.StandardCheckpointHandler(), opt=ocp.StandardCheckpointHandler(),
                    meta=ocp.JsonCheckpointHandler(), data=grain.checkpoint.CheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._empty_todelete()

  def _empty_todelete(self) -> None:
    """Removes the steps orbax has moved out of the way (process 0 alone, as orbax deletes)."""
    folder = os.path.join(self.directory, _TODELETE)
    if not self._writer or jax.process_index() != 0 or not os.path.isdir(folder):
      return
    try:
      for name in os.listdir(folder):
        shutil.rmtree(os.path.join(folder, name))
    except OSError as e:
      raise CheckpointError(f"cannot remove the old checkpoints in {folder}: {e}") from None

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
    # The previous save and its deletions end first (orbax's save waits for them anyway); then
    # the steps they moved aside are removed.
    self.wait()
    if not self.manager.save(step, args=ocp.args.Composite(**items)):
      raise CheckpointError(f"orbax refused to save step {step} in {self.directory}: its latest step is "
                            f"{self.latest_step()}, and a step is saved only after the latest (is another "
                            "run writing to this folder, or was the run's length changed?)")

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  @contextlib.contextmanager
  def _reading(self, step: int):
    """A failed read of step `step` (a file cut short, missing or unparsable; they reached the user
    as tracebacks) as a CheckpointError naming the step's folder and the underlying error's first
    line. Other exceptions (bugs) keep their tracebacks."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:
      cause = _read_failure(e)
      if cause is None:
        raise
      lines = str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause).strip().splitlines()
      raise CheckpointError(f"cannot read checkpoint {self.step_dir(step)}: "
                            f"{lines[0] if lines else type(cause).__name__}; {_DAMAGED_HINT}") from None

  def meta(self, step: int) -> dict[str, Any]:
    with self._reading(step):
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def check_compatible(self, step: int, meta: dict[str, Any], model_target, accept: bool = False) -> None:
    """Raises CheckpointError, listing every difference, unless the checkpoint at `step` was made
    by a run like `meta` (build.checkpoint_meta) and its variables fit `model_target`. With
    `accept` (config.checkpoint_mismatch='accept') differences in what the run recorded are only
    logged; variables that do not fit stay an error, as they cannot be restored."""
    saved = self.meta(step)
    where = self.step_dir(step)
    settings = differences(saved, meta, RUN_FIELDS)
    match = trees.Match(model_target, self.stored_model(step))
    missing, extra = match.missing, match.unexpected
    shapes = ["{}: checkpoint {}, model {}".format(k, *match.shapes(k)) for k in match.wrong_shape]
    variables = []
    if missing:
      variables.append(f"{len(missing)} variable(s) missing from the checkpoint, e.g. {missing[:3]}")
    if extra:
      variables.append(f"{len(extra)} variable(s) the model lacks, e.g. {extra[:3]}")
    if shapes:
      variables.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
    refuse(f"checkpoint {where} was made by a different model or config", settings, accept, variables,
           "its variables do not fit this model (config.init_from copies those that do)")

  def stored_model(self, step: int) -> dict:
    """The model item's tree as stored: {'params', 'batch_stats'} of array metadata (shape,
    dtype), read without loading the arrays."""
    return _tree_of(self._item_metadata(step, "model"))

  def _item_metadata(self, step: int, item: str):
    with self._reading(step):
      items = self.manager.item_metadata(step)
    if item not in items.keys() or items[item] is None:
      raise CheckpointError(f"cannot read checkpoint {self.step_dir(step)}: its {item!r} item is missing; "
                            f"{_DAMAGED_HINT}")
    return items[item]

  def restore_model(self, step: int, model_target) -> dict:
    """{'params', 'batch_stats'} restored onto the shardings of `model_target` (abstract arrays)."""
    with self._reading(step):
      return self.manager.restore(step, args=ocp.args.Composite(
          model=ocp.args.StandardRestore(model_target))).model

  def restore_training(self, step: int, model_target, opt_target, data_iterator):
    """(model variables, {'step', 'opt_state'}) restored, and the data iterator moved to its
    saved position."""
    where = self.step_dir(step)
    stored, wanted = _leaf_shapes(self._item_metadata(step, "opt")), _leaf_shapes(opt_target)
    if stored != wanted:
      differ = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
      raise CheckpointError(
          f"cannot resume from {where}: its optimizer state does not fit this config's optimizer "
          f"({len(differ)} entries differ, e.g. {differ[:3]}); was config.optim changed (name, "
          f"grad_clip_norm, sam_rho, grad_accum_steps, param_groups, freeze)? config.init_from={where} "
          "starts a fresh optimizer from its weights")
    items = dict(model=ocp.args.StandardRestore(model_target),
                 opt=ocp.args.StandardRestore(opt_target))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      with self._reading(step):
        r = self.manager.restore(step, args=ocp.args.Composite(**items))
    except CheckpointError:
      raise
    except ValueError as e:  # files that read, holding what this config cannot take
      raise CheckpointError(f"cannot resume from {where} (was the optimizer or data config changed?): {e}") from None
    return r.model, r.opt

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._empty_todelete()

  def close(self) -> None:
    self.wait()
    self.manager.close()


# How tensorstore's errors begin when a file of a checkpoint is cut short, missing or corrupt.
_READ_STATUS = re.compile(r"(OUT_OF_RANGE|NOT_FOUND|DATA_LOSS|FAILED_PRECONDITION|INVALID_ARGUMENT|UNKNOWN): ")


def _read_failure(error: Exception) -> BaseException | None:
  """The error under `error` that says a checkpoint's files could not be read, or None: an
  OSError, a JSON file that does not parse, tensorstore's ValueError with a read status (orbax
  wraps it in a bare Exception), orbax's KeyError for a missing item."""
  if type(error) is Exception:
    error = error.__cause__ or error.__context__
  if isinstance(error, (OSError, json.JSONDecodeError)):
    return error
  if isinstance(error, ValueError) and _READ_STATUS.match(str(error)):
    return error
  if isinstance(error, KeyError) and "not found in the checkpoint" in str(error):
    return error
  return None


def differences(saved: dict, expected: dict, fields, against: str = "config") -> list[str]:
  """'field: checkpoint X, config Y' for each of `fields` that the checkpoint's meta records (older
  checkpoints lack some) and `expected` gives otherwise."""
  return [f"{k}: checkpoint {saved[k]!r}, {against} {expected.get(k)!r}" for k in fields
          if k in saved and saved[k] != expected.get(k)]


def refuse(what: str, settings: Sequence[str], accept: bool, fatal: Sequence[str] = (), why_fatal: str = "") -> None:
  """Raises CheckpointError '`what`:' with every difference listed, unless there are only
  `settings` differences and `accept`: then they are logged as a warning. `fatal` ones (`why_fatal`)
  are never accepted."""
  if fatal or (settings and not accept):
    hint = why_fatal if fatal else _ACCEPT_HINT
    raise CheckpointError(f"{what}:\n  " + "\n  ".join([*settings, *fatal]) + f"\n{hint}")
  if settings:
    logging.warning("%s (accepted, config.checkpoint_mismatch='accept'):\n  %s", what, "\n  ".join(settings))


def check_same_outputs(runs: list[tuple[str, int]], class_names, accept: bool = False) -> None:
  """Checkpoints whose predictions are averaged, and written under `class_names` (None: the
  first checkpoint's), must predict the same task and the same classes in the same order."""
  metas = []
  for path, step in runs:
    directory, [step] = find_steps(path, step)
    ckpts = Checkpoints(directory, create=False)
    metas.append((os.path.join(directory, str(step)), ckpts.meta(step)))
    ckpts.close()
  first = metas[0][1]
  expected = {k: first.get(k) for k in OUTPUT_FIELDS}
  if class_names is not None:
    expected["class_names"] = list(class_names)
  against = "data" if class_names is not None else "first checkpoint"
  diffs = [f"{where}: {d}" for where, meta in metas for d in differences(meta, expected, OUTPUT_FIELDS, against)]
  refuse(f"checkpoints whose predictions are averaged must predict the task, outputs and classes (in "
         f"order) of the {against}", diffs, accept)


def _tree_of(metadata) -> dict:
  tree = getattr(metadata, "tree", metadata)
  return dict(tree)


def _leaf_shapes(tree) -> dict[str, tuple]:
  """{'opt_state/0/mu/head/fc/kernel': shape} of a pytree, or of orbax's metadata of a stored one
  (where its named tuples are dicts and its tuples lists) alike."""
  def name(key) -> str:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  leaves = jax.tree_util.tree_flatten_with_path(_tree_of(tree))[0]
  return {"/".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


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
