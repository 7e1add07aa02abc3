"""Learning-rate schedules and optimizers built from the config, as optax transformations."""

from __future__ import annotations

import optax

from cxflax.errors import ConfigError

SCHEDULES = ("constant", "cosine", "warmup_cosine")
OPTIMIZERS = ("sgd", "adam", "adamw")


def make_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """config.schedule over config.num_epochs epochs of steps_per_epoch steps."""
  total = max(1, int(config.num_epochs * steps_per_epoch))
  lr = config.learning_rate
  if config.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, total)
  if config.schedule == "warmup_cosine":
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if warmup >= total:
      raise ConfigError(f"warmup_epochs ({config.warmup_epochs}) must be shorter than num_epochs "
                        f"({config.num_epochs})")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.0)
  raise ConfigError(f"unknown schedule {config.schedule!r}; use one of {', '.join(SCHEDULES)}")


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """config.optimizer with PyTorch's semantics: SGD's and Adam's weight decay are L2 terms added
  to the gradient (torch.optim.SGD / Adam), AdamW's is decoupled."""
  name, wd = config.optimizer, config.weight_decay
  if name == "sgd":
    opt = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
  elif name == "adam":
    opt = optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
  elif name == "adamw":
    return _clip(config, optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                                     eps=config.adam_eps, weight_decay=wd))
  else:
    raise ConfigError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
  if wd:
    opt = optax.chain(optax.add_decayed_weights(wd), opt)
  return _clip(config, opt)


def _clip(config, opt):
  if config.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
  return opt
