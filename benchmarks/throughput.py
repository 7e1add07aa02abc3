"""Train and eval throughput of cxflax's models beside timm's in PyTorch, measured in one run.

    python -m benchmarks.throughput [--models resnet50 resnest50d] [--batch 16] [--image_size 224]
        [--dtype float32] [--devices N] [--repeats 3] [--no_torch] [--cpu_kernels auto] [--out FILE]

For each model, cxflax's jitted steps over a mesh of `--devices` devices (default: all; the
global batch is split over them, exactly as training runs): the train step (SGD, cross-entropy,
1000 classes) plain and with SAM (two forward/backward passes), the eval step (BatchNorm folded
into the convolutions, as evaluation runs, and unfolded for comparison), each step's
compile time, XLA's FLOP count of the compiled step (cost analysis) and the FLOP/s it achieves,
and that as a fraction of the float32 matrix-product ceiling measured in the same run on the
same devices (MFU). Memory is XLA's compiled footprint (arguments + outputs + temporaries, per
device), and on GPUs the device's peak bytes in use. timm's model in PyTorch on the same batch
(train step with SGD; eval under no_grad) is timed in the same run, in a fresh process per
model (CPU threads = all cores), with the ratio cxflax / PyTorch and, on the CPU, timm's MFU
from the same FLOP count. `--cpu_kernels` selects cxflax's kernels for XLA's CPU backend as
config.cpu_kernels does (cxflax.models.xla_cpu). Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import default_out, print_table, time_alternately, time_call, write_json
from cxflax import parallel
from cxflax.config import base_config, finalize
from cxflax.models import xla_cpu
from cxflax.models.heads import create_network
from cxflax.train import optim
from cxflax.train.steps import create_train_state, init_variables, make_eval_step, make_train_step
from cxflax.train.tasks import TASKS


def matmul_ceiling(devices, n: int = 2048, dtype=jnp.float32) -> float:
  """FLOP/s of an n×n×n product on each device at once (the sum over devices), best of 9."""
  mesh = parallel.make_mesh(devices)
  sharding = parallel.data_sharded(mesh)
  k = len(devices)
  a = jax.device_put(jnp.ones((k * n, n), dtype), sharding)
  b = jax.device_put(jnp.ones((n, n), dtype), parallel.replicated(mesh))
  f = jax.jit(lambda a, b: a @ b, out_shardings=sharding)
  jax.block_until_ready(f(a, b))
  # The fastest of several calls: a ceiling, and the median moved by 1.5x between runs here.
  return 2 * k * n ** 3 / min(time_call(f, a, b, repeats=1, warmup=0) for _ in range(9))


def _compiled_stats(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {"flops": float(cost.get("flops", 0.0)) if cost else 0.0}
  mem = compiled.memory_analysis()
  if mem is not None:
    out["compiled_mb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                          + mem.temp_size_in_bytes) / 2 ** 20
  return out


def _step_flops(model, config, mesh, state, batch_data) -> float:
  """The train step's FLOPs over the whole global batch, counted on a lowering with XLA's own
  convolution gradients: XLA's cost analysis counts a loop body once, so the image-by-image
  kernel gradients (a scan over the batch, cxflax.models.xla_cpu) would hide most of their FLOPs.
  (A lowering is not yet split over the devices: its count is the global one, where a compiled
  step's is one device's.)"""
  with xla_cpu.xla_kernel_gradients():
    cost = make_train_step(model, config, mesh).lower(state, batch_data).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def train_setup(name: str, batch: int, size: int, dtype: str, devices, sam: bool = False):
  """What a classification run builds for `name` (SGD, cross-entropy, 1000 classes): model,
  config, mesh, replicated train state and a random batch split over the mesh. Shared with
  benchmarks.op_profile, which profiles the same train step."""
  c = base_config()
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


def cxflax_rates(name: str, batch: int, size: int, dtype: str, devices, repeats: int, sam: bool) -> dict:
  """Train-step and eval-step images/s, compile seconds, FLOPs and memory of cxflax's model."""
  model, c, mesh, state, batch_data = train_setup(name, batch, size, dtype, devices, sam)
  out = {}
  t = time.perf_counter()
  train = make_train_step(model, c, mesh).lower(state, batch_data).compile()
  out["train_compile_s"] = time.perf_counter() - t
  stats = _compiled_stats(train)
  stats["flops"] = _step_flops(model, c, mesh, state, batch_data)
  holder = {"state": state}

  def run():
    holder["state"], m = train(holder["state"], batch_data)
    return m["loss"]
  step_s = time_call(run, repeats=repeats)
  out["train_img_s"] = batch / step_s
  out["train_flops_per_img"] = stats["flops"] / batch
  out["train_flop_s"] = stats["flops"] / step_s
  out["train_compiled_mb"] = stats.get("compiled_mb")
  variables = {"params": holder["state"].params, "batch_stats": holder["state"].batch_stats}
  calls, flops = {}, {}
  for fold_bn, key in ((True, "eval"), (False, "eval_unfolded")):
    step = make_eval_step(model, TASKS.get("classification"), mesh, fold_bn=fold_bn)
    t = time.perf_counter()
    prepared = jax.block_until_ready(step.prepare(variables, (size, size, 3)))
    evaluate = step.lower(prepared, batch_data).compile()
    out[f"{key}_compile_s"] = time.perf_counter() - t
    calls[key] = functools.partial(lambda f, v: f(v, batch_data)["pred"], evaluate, prepared)
    flops[key] = _compiled_stats(evaluate)["flops"] * len(devices)
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


def torch_rates(name: str, batch: int, size: int, repeats: int) -> dict:
  """timm's model in PyTorch, in a fresh process of its own (see _torch_rates_here)."""
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    return pool.apply(_torch_rates_here, (name, batch, size, repeats))


def _torch_rates_here(name: str, batch: int, size: int, repeats: int) -> dict:
  """SGD train-step and no_grad eval images/s on the same batch, after two warm-up calls.

  PyTorch's CPU speed here depends on the process's history: glibc returns large tensors to the
  system and faults their pages in again on the next step, less so once earlier frees have
  raised its mmap threshold, so timm's figures moved by up to 1.7x with the models measured
  before them in the same process (benchmarks/NOTES.md §8). A fresh process per model gives
  every model the same start, that of a user's training script.
  """
  import torch
  import timm
  torch.set_num_threads(os.cpu_count() or 1)
  model = timm.create_model(name, pretrained=False, num_classes=1000)
  x = torch.randn(batch, 3, size, size)
  y = torch.randint(0, 1000, (batch,))
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()

  def train():
    opt.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    opt.step()

  def timed(fn):
    fn()
    fn()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return float(np.median(times))

  model.train()
  train_s = timed(train)
  model.eval()
  with torch.no_grad():
    eval_s = timed(lambda: model(x))
  return {"torch_train_img_s": batch / train_s, "torch_eval_img_s": batch / eval_s}


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
  ap.add_argument("--out", default=default_out("throughput"))
  args = ap.parse_args()
  xla_cpu.set_mode(args.cpu_kernels)

  devices = jax.devices()[:args.devices] if args.devices else jax.devices()
  if args.batch % len(devices):
    raise SystemExit(f"--batch {args.batch} must be a multiple of the {len(devices)} devices")
  ceiling = matmul_ceiling(devices, dtype=jnp.dtype(args.dtype))
  print(f"{len(devices)} {devices[0].platform} device(s); {args.dtype} matmul ceiling "
        f"{ceiling / 1e9:.0f} GFLOP/s", flush=True)
  rows = []
  for name in args.models:
    row = {"model": name, "batch": args.batch, "size": args.image_size, "devices": len(devices)}
    row.update(cxflax_rates(name, args.batch, args.image_size, args.dtype, devices, args.repeats, sam=False))
    row["train_mfu"] = row["train_flop_s"] / ceiling
    row["eval_mfu"] = row["eval_flop_s"] / ceiling
    if not args.no_sam:
      sam = cxflax_rates(name, args.batch, args.image_size, args.dtype, devices, args.repeats, sam=True)
      row["sam_train_img_s"] = sam["train_img_s"]
    if not args.no_torch:
      try:
        row.update(torch_rates(name, args.batch, args.image_size, args.repeats))
        row["train_vs_torch"] = row["train_img_s"] / row["torch_train_img_s"]
        row["eval_vs_torch"] = row["eval_img_s"] / row["torch_eval_img_s"]
        if devices[0].platform == "cpu":  # timm runs on the CPU: the same ceiling applies
          row.update(torch_mfu(row, ceiling))
      except ImportError as e:
        print(f"PyTorch/timm not available ({e}); pip install '.[test]' to compare")
    rows.append(row)
    print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
  path = write_json(args.out, "throughput", rows, dtype=args.dtype, matmul_ceiling_flop_s=ceiling,
                    cpu_kernels=args.cpu_kernels, cpu_kernels_enabled=xla_cpu.enabled())
  columns = ["model", "devices", "train_img_s", "sam_train_img_s", "eval_img_s", "eval_unfolded_img_s",
             "torch_train_img_s",
             "torch_eval_img_s", "train_vs_torch", "eval_vs_torch", "train_mfu", "eval_mfu",
             "torch_train_mfu", "torch_eval_mfu",
             "train_compile_s", "train_compiled_mb", "peak_mb"]
  print(f"\nresults in {path}")
  print_table(rows, [c for c in columns if any(c in r for r in rows)])


if __name__ == "__main__":
  main()
