"""The one prepared GPU check (issue 21): cxflax beside timm in PyTorch on one device, inside a
wall-clock budget, as one table and one JSON file.

    python -m benchmarks.gpu_check [--models resnet50 resnest50d densenet169] [--batch 128]
        [--image_size 224] [--dtype bfloat16] [--budget_s 450] [--task_s 150] [--out FILE]

For each model: cxflax's train step (SGD, cross-entropy, 1000 classes) and eval step (BatchNorm
folded) with the CPU-kernel switch off (what a GPU run uses) and on (cxflax.models.xla_cpu), and
timm's model in PyTorch (torch.autocast in bfloat16, channels_last) eager and under
torch.compile: images/s, compile seconds (timm: its first call's), peak memory, and MFU against
a matrix product in the same dtype measured in the same run (the best of the cxflax processes'
measurements; timm's MFU from cxflax's FLOP count of the same architecture).

Each measurement runs in a fresh process (benchmarks/NOTES.md §8 says why for PyTorch; for JAX
it gives each its own peak memory, which JAX cannot reset), one at a time, in this order: every
model's cxflax (switch off), then every model's timm eager, timm compiled, cxflax (switch on), so
that a budget that runs out costs the extras, not a model. Each gets at most `--task_s` seconds
and what is left of `--budget_s`; one that runs over is stopped, and what was not measured says
why in the table. One that runs out of memory is measured again at half the batch (the largest
batch that fits; the row gives the batch it ran).

Nothing on this path imports ml_collections, grain, clu or tensorflow, which the GPU machine
lacks (tests/test_benchmarks.py runs it with them blocked).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

VARIANTS = ("cxflax off", "timm eager", "timm compile", "cxflax on")
# Shortest time worth starting a measurement with: a process's start and imports alone take
# seconds.
_MIN_TASK_S = 10.0


def _out_of_memory(error: BaseException) -> bool:
  text = f"{type(error).__name__}: {error}"
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OutOfMemory" in text


def _largest_batch_that_fits(measure, batch: int, least: int) -> dict:
  """measure(batch), halving the batch while it runs out of memory (down to `least`)."""
  import gc
  while True:
    try:
      return {"batch": batch, **measure(batch)}
    except Exception as e:  # only running out of memory is retried
      if not _out_of_memory(e) or batch // 2 < least:
        raise
      print(f"batch {batch} does not fit ({str(e).splitlines()[0][:120]}); trying {batch // 2}", flush=True)
      batch //= 2
      gc.collect()


def cxflax_task(name: str, batch: int, size: int, dtype: str, repeats: int, cpu_kernels: str,
                matmul_n: int) -> dict:
  """One model's cxflax steps with the CPU-kernel switch at `cpu_kernels`, on one device, with
  the matmul ceiling measured first in the same process."""
  import jax
  import jax.numpy as jnp

  from benchmarks import throughput
  from cxflax.models import xla_cpu
  xla_cpu.set_mode(cpu_kernels)  # before anything is traced (xla_cpu's docstring)
  devices = jax.devices()[:1]
  n = matmul_n or throughput.default_matmul_n(devices)
  ceiling = throughput.matmul_ceiling(devices, n, jnp.dtype(dtype))
  out = _largest_batch_that_fits(
      lambda b: throughput.cxflax_rates(name, b, size, dtype, devices, repeats, sam=False, unfolded=False),
      batch, 1)
  out.update(matmul_ceiling_flop_s=ceiling,
             machine={"jax": jax.__version__, "devices": [str(d) for d in devices],
                      "device_kind": devices[0].device_kind})
  return out


def torch_task(name: str, batch: int, size: int, dtype: str, repeats: int, compile: bool, backend: str) -> dict:
  """timm's model on one device (CUDA where PyTorch sees one), eager or compiled."""
  import torch

  from benchmarks.timm_torch import torch_rates_here
  device = "cuda" if torch.cuda.is_available() else "cpu"
  return _largest_batch_that_fits(
      lambda b: torch_rates_here(name, b, size, repeats, device=device, bf16=dtype == "bfloat16",
                                 channels_last=True, compile=compile, backend=backend),
      batch, 1) | {"machine": {"torch": torch.__version__, "torch_device": device}}


def _call(conn, fn, args) -> None:
  try:
    conn.send(fn(*args))
  except BaseException as e:  # reported in the table, not raised
    conn.send({"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
  finally:
    conn.close()


def run_isolated(fn, args: tuple, limit_s: float) -> dict:
  """fn(*args) in a fresh process, stopped after `limit_s` seconds; its result, or a status."""
  ctx = multiprocessing.get_context("spawn")
  receive, send = ctx.Pipe(duplex=False)
  # not a daemon: torch.compile's inductor starts processes of its own
  process = ctx.Process(target=_call, args=(send, fn, args))
  process.start()
  send.close()
  try:
    if receive.poll(limit_s):
      return receive.recv()
    return {"status": f"stopped at its {limit_s:.0f} s limit"}
  except EOFError:  # the process ended without an answer (killed, crashed)
    process.join(5)
    return {"status": f"process died (exit code {process.exitcode})"}
  finally:
    process.kill()
    process.join()
    receive.close()


def _task(variant: str, name: str, args) -> tuple:
  if variant.startswith("cxflax"):
    return cxflax_task, (name, args.batch, args.image_size, args.dtype, args.repeats,
                         variant.split()[1], args.matmul_n)
  return torch_task, (name, args.batch, args.image_size, args.dtype, args.repeats,
                      variant == "timm compile", args.compile_backend)


def _row(name: str, variant: str, result: dict, elapsed: float) -> dict:
  """The table's row: the measurement under common names (timm's torch_* keys without prefix)."""
  row = {"model": name, "impl": variant, "batch": result.get("batch"), "status": result.get("status", "ok"),
         "wall_s": elapsed}
  for key, value in result.items():
    key = key.removeprefix("torch_")
    if key not in row and key not in ("machine", "status"):
      row[key] = value
  if variant.startswith("timm"):
    row["train_compile_s"] = row.pop("train_first_call_s", None)
    row["eval_compile_s"] = row.pop("eval_first_call_s", None)
    row["peak_mb"] = max(filter(None, (row.pop("train_peak_mb", None), row.pop("eval_peak_mb", None))),
                         default=None)
  return row


def _mfu_and_ratios(rows: list[dict], ceiling: float) -> None:
  """MFU of every measured row against the run's ceiling (timm's from cxflax's FLOPs per image
  for the same model), and cxflax / the faster timm variant."""
  for row in rows:
    cxflax = next((r for r in rows if r["model"] == row["model"] and r["impl"] == "cxflax off"), {})
    for key in ("train", "eval"):
      flops = row.get(f"{key}_flops_per_img") or cxflax.get(f"{key}_flops_per_img")
      if row.get(f"{key}_img_s") and flops and ceiling:
        row[f"{key}_mfu"] = row[f"{key}_img_s"] * flops / ceiling
  for row in rows:
    if row["impl"].startswith("cxflax"):
      for key in ("train", "eval"):
        timm = [r[f"{key}_img_s"] for r in rows if r["model"] == row["model"] and r["impl"].startswith("timm")
                and r.get(f"{key}_img_s")]
        if timm and row.get(f"{key}_img_s"):
          row[f"{key}_vs_timm"] = row[f"{key}_img_s"] / max(timm)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", nargs="+", default=["resnet50", "resnest50d", "densenet169"])
  ap.add_argument("--batch", type=int, default=128,
                  help="batch on the one device (halved while it does not fit)")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  ap.add_argument("--repeats", type=int, default=10, help="timed calls per step (the median)")
  ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
  ap.add_argument("--budget_s", type=float, default=450.0, help="wall-clock seconds for the whole check")
  ap.add_argument("--task_s", type=float, default=150.0, help="most seconds for one measurement")
  ap.add_argument("--matmul_n", type=int, default=0,
                  help="the ceiling's n×n×n product (0: throughput.default_matmul_n)")
  ap.add_argument("--compile_backend", default="inductor",
                  help="torch.compile's backend ('eager' checks the path without generating code)")
  from benchmarks.common import default_out, print_table, write_json
  ap.add_argument("--out", default=default_out("gpu_check"))
  args = ap.parse_args()

  start = time.monotonic()
  deadline = start + args.budget_s
  order = [v for v in VARIANTS if v in args.variants]
  rows, machine = [], {}
  for variant in order:
    for name in args.models:
      left = deadline - time.monotonic()
      if left < _MIN_TASK_S:
        rows.append(_row(name, variant, {"status": f"skipped: {max(left, 0):.0f} s of the budget left"}, 0.0))
        continue
      fn, fn_args = _task(variant, name, args)
      t = time.monotonic()
      result = run_isolated(fn, fn_args, min(args.task_s, left))
      machine.update(result.get("machine", {}))
      rows.append(_row(name, variant, result, time.monotonic() - t))
      print(f"{name} {variant}: {rows[-1]['status']} in {rows[-1]['wall_s']:.0f} s", flush=True)
  ceilings = [r["matmul_ceiling_flop_s"] for r in rows if r.get("matmul_ceiling_flop_s")]
  ceiling = max(ceilings) if ceilings else None
  _mfu_and_ratios(rows, ceiling)
  wall = time.monotonic() - start
  path = write_json(args.out, "gpu_check", rows, machine=machine, dtype=args.dtype, image_size=args.image_size,
                    budget_s=args.budget_s, task_s=args.task_s, wall_s=wall, matmul_ceiling_flop_s=ceiling)
  print(f"\n{machine.get('device_kind', '?')}; {args.dtype} matmul ceiling "
        f"{f'{ceiling / 1e12:.3g} TFLOP/s' if ceiling else 'not measured'}; "
        f"{wall:.0f} s of a {args.budget_s:.0f} s budget; results in {path}\n")
  print_table(rows, ["model", "impl", "batch", "train_img_s", "eval_img_s", "train_mfu", "eval_mfu",
                     "train_vs_timm", "eval_vs_timm", "train_compile_s", "eval_compile_s", "peak_mb", "status"])


if __name__ == "__main__":
  main()
