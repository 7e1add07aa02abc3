"""Learning-rate schedules and optimizers built from the config, as optax transformations.

Schedules follow the papers' PyTorch schedulers: linear warm-up then cosine decay (seed 001),
cosine annealing with period T_max and its warm-restart variant (seed 000's CosineAnnealingLR /
CosineAnnealingWarmRestarts), step decay (seed 004's StepLR), constant, and fastai v1's
one-cycle policy (seed 002's fit_one_cycle). With
config.schedule.unit='epoch' the rate changes once per epoch, as a scheduler stepped per epoch does.

Parameters can be split into groups by regular expressions on their paths ('backbone/layer4_2/
conv3/kernel'), each group with its own learning rate (seed 002's discriminative rates, spread
geometrically from the first group's to the last's as fastai does), and groups can be frozen
(no updates; BatchNorm affine parameters stay trainable by default, as in fastai). SAM (seed 001)
wraps the whole optimizer (optax.contrib.sam in opaque mode, see steps.py).

Schedules count optimizer updates. With gradient accumulation (config.optim.grad_accum_steps = k)
an update takes k batches, and the last update of each epoch takes the batches left over, as the
authors' Lightning loop does; training_optimizer builds the schedule over the updates of an epoch
so that periods given in epochs stay epochs.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from cxflax.errors import ConfigError
from cxflax.registry import Registry

FROZEN = "frozen"


# config.schedule.name → fn(config.schedule, lr, total_steps, epoch_steps) → schedule of the step
# count (float32), torch's schedulers' arithmetic; `fields`: the config.schedule fields it reads
# (those in epochs end in _epochs).
SCHEDULES: Registry[Callable[..., optax.Schedule]] = Registry("schedule", ConfigError, "config.schedule.name")


def make_schedule(s, lr: float, num_epochs: float, steps_per_epoch: int) -> optax.Schedule:
  """The schedule `s` (config.schedule) over num_epochs epochs of steps_per_epoch steps, peaking
  at lr."""
  total = max(1, int(math.ceil(num_epochs * steps_per_epoch)))
  epoch_steps = max(1, steps_per_epoch)
  fn = SCHEDULES.get(s.name)(s, lr, total, epoch_steps)
  if s.unit == "epoch":
    return lambda t: fn(jnp.floor(jnp.asarray(t, jnp.float32) / epoch_steps) * epoch_steps)
  if s.unit != "step":
    raise ConfigError(f"config.schedule.unit must be 'step' or 'epoch', got {s.unit!r}")
  return lambda t: fn(jnp.asarray(t, jnp.float32))


@SCHEDULES.register("constant", fields=())
def _constant(s, lr, total, epoch_steps):
  return lambda t: jnp.full((), lr, jnp.float32)


@SCHEDULES.register("warmup_cosine", fields=("warmup_epochs", "min_learning_rate"))
def _warmup_cosine(s, lr, total, epoch_steps):
  warmup = int(s.warmup_epochs * epoch_steps)
  if warmup >= total:
    raise ConfigError(f"config.schedule.warmup_epochs ({s.warmup_epochs}) must be shorter than "
                      f"num_epochs ({total / epoch_steps:g})")
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=s.min_learning_rate)


@SCHEDULES.register("one_cycle", fields=("pct_start", "div_factor", "final_div_factor"))
def _one_cycle(s, lr, total, epoch_steps):
  """fastai v1's fit_one_cycle (OneCycleScheduler): the first int(pct_start · total) steps rise
  from lr / div_factor to lr by a half cosine, the rest fall by a half cosine towards
  lr / (div_factor · final_div_factor), each step taking the value at its own position (the
  last step stops one step short of the floor, as fastai's scheduler does)."""
  for name, ok in (("pct_start", 0 < s.pct_start < 1), ("div_factor", s.div_factor > 0),
                   ("final_div_factor", s.final_div_factor > 0)):
    if not ok:
      raise ConfigError(f"config.schedule.{name} must be {'in (0, 1)' if name == 'pct_start' else '> 0'} "
                        f"for schedule 'one_cycle', got {s[name]}")
  up = int(total * s.pct_start)
  down = total - up
  low, floor = lr / s.div_factor, lr / (s.div_factor * s.final_div_factor)

  def cos(start, end, pct):  # fastai's annealing_cos
    return end + (start - end) / 2 * (1 + jnp.cos(jnp.pi * pct))

  def fn(t):
    rising = cos(low, lr, t / max(up, 1))
    falling = cos(lr, floor, jnp.minimum(t - up, down) / down)
    return jnp.where(t < up, rising, falling)
  return fn


def _period(s, total, epoch_steps):
  """cosine's T_max and cosine_restarts' T_0 in steps: config.schedule.period_epochs, or the run."""
  return (s.period_epochs * epoch_steps) if s.period_epochs else total


@SCHEDULES.register("cosine", fields=("period_epochs", "min_learning_rate"))
def _cosine(s, lr, total, epoch_steps):
  """torch's CosineAnnealingLR: periodic beyond T_max."""
  period, min_lr = _period(s, total, epoch_steps), s.min_learning_rate
  return lambda t: min_lr + (lr - min_lr) * 0.5 * (1 + jnp.cos(jnp.pi * t / period))


@SCHEDULES.register("cosine_restarts", fields=("period_epochs", "restart_mult", "min_learning_rate"))
def _cosine_restarts(s, lr, total, epoch_steps):
  """torch's CosineAnnealingWarmRestarts(T_0, T_mult)."""
  t0 = _period(s, total, epoch_steps)
  return lambda t: _restarts(t, t0, s.restart_mult, lr, s.min_learning_rate)


@SCHEDULES.register("step", fields=("step_decay_epochs", "step_decay_factor"))
def _step(s, lr, total, epoch_steps):
  """torch's StepLR."""
  if s.step_decay_epochs <= 0:
    raise ConfigError("schedule 'step' needs config.schedule.step_decay_epochs > 0")
  every = s.step_decay_epochs * epoch_steps
  return lambda t: lr * s.step_decay_factor ** jnp.floor(t / every)


def _restarts(t, t0: float, mult: int, lr: float, min_lr: float):
  if mult == 1:
    t_cur, t_i = jnp.mod(t, t0), t0
  else:  # cycle n spans t0 · mult^n steps
    n = jnp.floor(jnp.log1p(t / t0 * (mult - 1)) / math.log(mult))
    t_cur = t - t0 * (mult ** n - 1) / (mult - 1)
    t_i = t0 * mult ** n
  return min_lr + (lr - min_lr) * 0.5 * (1 + jnp.cos(jnp.pi * t_cur / t_i))


def group_learning_rates(optim) -> list[float]:
  """The learning rate of each parameter group (optim: config.optim): geometrically spread over
  group_lr_range (fastai's slice(lo, hi)), or optim.learning_rate for all."""
  n = max(1, len(optim.param_groups))
  if not optim.group_lr_range:
    return [optim.learning_rate] * n
  lo, hi = optim.group_lr_range
  if not 0 < lo <= hi:
    raise ConfigError(f"config.optim.group_lr_range must be (low, high) with 0 < low <= high, got "
                      f"{optim.group_lr_range}")
  return [float(v) for v in np.geomspace(lo, hi, n)] if n > 1 else [hi]


def param_labels(optim, params) -> dict:
  """'groupK' or 'frozen' for every parameter, by config.optim's param_groups / freeze."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  bn_modules = {k.rsplit("/", 1)[0] for k in flat if k.endswith("/scale")}
  freeze = [re.compile(p) for p in optim.freeze]
  groups = [re.compile(p) for p in optim.param_groups]
  labels = {}
  for path in flat:
    is_bn = path.rsplit("/", 1)[0] in bn_modules
    if any(f.search(path) for f in freeze) and not (is_bn and optim.train_frozen_bn):
      labels[path] = FROZEN
      continue
    if not groups:
      labels[path] = "group0"
      continue
    match = next((i for i, g in enumerate(groups) if g.search(path)), None)
    if match is None:
      raise ConfigError(f"parameter {path} matches none of config.optim.param_groups "
                        f"{list(optim.param_groups)}")
    labels[path] = f"group{match}"
  if all(v == FROZEN for v in labels.values()):
    raise ConfigError(f"config.optim.freeze {list(optim.freeze)} freezes every parameter")
  return traverse_util.unflatten_dict(labels, sep="/")


# config.optim.name → fn(config.optim, schedule) → the optax optimizer, with PyTorch's semantics:
# SGD's and Adam's weight decay are L2 terms added to the gradient (torch.optim.SGD / Adam),
# AdamW's is decoupled. `fields`: the config.optim fields it reads; `weight_decay`: how it is applied.
OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry(
    "optimizer", ConfigError, "config.optim.name")


def _with_l2(o, opt: optax.GradientTransformation) -> optax.GradientTransformation:
  wd = o.weight_decay
  return optax.chain(optax.add_decayed_weights(wd), opt) if wd else opt


@OPTIMIZERS.register("sgd", fields=("momentum", "nesterov", "weight_decay"),
                      weight_decay="L2 term added to the gradient (torch.optim.SGD)")
def _sgd(o, schedule):
  return _with_l2(o, optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))


@OPTIMIZERS.register("adam", fields=("b1", "b2", "eps", "weight_decay"),
                      weight_decay="L2 term added to the gradient (torch.optim.Adam)")
def _adam(o, schedule):
  return _with_l2(o, optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps))


@OPTIMIZERS.register("adamw", fields=("b1", "b2", "eps", "weight_decay"),
                      weight_decay="decoupled from the gradient (torch.optim.AdamW)")
def _adamw(o, schedule):
  return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)


def updates_per_epoch(steps_per_epoch: int, accum: int) -> int:
  """Optimizer updates in an epoch of steps_per_epoch batches accumulated `accum` at a time: the
  epoch's last update takes the batches left over (the authors' Lightning loop steps when
  (i + 1) % accum == 0 or at the loader's last batch)."""
  return -(-max(1, steps_per_epoch) // accum)


def _epoch_aligned_accumulation(steps_per_epoch: int, accum: int) -> Callable:
  """MultiSteps' every_k_schedule (batches to accumulate for update number g) that ends every
  epoch with an update: `accum` batches, and the remainder for the epoch's last update."""
  per_epoch = updates_per_epoch(steps_per_epoch, accum)
  last = steps_per_epoch - (per_epoch - 1) * accum
  return lambda g: jnp.where(g % per_epoch == per_epoch - 1, last, accum)


def update_index(step: int, steps_per_epoch: int, accum: int) -> int:
  """The number of optimizer updates before the one that batch `step` (0-based, counted from the
  optimizer's start) feeds: the step count its schedule is evaluated at."""
  epoch, j = divmod(step, max(1, steps_per_epoch))
  return epoch * updates_per_epoch(steps_per_epoch, accum) + j // accum


def training_optimizer(config, params, steps_per_epoch: int
                       ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
  """The optimizer of a training run (config: a finalized stage config) whose epochs have
  steps_per_epoch batches, and rate_at(step): the head group's learning rate that batch `step`
  (0-based, from the optimizer's start) is applied with.

  With config.optim.grad_accum_steps = k, optax.MultiSteps feeds the inner optimizer, and with it
  the schedule, one count per update, not per batch; so the schedule is built over
  updates_per_epoch updates per epoch, which keeps cosine's T_max and warm restarts' T_0 in
  epochs, and accumulation restarts at every epoch's start."""
  k = config.optim.grad_accum_steps
  tx, schedule = make_optimizer(config.optim, params, functools.partial(
      make_schedule, config.schedule, num_epochs=config.num_epochs,
      steps_per_epoch=updates_per_epoch(steps_per_epoch, k)), steps_per_epoch=steps_per_epoch)
  return tx, lambda step: float(schedule(update_index(step, steps_per_epoch, k)))


def make_optimizer(o, params, schedule_of: Callable[[float], optax.Schedule],
                   steps_per_epoch: int | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule of the last — usually the head's — group) for `params`, by `o`
  (config.optim); schedule_of(lr) is the schedule of a group whose rate is lr (make_schedule
  with the run's config.schedule, or the LR range test's sweep), evaluated at the number of
  updates so far. With gradient accumulation and steps_per_epoch (batches per epoch), every
  epoch ends with an update (see training_optimizer); without it, updates come every
  grad_accum_steps batches regardless of epochs."""
  schedules = [schedule_of(lr) for lr in group_learning_rates(o)]
  labels = param_labels(o, params)
  used = set(jax.tree.leaves(labels))
  transforms = {f"group{i}": OPTIMIZERS.get(o.name)(o, s) for i, s in enumerate(schedules)
                if f"group{i}" in used}
  if FROZEN in used:
    transforms[FROZEN] = optax.set_to_zero()
  tx = transforms["group0"] if set(transforms) == {"group0"} else optax.multi_transform(transforms, labels)
  if o.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  if o.sam_rho and not o.sam_per_device:
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(o.sam_rho))
    tx = optax.contrib.sam(tx, adversary, sync_period=2, opaque_mode=True)
  if o.grad_accum_steps > 1:
    if o.sam_rho:
      raise ConfigError("gradient accumulation with SAM is not supported")
    every_k = (_epoch_aligned_accumulation(steps_per_epoch, o.grad_accum_steps) if steps_per_epoch
               else o.grad_accum_steps)
    tx = optax.MultiSteps(tx, every_k_schedule=every_k)
  return tx, schedules[-1]
