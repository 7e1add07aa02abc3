"""The train state, and the train and eval steps compiled once over the device mesh."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from cxflax import parallel
from cxflax.train.losses import compute_loss


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
                       mesh) -> TrainState:
  """A TrainState replicated over the mesh."""
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables.get("batch_stats", {}))
  return parallel.replicate(state, mesh)


def make_train_step(model: nn.Module, config, mesh) -> Callable:
  """jit(state, batch) → (state, metrics): one SGD step on a global batch split over 'data'.

  The state is donated (updated in place) and replicated; XLA all-reduces the gradients.
  """
  base_rng = jax.random.key(config.seed)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)

    def loss_fn(params):
      outputs, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
          mutable=["batch_stats"], rngs={"dropout": rng})
      return compute_loss(config, outputs, batch["label"]), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

  rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,))


def make_eval_step(model: nn.Module, task: str, mesh) -> Callable:
  """jit(variables, batch) → {'pred', 'label', 'index', 'valid'} split over 'data'.

  'pred' is the regressed value or the class probabilities; the other fields pass through so
  that gathering them keeps every prediction beside its own label, on any number of processes.
  """
  def step(variables, batch):
    outputs = model.apply(variables, batch["image"], train=False)
    pred = outputs[..., 0] if task == "regression" else jax.nn.softmax(outputs, axis=-1)
    return {"pred": pred, "label": batch["label"], "index": batch["index"], "valid": batch["valid"]}

  rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=data)
