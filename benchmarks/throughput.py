"""Train and eval throughput of cxflax's models beside timm's in PyTorch, measured in one run.

    python -m benchmarks.throughput [--models resnet50 resnest50d] [--batch 16] [--image_size 224]
        [--dtype float32] [--devices N] [--repeats 3] [--no_torch] [--cpu_kernels auto] [--out FILE]

For each model, cxflax's jitted steps over a mesh of `--devices` devices (default: all; the
global batch is split over them, exactly as training runs): the train step (SGD, cross-entropy,
1000 classes) plain and with SAM (two forward/backward passes), the eval step (BatchNorm folded
into the convolutions, as evaluation runs, and unfolded for comparison), each as global and
per-device images/s, each step's compile time, XLA's FLOP count of the step (cost analysis of
its lowering, over the global batch) and the FLOP/s it achieves, and that as a fraction of the
matrix-product ceiling in the same dtype measured in the same run on the same devices (MFU).
Memory is XLA's compiled footprint (arguments + outputs + temporaries, per device), and on GPUs
the device's peak bytes in use. timm's model in PyTorch (train step with SGD; eval under
no_grad) is timed in the same run, in a fresh process per model (benchmarks/timm_torch.py): on
the CPU on the whole batch (CPU threads = all cores), beside the global rate; on GPUs on one GPU
with one device's share of the batch, beside the per-device rate, under torch.autocast and
channels_last in bfloat16; with the ratio cxflax / PyTorch and timm's MFU from the same FLOP
count. `--cpu_kernels` selects cxflax's kernels for XLA's CPU backend as config.cpu_kernels does
(cxflax.models.xla_cpu). Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import default_out, print_table, time_alternately, time_call, write_json
from benchmarks.timm_torch import torch_rates
from cxflax import parallel
from cxflax.config import base_config, finalize
from cxflax.models import xla_cpu
from cxflax.models.heads import create_network
from cxflax.train import optim
from cxflax.train.steps import create_train_state, init_variables, make_eval_step, make_train_step
from cxflax.train.tasks import TASKS


def matmul_ceiling(devices, n: int = 2048, dtype=jnp.float32) -> float:
  """FLOP/s of an n×n×n product on each device at once (the sum over devices), best of 9. On
  random numbers: a GPU's rate depends on the data (an 8192³ bf16 product on an H200 was reported
  at 894 TFLOP/s on zeros against 788 on random numbers)."""
  mesh = parallel.make_mesh(devices)
  sharding = parallel.data_sharded(mesh)
  k = len(devices)
  rng = np.random.default_rng(0)
  a = jax.device_put(rng.normal(size=(k * n, n)).astype(np.float32), sharding).astype(dtype)
  b = jax.device_put(rng.normal(size=(n, n)).astype(np.float32), parallel.replicated(mesh)).astype(dtype)
  f = jax.jit(lambda a, b: a @ b, out_shardings=sharding)
  jax.block_until_ready(f(a, b))
  # The fastest of several calls: a ceiling, and the median moved by 1.5x between runs here.
  return 2 * k * n ** 3 / min(time_call(f, a, b, repeats=1, warmup=0) for _ in range(9))


def default_matmul_n(devices) -> int:
  """A product large enough to reach the device's rate: on an H200 a 2048³ bf16 product lasts
  about 20 µs, as long as launching it; 8192³ lasts about 1.4 ms."""
  return 8192 if devices[0].platform == "gpu" else 2048


def _compiled_mb(compiled) -> float | None:
  """XLA's footprint of a compiled program on one device: arguments + outputs + temporaries."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2 ** 20


def _lowered_flops(lowered) -> float:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def _step_flops(model, config, mesh, state, batch_data) -> float:
  """The train step's FLOPs over the whole global batch, counted on a lowering with XLA's own
  convolution gradients: XLA's cost analysis counts a loop body once, so the image-by-image
  kernel gradients (a scan over the batch, cxflax.models.xla_cpu) would hide most of their FLOPs.
  (A lowering is not yet split over the devices: its count is the global one, where a compiled
  step's is one device's.)"""
  with xla_cpu.xla_kernel_gradients():
    return _lowered_flops(make_train_step(model, config, mesh).lower(state, batch_data))


def train_setup(name: str, batch: int, size: int, dtype: str, devices, sam: bool = False):
  """What a classification run builds for `name` (SGD, cross-entropy, 1000 classes): model,
  config, mesh, replicated train state and a random batch split over the mesh. Shared with
  benchmarks.op_profile, which profiles the same train step."""
  c = base_config(plain=True)  # no ml_collections: benchmarks/gpu_check.py runs without it
  c.model, c.batch_size, c.eval_batch_size, c.data.image_size = name, batch, batch, size
  c.loss.name, c.optim.name, c.schedule.name, c.dtype = "cross_entropy", "sgd", "constant", dtype
  c.optim.sam_rho = 0.05 if sam else 0.0
  c = finalize(c)
  mesh = parallel.make_mesh(devices)
  model = create_network(name, "linear", 1000, dtype=jnp.dtype(dtype))
  variables = init_variables(model, (size, size, 3), 0)
  tx, _ = optim.make_optimizer(c.optim, variables["params"], optax.constant_schedule)
  state = create_train_state(model, tx, variables, mesh)
  rng = np.random.default_rng(0)
  batch_data = parallel.shard_batch({
      "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
      "label": rng.integers(0, 1000, batch).astype(np.int32),
      "index": np.arange(batch, dtype=np.int64), "valid": np.ones(batch, np.float32)}, mesh)
  return model, c, mesh, state, batch_data


def cxflax_rates(name: str, batch: int, size: int, dtype: str, devices, repeats: int, sam: bool,
                 unfolded: bool = True) -> dict:
  """Train-step and eval-step images/s, compile seconds, FLOPs and memory of cxflax's model; the
  eval step with BatchNorm folded, and with `unfolded` also without folding."""
  model, c, mesh, state, batch_data = train_setup(name, batch, size, dtype, devices, sam)
  out = {}
  t = time.perf_counter()
  train = make_train_step(model, c, mesh).lower(state, batch_data).compile()
  out["train_compile_s"] = time.perf_counter() - t
  train_flops = _step_flops(model, c, mesh, state, batch_data)
  holder = {"state": state}

  def run():
    holder["state"], m = train(holder["state"], batch_data)
    return m["loss"]
  step_s = time_call(run, repeats=repeats)
  out["train_img_s"] = batch / step_s
  out["train_flops_per_img"] = train_flops / batch
  out["train_flop_s"] = train_flops / step_s
  out["train_compiled_mb"] = _compiled_mb(train)
  variables = {"params": holder["state"].params, "batch_stats": holder["state"].batch_stats}
  calls, flops = {}, {}
  for fold_bn, key in ((True, "eval"), (False, "eval_unfolded"))[:2 if unfolded else 1]:
    step = make_eval_step(model, TASKS.get("classification"), mesh, fold_bn=fold_bn)
    t = time.perf_counter()
    prepared = jax.block_until_ready(step.prepare(variables, (size, size, 3)))
    lowered = step.lower(prepared, batch_data)
    evaluate = lowered.compile()
    out[f"{key}_compile_s"] = time.perf_counter() - t
    out[f"{key}_compiled_mb"] = _compiled_mb(evaluate)
    calls[key] = functools.partial(lambda f, v: f(v, batch_data)["pred"], evaluate, prepared)
    # From the lowering, over the global batch, as the train step's are counted.
    flops[key] = _lowered_flops(lowered)
  # In turns, so that neither is favoured by its place in the run: timed one after the other,
  # the first (folded, right after the train step) once read 30% below the other.
  for key, eval_s in time_alternately(calls, repeats=repeats).items():
    out[f"{key}_img_s"] = batch / eval_s
    out[f"{key}_flops_per_img"] = flops[key] / batch
    out[f"{key}_flop_s"] = flops[key] / eval_s
  peak = [d.memory_stats().get("peak_bytes_in_use") for d in devices if d.memory_stats()]
  if peak and all(p is not None for p in peak):
    out["peak_mb"] = max(peak) / 2 ** 20
  return out


def torch_mfu(row: dict, ceiling: float) -> dict:
  """timm's MFU, from cxflax's FLOP count of the same architecture per image (the FLOPs do not
  depend on the framework): how far PyTorch runs from the ceiling, and so whether a target
  ratio is reachable at all — a ratio r needs cxflax at r times timm's MFU, ≤ 1."""
  return {"torch_train_mfu": row["torch_train_img_s"] * row["train_flops_per_img"] / ceiling,
          "torch_eval_mfu": row["torch_eval_img_s"] * row["eval_flops_per_img"] / ceiling}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", nargs="+", default=["resnet50", "resnest50d"])
  ap.add_argument("--batch", type=int, default=16, help="global batch, split over the devices")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--devices", type=int, default=0, help="devices to use (0: all)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no_sam", action="store_true", help="skip the SAM train step")
  ap.add_argument("--no_torch", action="store_true", help="skip PyTorch/timm")
  ap.add_argument("--cpu_kernels", default="auto", choices=xla_cpu.MODES,
                  help="cxflax's kernels for XLA's CPU backend, as config.cpu_kernels")
  ap.add_argument("--matmul_n", type=int, default=0, help="the ceiling's n×n×n product (0: default_matmul_n)")
  ap.add_argument("--out", default=default_out("throughput"))
  args = ap.parse_args()
  xla_cpu.set_mode(args.cpu_kernels)

  devices = jax.devices()[:args.devices] if args.devices else jax.devices()
  if args.devices > len(devices):
    raise SystemExit(f"--devices {args.devices}: this process sees {len(devices)} {devices[0].platform} "
                     "device(s) (CUDA_VISIBLE_DEVICES, or XLA_FLAGS=--xla_force_host_platform_device_count "
                     "for CPU devices)")
  if args.batch % len(devices):
    raise SystemExit(f"--batch {args.batch} must be a multiple of the {len(devices)} devices")
  ceiling = matmul_ceiling(devices, args.matmul_n or default_matmul_n(devices), jnp.dtype(args.dtype))
  print(f"{len(devices)} {devices[0].platform} device(s); {args.dtype} matmul ceiling "
        f"{ceiling / 1e9:.0f} GFLOP/s", flush=True)
  torch_device = "cuda" if devices[0].platform == "gpu" else "cpu"
  rows = []
  for name in args.models:
    row = {"model": name, "batch": args.batch, "size": args.image_size, "devices": len(devices)}
    row.update(cxflax_rates(name, args.batch, args.image_size, args.dtype, devices, args.repeats, sam=False))
    for key in ("train", "eval"):
      row[f"{key}_img_s_per_device"] = row[f"{key}_img_s"] / len(devices)
    row["train_mfu"] = row["train_flop_s"] / ceiling
    row["eval_mfu"] = row["eval_flop_s"] / ceiling
    if not args.no_sam:
      sam = cxflax_rates(name, args.batch, args.image_size, args.dtype, devices, args.repeats, sam=True)
      row["sam_train_img_s"] = sam["train_img_s"]
    if not args.no_torch:
      try:
        # On GPUs timm runs one device's share of the batch on one GPU, beside cxflax's rate per
        # device, in bfloat16 under autocast and channels_last where cxflax runs in bfloat16; on
        # the CPU (simulated devices share its cores) the whole batch, beside the global rate.
        share = len(devices) if torch_device == "cuda" else 1
        row.update(torch_rates(name, args.batch // share, args.image_size, args.repeats, device=torch_device,
                               bf16=args.dtype == "bfloat16", channels_last=torch_device == "cuda"))
        for key in ("train", "eval"):
          row[f"{key}_vs_torch"] = row[f"{key}_img_s"] / share / row[f"torch_{key}_img_s"]
        row.update(torch_mfu(row, ceiling / share))
      except ImportError as e:
        print(f"PyTorch/timm not available ({e}); pip install '.[test]' to compare")
    rows.append(row)
    print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
  path = write_json(args.out, "throughput", rows, dtype=args.dtype, matmul_ceiling_flop_s=ceiling,
                    cpu_kernels=args.cpu_kernels, cpu_kernels_enabled=xla_cpu.enabled())
  columns = ["model", "devices", "train_img_s", "train_img_s_per_device", "sam_train_img_s", "eval_img_s",
             "eval_img_s_per_device", "eval_unfolded_img_s",
             "torch_train_img_s",
             "torch_eval_img_s", "train_vs_torch", "eval_vs_torch", "train_mfu", "eval_mfu",
             "torch_train_mfu", "torch_eval_mfu",
             "train_compile_s", "train_compiled_mb", "peak_mb"]
  print(f"\nresults in {path}")
  print_table(rows, [c for c in columns if any(c in r for r in rows)])


if __name__ == "__main__":
  main()
