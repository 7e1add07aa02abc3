"""Converts a timm checkpoint into an orbax checkpoint that training configs can start from.

    python -m cxflax.convert --model resnest50d --checkpoint resnest50d.pth --out /ckpt/resnest50d
    python -m cxflax.main --config=configs/resnest.py --config.init_from=/ckpt/resnest50d ...

The output folder holds 'variables' (an orbax checkpoint of {'params', 'batch_stats'} of
create_model(model, num_classes)) and 'cxflax_convert.json' (the model name and source).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from cxflax.errors import CheckpointError
from cxflax.models import list_models
from cxflax.models.timm_weights import load_timm_weights

META = "cxflax_convert.json"


def save_converted(out: str, model: str, variables: dict, source: str = "") -> None:
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(out, "variables"), variables, force=True)
  with open(os.path.join(out, META), "w") as f:
    json.dump({"model": model, "source": source}, f, indent=2)


def load_converted(path: str, expected_model: str | None = None) -> dict:
  """The variables of a converted checkpoint (numpy), after checking what model they are for."""
  path = os.path.abspath(path)
  meta_path = os.path.join(path, META)
  if not os.path.isfile(meta_path):
    raise CheckpointError(f"{path} is not a checkpoint written by python -m cxflax.convert "
                          f"(no {META})")
  with open(meta_path) as f:
    meta = json.load(f)
  if expected_model and meta["model"] != expected_model:
    raise CheckpointError(f"{path} holds weights of {meta['model']!r}, but the config's model is "
                          f"{expected_model!r}")
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(os.path.join(path, "variables"))
  return jax.tree.map(np.asarray, restored)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m cxflax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="timm model name, e.g. resnest50d")
  parser.add_argument("--checkpoint", required=True, help=".pth, .pt, .bin or .safetensors file")
  parser.add_argument("--out", required=True, help="folder to write")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="classifier size (default: the checkpoint's; a new size re-initialises it)")
  args = parser.parse_args(argv)
  if args.model not in list_models():
    parser.error(f"unknown model {args.model!r}; known models: {', '.join(list_models())}")
  try:
    variables = load_timm_weights(args.model, args.checkpoint, num_classes=args.num_classes)
  except CheckpointError as e:
    parser.exit(2, f"error: {e}\n")
  save_converted(args.out, args.model, variables, source=os.path.abspath(args.checkpoint))
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables))
  print(f"wrote {args.model} ({count:,} values) to {os.path.abspath(args.out)}")


if __name__ == "__main__":
  main()
