"""How the train step is sharded over 1, 2, 4, 8 devices, read from the compiled HLO.

    python -m benchmarks.scaling [--models resnet50 resnest50d] [--devices 1 2 4 8] [--batch 32]
        [--image_size 224] [--out FILE]

On a CPU-only machine the devices are simulated (the script sets
XLA_FLAGS=--xla_force_host_platform_device_count to the largest count before jax starts). For
each device count the train step is compiled exactly as training compiles it and its optimised
HLO is inspected:

  per_device_batch  the entry computation takes images of batch/n (the global batch is split,
                    not replicated);
  flops_ratio       XLA's FLOP count per device × n against the 1-device step's (≈ 1: no device
                    repeats another's work);
  all_reduce_*      all-reduce operations and the bytes they carry per step, against the bytes
                    of the parameters (one gradient all-reduce ≈ the parameter bytes, plus
                    BatchNorm's batch statistics and the loss).

Prints a table and writes JSON; benchmarks/NOTES.md turns the figures into an 8-GPU estimate.
"""

from __future__ import annotations

import argparse
import os
import re
import sys


def _parse():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", nargs="+", default=["resnet50", "resnest50d"])
  ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  ap.add_argument("--batch", type=int, default=32, help="global batch")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--out", default=None)
  return ap.parse_args()


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "pred": 1, "u8": 1, "s8": 1}
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|f64|s64|pred|u8|s8)\[([0-9,]*)\]")


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


def all_reduces(hlo: str) -> tuple[int, int]:
  """(number of all-reduce ops, bytes they produce) in optimised HLO text."""
  count, size = 0, 0
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+ = (.+?) all-reduce(?:-start)?\(", line)
    if m:
      count += 1
      size += _shape_bytes(m.group(1))
  return count, size


def entry_batch_dims(hlo: str, size: int) -> set[int]:
  """Leading dimensions of the entry computation's image parameters (…, size, size, 3)."""
  entry = hlo[hlo.index("ENTRY"):].split("\n", 1)[0]
  return {int(b) for b in re.findall(rf"f32\[(\d+),{size},{size},3\]", entry)}


def measure(name: str, n: int, batch: int, size: int) -> dict:
  import jax
  import numpy as np
  import optax

  from cxflax import parallel
  from cxflax.config import base_config, finalize
  from cxflax.models.heads import create_network
  from cxflax.train import optim
  from cxflax.train.steps import create_train_state, init_variables, make_train_step

  c = base_config()
  c.model, c.batch_size, c.eval_batch_size, c.data.image_size = name, batch, batch, size
  c.loss.name, c.optim.name, c.schedule.name = "cross_entropy", "sgd", "constant"
  c = finalize(c)
  mesh = parallel.make_mesh(jax.devices()[:n])
  model = create_network(name, "linear", 1000)
  variables = init_variables(model, (size, size, 3), 0)
  tx, _ = optim.make_optimizer(c.optim, variables["params"], optax.constant_schedule)
  state = create_train_state(model, tx, variables, mesh)
  data = parallel.shard_batch({"image": np.zeros((batch, size, size, 3), np.float32),
                               "label": np.zeros(batch, np.int32)}, mesh)
  compiled = make_train_step(model, c, mesh).lower(state, data).compile()
  hlo = compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ops, reduce_bytes = all_reduces(hlo)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(variables["params"]))
  dims = entry_batch_dims(hlo, size)
  return {"model": name, "devices": n, "global_batch": batch, "hlo_image_batch": sorted(dims),
          "per_device_batch": dims == {batch // n}, "flops_per_device": float(cost["flops"]),
          "flops_per_image": float(cost["flops"]) * n / batch, "all_reduce_ops": ops,
          "all_reduce_mb": reduce_bytes / 2 ** 20, "param_mb": param_bytes / 2 ** 20,
          "all_reduce_over_params": reduce_bytes / param_bytes if ops else 0.0}


def main():
  args = _parse()
  flags = os.environ.get("XLA_FLAGS", "")
  if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(args.devices)}".strip()
  import jax
  from benchmarks.common import default_out, print_table, write_json

  if max(args.devices) > jax.device_count():
    raise SystemExit(f"{max(args.devices)} devices asked for, {jax.device_count()} available")
  rows = []
  for name in args.models:
    base_flops = None
    for n in args.devices:
      if args.batch % n:
        raise SystemExit(f"--batch {args.batch} must divide among {n} devices")
      row = measure(name, n, args.batch, args.image_size)
      base_flops = base_flops or row["flops_per_device"] * n
      row["flops_ratio"] = row["flops_per_device"] * n / base_flops
      rows.append(row)
      print(f"{name} on {n} device(s): per-device batch {row['hlo_image_batch']}, "
            f"{row['all_reduce_ops']} all-reduce(s) of {row['all_reduce_mb']:.1f} MB "
            f"(parameters {row['param_mb']:.1f} MB), flops x n / 1-device {row['flops_ratio']:.3f}", flush=True)
  path = write_json(args.out or default_out("scaling"), "scaling", rows, image_size=args.image_size,
                    platform=jax.devices()[0].platform)
  print(f"\nresults in {path}")
  print_table(rows, ["model", "devices", "hlo_image_batch", "per_device_batch", "flops_per_image",
                     "flops_ratio", "all_reduce_ops", "all_reduce_mb", "param_mb"])


if __name__ == "__main__":
  main()
