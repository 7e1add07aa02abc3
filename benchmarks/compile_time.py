"""Compile time against run time, with XLA's expensive backend passes and without.

    python -m benchmarks.compile_time [--models resnet10t densenet121] [--size 64] [--out FILE]

Most of the test suite's time is compilation of programs that then run once or for a few steps.
For each model: the compile time and the time of one call of the eval forward pass and of the
training-mode gradient, with JAX's defaults and with `jax_disable_most_optimizations` (XLA's
backend optimisation level 0 and LLVM's expensive passes off; the HLO passes still run), which
tests/conftest.py sets for the suite. `*_ratio` is default / reduced: above 1 where the reduced
setting is faster. `rel_diff` is how far the two settings' outputs are apart (relative to the
largest output).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import default_out, print_table, rel_diff, time_call, write_json
from cxflax.models import create_model


def _programs(model, variables, x):
  """The eval forward pass and the training-mode gradient of a scalar of the outputs."""
  def loss(params):
    out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(out))
  return {"eval": (lambda v: model.apply(v, x, train=False), variables),
          "grad": (jax.grad(loss), variables["params"])}


def _measure(fn, arg, repeats: int) -> tuple[float, float, np.ndarray]:
  """Compile seconds, seconds per call, and the flattened output. (A new function each time:
  jax would otherwise hand back the executable it compiled under the other setting.)"""
  lowered = jax.jit(lambda a: fn(a)).lower(arg)
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  run_s = time_call(compiled, arg, repeats=repeats)
  out = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(compiled(arg))])
  return compile_s, run_s, out


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--models", nargs="+", default=["resnet10t", "resnest14d", "densenet121"])
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=default_out("compile_time"))
  args = parser.parse_args()
  rows = []
  before = jax.config.values["jax_disable_most_optimizations"]
  for name in args.models:
    model = create_model(name, num_classes=4)
    x = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3))
    variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
    for program, (fn, arg) in _programs(model, variables, x).items():
      row = {"model": name, "program": program}
      outputs = {}
      for label, reduced in (("default", False), ("reduced", True)):
        jax.config.update("jax_disable_most_optimizations", reduced)
        compile_s, run_s, outputs[label] = _measure(fn, arg, args.repeats)
        row[f"{label}_compile_s"], row[f"{label}_run_s"] = compile_s, run_s
      jax.config.update("jax_disable_most_optimizations", before)
      row["compile_ratio"] = row["default_compile_s"] / row["reduced_compile_s"]
      row["run_ratio"] = row["default_run_s"] / row["reduced_run_s"]
      row["rel_diff"] = rel_diff(outputs["reduced"], outputs["default"])
      rows.append(row)
  columns = ["model", "program", "default_compile_s", "reduced_compile_s", "compile_ratio",
             "default_run_s", "reduced_run_s", "run_ratio", "rel_diff"]
  print_table(rows, columns)
  print("wrote", write_json(args.out, "compile_time", rows, size=args.size, batch=args.batch))


if __name__ == "__main__":
  main()
