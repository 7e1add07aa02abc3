"""Where a model's compiled step spends its time, operation by operation (XLA on CPU or GPU).

    python -m benchmarks.op_profile [--model resnest50d] [--mode eval|train] [--batch 16]
        [--image_size 224] [--top 30] [--out FILE]

Traces a few calls of the jitted eval apply (or of the train step, as benchmarks.throughput
times it) with `jax.profiler`, sums the trace's events per compiled HLO instruction (XLA names
each thunk after its instruction), and reads from the compiled HLO what each one computes: its
main operation (convolution, dot, reduce, ...), FLOPs for convolutions and products, and the
model scope it came from. Prints the top instructions by time, then the time per kind of
operation, and writes JSON. Operations that XLA runs concurrently overlap in the trace, so
single times can overstate; this finds where to look (benchmarks/NOTES.md, attempt 9), whole-step
A/B runs measure. Inside a loop body (the image-by-image kernel gradients) an instruction's time
sums every iteration while its FLOPs are one iteration's, so its GFLOP/s reads low.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import default_out, print_table, write_json
from benchmarks.throughput import train_setup
from cxflax.models import create_model
from cxflax.train.steps import make_train_step

_MAIN_OPS = ("convolution", "dot", "reduce-window", "select-and-scatter", "reduce", "scatter", "while")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"(?:ENTRY )?%?([\w.\-]+) \(.*\)\s*->.*\{\s*$")


def _dims(shape: str) -> list[int]:
  m = re.search(r"\[([\d,]*)\]", shape)
  return [int(v) for v in m.group(1).split(",") if v] if m else []


def parse_hlo(text: str) -> tuple[dict, dict]:
  """Instructions of every computation, the entry's included: name → (shape, opcode, rest of
  line), and computation name → its instruction names."""
  instructions, computations, current = {}, {}, None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header and " = " not in line.split("{")[0]:
      current = computations.setdefault(header.group(1), [])
      continue
    m = _INSTRUCTION.match(line)
    if m:
      instructions[m.group(1)] = (m.group(2), m.group(3), m.group(4))
      if current is not None:
        current.append(m.group(1))
  return instructions, computations


def _flops(instructions: dict, name: str) -> float:
  """2·MACs of a convolution or dot instruction, from its operand and output shapes."""
  shape, op, rest = instructions[name]
  operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
  out = math.prod(_dims(shape))
  if op == "dot":
    lhs = _dims(instructions[operands[0]][0])
    axes = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
    return 2.0 * out * math.prod(lhs[int(a)] for a in axes.split(",") if a)
  window = re.search(r"window=\{size=([\dx]+)", rest)
  labels = re.search(r"dim_labels=\w+_(\w+)->", rest)
  rhs = _dims(instructions[operands[1]][0])
  taps = math.prod(int(v) for v in window.group(1).split("x")) if window else 1
  return 2.0 * out * taps * rhs[labels.group(1).index("i")]


def describe(instructions: dict, computations: dict, name: str) -> dict:
  """What instruction `name` computes: its main kind of operation (the first of _MAIN_OPS it
  holds), the FLOPs of all its convolutions and products, and the model scope in its metadata."""
  shape, op, rest = instructions[name]
  scope = re.search(r'op_name="([^"]*)"', rest)
  called = re.search(r"calls=%?([\w.\-]+)", rest)
  body = computations.get(called.group(1), []) if called else []
  ops = [instructions[inner][1] for inner in [name] + body]
  kind = next((k for k in _MAIN_OPS if k in ops), "elementwise" if op == "fusion" else op)
  flops = sum(_flops(instructions, inner) for inner in [name] + body
              if instructions[inner][1] in ("convolution", "dot"))
  return {"kind": kind, "flops": flops, "shape": shape.split("{")[0],
          "scope": scope.group(1) if scope else ""}


def profile(call, calls: int = 2) -> dict[str, float]:
  """Seconds per call of each traced event name, over `calls` calls of call() (after one)."""
  jax.block_until_ready(call())
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(call())
    paths = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {tmp}")
    with gzip.open(paths[0]) as f:
      events = json.load(f)["traceEvents"]
  seconds = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      seconds[e["name"]] += e["dur"] / 1e6 / calls
  return seconds


def compiled_step(model_name: str, mode: str, batch: int, size: int):
  """The compiled step to profile and a call that runs it once: the eval apply, or the train
  step exactly as benchmarks.throughput times it (make_train_step: SGD, cross-entropy, the
  state donated and carried from call to call)."""
  if mode == "eval":
    model = create_model(model_name)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    return compiled, lambda: compiled(variables, x)
  model, config, mesh, state, batch_data = train_setup(model_name, batch, size, "float32",
                                                       jax.devices()[:1])
  compiled = make_train_step(model, config, mesh).lower(state, batch_data).compile()
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], batch_data)
    return metrics["loss"]
  return compiled, call


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="resnest50d")
  ap.add_argument("--mode", default="eval", choices=["eval", "train"])
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--out", default=default_out("op_profile"))
  args = ap.parse_args()

  compiled, call = compiled_step(args.model, args.mode, args.batch, args.image_size)
  instructions, computations = parse_hlo(compiled.as_text())
  seconds = profile(call)
  rows = []
  for name, s in seconds.items():
    if name in instructions:
      row = {"instruction": name, "ms": s * 1e3, **describe(instructions, computations, name)}
      row["gflop_s"] = row["flops"] / s / 1e9 if row["flops"] and s else None
      rows.append(row)
  rows.sort(key=lambda r: -r["ms"])
  by_kind = collections.Counter()
  for r in rows:
    by_kind[r["kind"]] += r["ms"]
  kinds = [{"kind": k, "ms": v} for k, v in by_kind.most_common()]
  path = write_json(args.out, "op_profile", rows, model=args.model, mode=args.mode,
                    batch=args.batch, image_size=args.image_size, by_kind=kinds)
  print(f"{args.model} {args.mode}, batch {args.batch}, {args.image_size} px: "
        f"{sum(by_kind.values()):.0f} ms in {len(rows)} instructions per call\n")
  print_table(rows[:args.top], ["instruction", "ms", "kind", "gflop_s", "shape", "scope"])
  print()
  print_table(kinds, ["kind", "ms"])
  print(f"\nresults in {path}")


if __name__ == "__main__":
  main()
