"""XLA's CPU convolution against cxflax's CPU kernels (matrix-product paths) on ResNet shapes.

    python -m benchmarks.conv_paths [--out FILE]

For each shape: forward and forward+backward time of jax.lax.conv_general_dilated (the
reference) and of cxflax.models.xla_cpu.conv2d (what layers.conv2d runs where config.cpu_kernels
is on), which computes 1x1 convolutions and convolutions with outputs of at most 2 px as matrix
products, and convolutions with a few groups group by group; the ratio is reference time /
cxflax time, and `fwd_rel_diff` how far the two outputs are apart (relative to the largest
output), so that a fast path that computes something else shows. `--only I J ... --batch B` measures some of the shapes at another batch size.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import default_out, print_table, rel_diff, time_call, write_json
from cxflax.models import xla_cpu

# (batch, size, in, out, kernel, stride, groups): ResNet-50 at 224 px (batch 16), the 64-px
# networks of the runlocal configs (batch 32), where the last stage is 2x2, and the radix-2
# split-attention convolutions of ResNeSt (2 groups).
SHAPES = [
    (16, 56, 64, 256, 1, 1, 1), (16, 56, 256, 64, 1, 1, 1), (16, 56, 64, 64, 3, 1, 1),
    (16, 28, 512, 128, 1, 1, 1), (16, 14, 256, 256, 3, 1, 1), (16, 7, 512, 2048, 1, 1, 1),
    (16, 7, 512, 512, 3, 1, 1), (32, 8, 128, 128, 3, 1, 1), (32, 4, 256, 512, 3, 2, 1),
    (32, 2, 512, 512, 3, 1, 1), (16, 56, 64, 128, 3, 1, 2), (16, 28, 128, 256, 3, 1, 2),
    (32, 16, 64, 128, 3, 1, 2), (32, 8, 256, 512, 3, 1, 2),
]


def _xla_conv(x, w, stride, pad, groups):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default=default_out("conv_paths"))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--only", type=int, nargs="+", help="indices into SHAPES (default: all)")
  parser.add_argument("--batch", type=int, default=0, help="batch size for every shape (0: the shape's)")
  args = parser.parse_args()
  rows = []
  for b, s, cin, cout, k, stride, g in (SHAPES[i] for i in (args.only or range(len(SHAPES)))):
    b = args.batch or b
    pad = k // 2
    x = jax.random.normal(jax.random.key(0), (b, s, s, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin // g, cout)) * 0.05
    row = {"shape": f"b{b} {s}x{s} {cin}->{cout} k{k} s{stride} g{g}"}
    outputs = {}
    for label, fn in (("xla", _xla_conv), ("cxflax", lambda x, w, s_, p_, g_: xla_cpu.conv2d(x, w, s_, (p_, p_), 1, g_))):
      fwd = jax.jit(lambda x, w, fn=fn: fn(x, w, stride, pad, g))
      outputs[label] = fwd(x, w)
      grad = jax.jit(jax.grad(lambda x, w, fn=fn: jnp.sum(fn(x, w, stride, pad, g) ** 2), argnums=(0, 1)))
      row[f"{label}_fwd_ms"] = 1e3 * time_call(fwd, x, w, repeats=args.repeats)
      row[f"{label}_grad_ms"] = 1e3 * time_call(grad, x, w, repeats=args.repeats)
    row["fwd_rel_diff"] = rel_diff(outputs["cxflax"], outputs["xla"])
    row["fwd_speedup"] = row["xla_fwd_ms"] / row["cxflax_fwd_ms"]
    row["grad_speedup"] = row["xla_grad_ms"] / row["cxflax_grad_ms"]
    rows.append(row)
  path = write_json(args.out, "conv_paths", rows)
  print_table(rows, ["shape", "xla_fwd_ms", "cxflax_fwd_ms", "fwd_speedup", "xla_grad_ms",
                     "cxflax_grad_ms", "grad_speedup", "fwd_rel_diff"])
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
