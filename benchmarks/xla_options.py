"""cxflax's XLA options for the CPU backend (cxflax.models.xla_cpu.compiler_options) against
XLA's defaults, on each model's train and eval step.

    python -m benchmarks.xla_options [--models resnet18 resnet10t resnest14d] [--image_size 128]
        [--batch 16] [--repeats 5] [--out FILE]

Both variants of each step are compiled in one process (the same kernels, cpu_kernels on) and
timed in turns; `speedup` is the default's time over the options'. `rel_diff` is how far their
parameters after one step (train) and their predictions (eval) are apart, relative to the
largest, so that a faster variant that computes something else shows.
"""

from __future__ import annotations

import argparse
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import default_out, print_table, rel_diff, time_alternately, write_json
from benchmarks.throughput import train_setup
from cxflax.models import xla_cpu
from cxflax.train.steps import make_eval_step, make_train_step
from cxflax.train.tasks import TASKS


def measure(name: str, batch: int, size: int, repeats: int) -> list[dict]:
  """Rows for the train and the eval step of `name`: images/s with XLA's defaults and with the options."""
  model, c, mesh, state, data = train_setup(name, batch, size, "float32", jax.devices()[:1])
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  train_calls, eval_calls, outputs = {}, {}, {}
  for variant in ("default", "options"):
    with xla_cpu.xla_default_options() if variant == "default" else contextlib.nullcontext():
      train = make_train_step(model, c, mesh)
      evaluate = make_eval_step(model, TASKS.get("classification"), mesh)
    start = jax.tree.map(jnp.copy, state)  # the step donates its state
    after, _ = train(jax.tree.map(jnp.copy, start), data)
    outputs[f"train_{variant}"] = np.concatenate([np.ravel(p) for p in jax.tree.leaves(after.params)])
    holder = {"state": start}

    def run(train=train, holder=holder):
      holder["state"], m = train(holder["state"], data)
      return m["loss"]
    train_calls[variant] = run
    prepared = jax.block_until_ready(evaluate.prepare(variables, (size, size, 3)))
    eval_calls[variant] = functools.partial(lambda f, v: f(v, data)["pred"], evaluate, prepared)
    outputs[f"eval_{variant}"] = eval_calls[variant]()
  rows = []
  for program, calls in (("train", train_calls), ("eval", eval_calls)):
    seconds = time_alternately(calls, repeats=repeats)
    rows.append({"model": name, "size": size, "batch": batch, "program": program,
                 "default_img_s": batch / seconds["default"], "options_img_s": batch / seconds["options"],
                 "speedup": seconds["default"] / seconds["options"],
                 "rel_diff": rel_diff(outputs[f"{program}_options"], outputs[f"{program}_default"])})
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", nargs="+", default=["resnet18", "resnet10t", "resnest14d"])
  ap.add_argument("--image_size", type=int, default=128)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=default_out("xla_options"))
  args = ap.parse_args()
  rows = []
  with xla_cpu.mode("on"):
    options = xla_cpu.compiler_options()
    if options is None:
      raise SystemExit(f"no XLA options apply on the {jax.default_backend()} backend with this jaxlib")
    print(f"options: {options}", flush=True)
    for name in args.models:
      rows += measure(name, args.batch, args.image_size, args.repeats)
      print(", ".join(f"{r['program']} {r['speedup']:.2f}x" for r in rows[-2:]), f"({name})", flush=True)
  path = write_json(args.out, "xla_options", rows, options=options)
  print_table(rows, ["model", "size", "batch", "program", "default_img_s", "options_img_s", "speedup", "rel_diff"])
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
