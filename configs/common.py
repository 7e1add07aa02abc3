"""What the recipes share: reading the config argument (`--config=configs/X.py:a,b`), naming a
departure from the paper, and the ImageNet weights the papers start from."""

from __future__ import annotations

from typing import Sequence


def parse_arg(arg: str | None, flags: Sequence[str] = (), choices: Sequence[str] = (),
              default: str | None = None) -> tuple[str | None, set[str]]:
  """(choice, flags) of a comma-separated config argument: at most one word of `choices`
  (`default` when none is given) and any of `flags`. Any other word, or two choices, raises
  ValueError naming what the recipe takes (ml_collections reports it as the --config error)."""
  words = [w.strip() for w in (arg or "").split(",") if w.strip()]
  unknown = sorted(set(words) - set(flags) - set(choices))
  picked = [w for w in words if w in choices]
  if unknown:
    takes = [f"one of {', '.join(choices)}"] if choices else []
    takes += [", ".join(flags)] if flags else []
    raise ValueError(f"unknown config argument(s) {unknown}; this recipe takes "
                     f"{' and '.join(takes) or 'no argument'}")
  if len(picked) > 1:
    raise ValueError(f"config argument {arg!r}: give one of {', '.join(choices)}, not {picked}")
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
