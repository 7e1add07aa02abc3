"""The train state, and the train and eval steps compiled once over the device mesh."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from cxflax import parallel
from cxflax.models import xla_cpu
from cxflax.models.fold import apply_folded, fold_batchnorm
from cxflax.train.losses import compute_loss, prediction
from cxflax.train.tasks import Task


class TrainState(train_state.TrainState):
  """flax's TrainState plus BatchNorm running statistics."""
  batch_stats: Any = None


def init_variables(model: nn.Module, image_shape, seed: int) -> dict:
  """The model's variables, initialised on a dummy batch of one image."""
  @jax.jit
  def init():
    return model.init({"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)},
                      jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  return init()


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, variables: dict,
                       mesh, step: int = 0) -> TrainState:
  """A fresh optimizer state for `variables`, at global step `step` (a later training stage
  starts where the previous one ended), replicated over the mesh. Every TrainState is made here."""
  params = variables["params"]
  state = TrainState(step=np.int32(step), apply_fn=model.apply, params=params, tx=tx,
                     opt_state=tx.init(params), batch_stats=variables.get("batch_stats", {}))
  return parallel.replicate(state, mesh)


def all_finite(tree) -> jax.Array:
  """True if every floating-point value of `tree` is finite (integer counters are by
  construction, and random keys have no such test). One reduction over all values: one per
  array doubled the compile time of resnet18's train step (benchmarks/NOTES.md §16)."""
  values = [jnp.ravel(x) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.isfinite(jnp.concatenate(values))) if values else jnp.bool_(True)


def make_train_step(model: nn.Module, config, mesh, class_alpha=None) -> Callable:
  """jit(state, batch) → (state, metrics): one optimizer step on a global batch split over 'data'.

  The state is donated (updated in place) and replicated; XLA all-reduces the gradients, and
  BatchNorm statistics come from the global batch. With SAM (config.optim.sam_rho > 0), the gradient
  at the adversarially perturbed parameters drives the update, while the BatchNorm running
  statistics are those of the clean forward pass; with config.optim.sam_per_device each device
  perturbs with its own gradient (the m-sharpness of the original SAM) and the perturbed
  gradients are averaged.
  """
  base_rng = jax.random.key(config.seed)
  sam_rho, sam_per_device = config.optim.sam_rho, config.optim.sam_per_device
  rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)

  def loss_and_stats(params, batch_stats, batch, rng):
    outputs, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                   train=True, mutable=["batch_stats"],
                                   rngs={"dropout": rng, "patches": jax.random.fold_in(rng, 1)})
    return compute_loss(config.loss, outputs, batch["label"], class_alpha=class_alpha), updates

  grad_fn = jax.value_and_grad(loss_and_stats, has_aux=True)

  def per_device_sam_grads(params, batch_stats, batch, rng):
    """SAM with each device's own ascent direction (inside shard_map over 'data')."""
    def local(params, batch_stats, batch, rng):
      (_, _), g = grad_fn(params, batch_stats, batch, rng)
      norm = optax.tree.norm(g)
      eps = jax.tree.map(lambda x: sam_rho * x / (norm + 1e-12), g)
      perturbed = jax.tree.map(jnp.add, params, eps)
      (_, _), g_adv = grad_fn(perturbed, batch_stats, batch, rng)
      return jax.lax.pmean(g_adv, parallel.DATA_AXIS)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(parallel.DATA_AXIS), P()),
                         out_specs=P(), check_vma=False)(params, batch_stats, batch, rng)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    (loss, updates), grads = grad_fn(state.params, state.batch_stats, batch, rng)
    if sam_rho and sam_per_device:
      grads = per_device_sam_grads(state.params, state.batch_stats, batch, rng)
      opt_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    elif sam_rho:
      adversarial = lambda p, _: grad_fn(p, state.batch_stats, batch, rng)[1]
      opt_updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                               grad_fn=adversarial)
    else:
      opt_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    new_params = optax.apply_updates(state.params, opt_updates)
    # A non-finite loss or gradient, or an update that overflows the parameters, optimizer state
    # or BatchNorm statistics (a finite gradient times a huge rate), leaves all three as they
    # were (only the step advances) and says so in 'finite'; the loop stops the run, or counts
    # the skip (config.on_nonfinite), without a host sync per step.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & all_finite((new_params, opt_state, updates["batch_stats"])))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(step=state.step + 1,
                              params=keep(new_params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              batch_stats=keep(updates["batch_stats"], state.batch_stats))
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}

  return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,),
                 compiler_options=xla_cpu.compiler_options())


class EvalStep:
  """The compiled eval step: `step.prepare(variables, image_shape)` once per evaluation, then
  `step(prepared, batch)` for each batch → {'pred', 'label', 'index', 'valid'} split over 'data';
  `step.outputs(variables, batches, mesh)` does both over a whole evaluation.

  'pred' and 'label' are the task's (Task.eval_outputs: the regressed value, the class
  probabilities, the embedding, or per-image pixel counts); with_masks adds 'mask', the predicted
  class of every pixel, and 'source_size', the (H, W) of each image as stored, which the mask is
  written back at. 'index' and 'valid' pass through so that gathering them keeps every
  prediction beside its own label, on any number of processes.

  With fold_bn, prepare folds every BatchNorm that follows a convolution into it
  (cxflax.models.fold: the same function, less work per activation). The fold runs once, in its
  own compiled function: folded inside the step, the rescaled kernels were recomputed for every
  batch and fused into the convolutions, and the step measured no faster than unfolded
  (benchmarks/NOTES.md §7).
  """

  def __init__(self, model: nn.Module, task: Task, mesh, with_masks: bool = False, fold_bn: bool = True):
    self.model, self.fold_bn = model, fold_bn
    self._rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
    self._folds: dict[tuple, Callable] = {}
    apply = apply_folded if fold_bn else lambda m, v, x: m.apply(v, x, train=False)

    def step(variables, batch):
      out = prediction(apply(model, variables, batch["image"]))
      result = dict(task.eval_outputs(out, batch), index=batch["index"], valid=batch["valid"])
      if with_masks:
        result["mask"] = jnp.argmax(out, -1).astype(jnp.uint8)
        result["source_size"] = batch["source_size"]
      return result

    self._step = jax.jit(step, in_shardings=(self._rep, data), out_shardings=data,
                         compiler_options=xla_cpu.compiler_options())

  def prepare(self, variables: dict, image_shape) -> dict:
    """The variables the step takes: folded (see class doc) for images of `image_shape`
    (H, W, C), or unchanged without fold_bn."""
    if not self.fold_bn:
      return variables
    key = tuple(image_shape)
    if key not in self._folds:
      image = jax.ShapeDtypeStruct((1,) + key, jnp.float32)
      self._folds[key] = jax.jit(lambda v: fold_batchnorm(self.model, v, image), out_shardings=self._rep)
    return self._folds[key](variables)

  def __call__(self, prepared: dict, batch: dict) -> dict:
    return self._step(prepared, batch)

  def outputs(self, variables: dict, batches, mesh) -> Iterator[dict]:
    """The step's output for each host batch of `batches` (numpy, this process's part), the
    variables prepared once, for the first batch's image shape (evaluation batches share one)."""
    prepared = None
    for batch in batches:
      if prepared is None:
        prepared = self.prepare(variables, batch["image"].shape[1:])
      yield self._step(prepared, parallel.shard_batch(batch, mesh))

  def lower(self, prepared: dict, batch: dict):
    return self._step.lower(prepared, batch)


def make_eval_step(model: nn.Module, task: Task, mesh, with_masks: bool = False,
                   fold_bn: bool = True) -> EvalStep:
  """See EvalStep."""
  return EvalStep(model, task, mesh, with_masks, fold_bn)
