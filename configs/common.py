"""What the recipes share: reading the config argument (`--config=configs/X.py:a,b`), naming a
departure from the paper, and the ImageNet weights the papers start from."""

from __future__ import annotations

from typing import Sequence

from cxflax.errors import ConfigError


def parse_arg(arg: str | None, flags: Sequence[str] = (), choices: Sequence[str] = (),
              default: str | None = None) -> tuple[str | None, set[str]]:
  """(choice, flags) of a comma-separated config argument: at most one word of `choices`
  (`default` when none is given) and any of `flags`. Any other word, or two choices, raises a
  ConfigError (a ValueError; ml_collections reports it as the --config error) that lists every
  word the recipe takes and says how to choose a model it does not list."""
  words = [w.strip() for w in (arg or "").split(",") if w.strip()]
  unknown = sorted(set(words) - set(flags) - set(choices))
  picked = [w for w in words if w in choices]
  takes = ([f"one of {', '.join(choices)}"] if choices else []) + ([f"any of {', '.join(flags)}"] if flags else [])
  # An argument is often a model name the recipe does not list (sensemble.py:resnet18): any model
  # runs by overriding the field, so the message says how.
  hint = "; for a model it does not list, add --config.model=NAME"
  if unknown:
    raise ConfigError(f"unknown config argument(s) {unknown}; this recipe takes "
                      f"{' and '.join(takes) or 'no argument'}{hint}")
  if len(picked) > 1:
    raise ConfigError(f"config argument {arg!r}: give one of {', '.join(choices)}, not {picked}")
  return (picked[0] if picked else default), set(words) - set(picked)


def depart(config, path: str, reason: str) -> None:
  """Records that `path` (a field path, e.g. 'optim.weight_decay') knowingly differs from the
  paper, and why; the recipe's docstring names the path in backticks."""
  config.departures = tuple(config.departures) + ((path, reason),)


def imagenet_weights(model: str, tag: str) -> str:
  """timm's pretrained weights `model.tag` by their Hugging Face name, as config.init_from takes
  it ('timm/resnest50d.in1k'; fetched into the Hugging Face cache on first use). The tag picks
  the weights the paper's authors used: 'tv_in1k' for torchvision's, timm's default otherwise."""
  return f"timm/{model}.{tag}"
