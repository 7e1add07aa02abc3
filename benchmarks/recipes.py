"""Every recipe's `:runlocal` trained in full, its final metric beside the trivial baseline.

    python -m benchmarks.recipes [--tree DIR] [--configs resnest.py:runlocal ...]
                                 [--dtypes auto float32 bfloat16] [--out FILE]

Each config runs as `python -m cxflax.main --config=configs/CONFIG --workdir=TMP` in a fresh
process, with the working directory and PYTHONPATH set to `--tree` (default: this checkout), so
that the same script measures an older commit checked out elsewhere (`git worktree add DIR
COMMIT`): behaviour kept across a change shows as equal final metrics. Reads each run's
`final_metrics.json`; prints a table and writes JSON. `--dtypes float32 bfloat16` runs each config
in each computation dtype (`--config.dtype`; default: the config's own, 'auto').
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import default_out, print_table, write_json

# Every recipe's :runlocal; the slow test tests/test_recipes.py::test_runlocal_learns_in_float32_and_in_bfloat16 trains
# the same, in both dtypes.
CONFIGS = ("resnest.py:runlocal", "resnest.py:multitask,runlocal", "sensemble.py:resnest14d,runlocal",
           "covid_resnet.py:runlocal", "flannel.py:resnet10t,runlocal", "densenet_ct.py:finetune,runlocal",
           "lung_seg.py:runlocal", "patched_flannel.py:resnet10t,runlocal")
HEADLINE = ("mae", "jaccard", "accuracy")  # the first of these a run reports is its headline


def run_recipe(tree: str, config: str, workdir: str, dtype: str = "auto") -> dict:
  env = dict(os.environ, PYTHONPATH=tree)
  t = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "cxflax.main", f"--config=configs/{config}",
                         f"--workdir={workdir}", f"--config.dtype={dtype}"], cwd=tree, env=env,
                        capture_output=True, text=True)
  seconds = time.perf_counter() - t
  if proc.returncode != 0:
    return {"config": config, "dtype": dtype, "error": proc.stderr.strip().splitlines()[-1:],
            "seconds": seconds}
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  name = next(k for k in HEADLINE if k in final["metrics"])
  return {"config": config, "dtype": dtype, "metric": name, "final": float(final["metrics"][name]),
          "baseline": float(final["baseline"][name]), "step": final["step"], "seconds": seconds}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  p.add_argument("--configs", nargs="+", default=list(CONFIGS))
  p.add_argument("--dtypes", nargs="+", default=["auto"], choices=["auto", "float32", "bfloat16"])
  p.add_argument("--out", default=default_out("recipes"))
  args = p.parse_args(argv)
  tree = os.path.abspath(args.tree)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                          text=True).stdout.strip()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    runs = [(config, dtype) for config in args.configs for dtype in args.dtypes]
    for i, (config, dtype) in enumerate(runs):
      print(f"[{i + 1}/{len(runs)}] {config} in {dtype} ({commit})", flush=True)
      rows.append(run_recipe(tree, config, os.path.join(tmp, f"run{i}"), dtype))
      print(f"  {rows[-1]}", flush=True)
  print_table(rows, ["config", "dtype", "metric", "final", "baseline", "step", "seconds", "error"])
  print(write_json(args.out, "recipes", rows, tree=tree, commit=commit))


if __name__ == "__main__":
  main()
