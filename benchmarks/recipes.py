"""Every recipe's `:runlocal` trained in full, its final metric beside the trivial baseline.

    python -m benchmarks.recipes [--tree DIR] [--configs resnest.py:runlocal ...] [--out FILE]

Each config runs as `python -m cxflax.main --config=configs/CONFIG --workdir=TMP` in a fresh
process, with the working directory and PYTHONPATH set to `--tree` (default: this checkout), so
that the same script measures an older commit checked out elsewhere (`git worktree add DIR
COMMIT`): behaviour kept across a change shows as equal final metrics. Reads each run's
`final_metrics.json`; prints a table and writes JSON.
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

# Every recipe's :runlocal; the slow test tests/test_recipes.py::test_runlocal_learns trains the same.
CONFIGS = ("resnest.py:runlocal", "resnest.py:multitask,runlocal", "sensemble.py:resnest14d,runlocal",
           "covid_resnet.py:runlocal", "flannel.py:resnet10t,runlocal", "densenet_ct.py:finetune,runlocal",
           "lung_seg.py:runlocal", "patched_flannel.py:resnet10t,runlocal")
HEADLINE = ("mae", "jaccard", "accuracy")  # the first of these a run reports is its headline


def run_recipe(tree: str, config: str, workdir: str) -> dict:
  env = dict(os.environ, PYTHONPATH=tree)
  t = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "cxflax.main", f"--config=configs/{config}",
                         f"--workdir={workdir}"], cwd=tree, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - t
  if proc.returncode != 0:
    return {"config": config, "error": proc.stderr.strip().splitlines()[-1:], "seconds": seconds}
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  name = next(k for k in HEADLINE if k in final["metrics"])
  return {"config": config, "metric": name, "final": float(final["metrics"][name]),
          "baseline": float(final["baseline"][name]), "step": final["step"], "seconds": seconds}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  p.add_argument("--configs", nargs="+", default=list(CONFIGS))
  p.add_argument("--out", default=default_out("recipes"))
  args = p.parse_args(argv)
  tree = os.path.abspath(args.tree)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                          text=True).stdout.strip()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, config in enumerate(args.configs):
      print(f"[{i + 1}/{len(args.configs)}] {config} ({commit})", flush=True)
      rows.append(run_recipe(tree, config, os.path.join(tmp, f"run{i}")))
      print(f"  {rows[-1]}", flush=True)
  print_table(rows, ["config", "metric", "final", "baseline", "step", "seconds", "error"])
  print(write_json(args.out, "recipes", rows, tree=tree, commit=commit))


if __name__ == "__main__":
  main()
