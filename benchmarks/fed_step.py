"""Is the train step starved? The main job's training images/s, read from its own log, against the
bare train step's on the same config, model, batch and image size.

    python -m benchmarks.fed_step [--config resnest.py] [--model resnet18] [--sizes 224 512]
        [--batch 16] [--epochs 3] [--subjects 16] [--repeats 5] [--out FILE]

For each image size:
- *bare*: the train step the main job compiles for the config (its model, head, loss, optimizer
  with SAM and the rest, built by the same functions), called `--repeats` times on one real
  batch of the config's own input pipeline that is already on the device: images/s with nothing
  to wait for; measured before and after the main job, and the mean taken (this machine's rate
  drifts by 10-20% between minutes);
- *fed*: `python -m cxflax.main --config=configs/CONFIG` in a fresh process with the same
  overrides, its data workers as the config sets them (`data.workers`), the built-in phantom
  data at that size; the steady-state training images/s is read from the per-epoch log lines
  ("epoch N took ...: training T s (I images, R images/s)", evaluation and checkpoint excluded)
  of every epoch after the first (which compiles the step).
Prints the table, with fed / bare, and writes JSON. Evaluation and checkpoints run only at the
end (`eval_every_epochs`, `checkpoint_every_epochs` set past the run), as they are not part of
the training rate.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

from benchmarks.common import default_out, print_table, time_call, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCH_LINE = re.compile(r"epoch (\d+) took [\d.]+ s: training ([\d.]+) s \((\d+) images, [\d.]+ images/s\)")


def overrides(args, size: int) -> list[str]:
  """The command-line overrides of both measurements at `size` pixels."""
  return [f"--config.model={args.model}", "--config.init_from=", f"--config.data.image_size={size}",
          f"--config.batch_size={args.batch}", f"--config.eval_batch_size={args.batch}",
          f"--config.num_epochs={args.epochs}", f"--config.data.phantom.num_subjects={args.subjects}",
          f"--config.eval_every_epochs={args.epochs + 1}", f"--config.checkpoint_every_epochs={args.epochs + 1}",
          "--config.tensorboard_images=0"]


def bare_rate(config_file: str, flags: list[str], repeats: int):
  """(a function measuring the images/s of the config's train step on one batch from its own
  pipeline, already on the device; the run's workers and steps per epoch)."""
  from absl import flags as absl_flags
  from ml_collections import config_flags
  from cxflax import config as config_lib, parallel
  from cxflax.train import build, optim
  from cxflax.train.steps import create_train_state, make_train_step

  argv = ["cxflax", f"--config={config_file}", *flags]  # as cxflax.main parses its command line
  values = absl_flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "recipe", flag_values=values, sys_argv=argv)
  values(argv)
  config = config_lib.finalize(holder.value)
  mesh = parallel.make_mesh()
  start = build.training_start(config)
  inp = start.inp
  tx, _ = optim.training_optimizer(config, start.variables["params"], inp.steps_per_epoch)
  state = create_train_state(start.model, tx, start.variables, mesh)
  step = make_train_step(start.model, config, mesh, start.alpha)
  batch = parallel.shard_batch(next(iter(inp.train())), mesh)
  holder_state = {"state": state}

  def run():
    holder_state["state"], m = step(holder_state["state"], batch)
    return m["loss"]
  time_call(run, repeats=1)  # compiled and warm
  info = {"workers": config.data.workers, "steps_per_epoch": inp.steps_per_epoch}
  return lambda: config.batch_size / time_call(run, repeats=repeats, warmup=0), info


def fed_rate(config_file: str, flags: list[str], workdir: str) -> dict:
  """Steady-state training images/s of the main job, from its per-epoch log lines after the first."""
  proc = subprocess.run([sys.executable, "-m", "cxflax.main", f"--config={config_file}", f"--workdir={workdir}",
                         *flags], cwd=REPO, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"error: the main job failed:\n{proc.stderr[-3000:]}")
  epochs = [(int(e), float(t), int(n)) for e, t, n in EPOCH_LINE.findall(proc.stderr)]
  later = [(t, n) for e, t, n in epochs if e > 1]
  if not later:
    raise SystemExit(f"error: no epoch after the first in the main job's log ({len(epochs)} epoch lines)")
  seconds, images = map(sum, zip(*later))
  first = next((t for e, t, _ in epochs if e == 1), float("nan"))
  return {"fed_img_s": images / seconds, "fed_epochs": len(later), "first_epoch_train_s": first}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="resnest.py", help="a recipe in configs/ (with its arguments)")
  p.add_argument("--model", default="resnet18")
  p.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--subjects", type=int, default=16, help="phantom subjects (3-6 slices each)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=default_out("fed_step"))
  args = p.parse_args(argv)
  if args.epochs < 2:
    p.error("--epochs must be at least 2: the first epoch compiles the step")
  config_file = os.path.join(REPO, "configs", args.config)
  rows = []
  for size in args.sizes:
    flags = overrides(args, size)
    print(f"{args.config} {args.model} at {size} px, batch {args.batch}: bare step ...", flush=True)
    row = {"config": args.config, "model": args.model, "size": size, "batch": args.batch}
    measure, info = bare_rate(config_file, flags, args.repeats)
    row.update(info, bare_before_img_s=measure())
    print(f"  {row}\n  main job ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
      row.update(fed_rate(config_file, flags, tmp))
    row["bare_after_img_s"] = measure()
    row["bare_img_s"] = (row["bare_before_img_s"] + row["bare_after_img_s"]) / 2
    row["fed_over_bare"] = row["fed_img_s"] / row["bare_img_s"]
    print(f"  {row}", flush=True)
    rows.append(row)
  print_table(rows, ["config", "model", "size", "batch", "workers", "steps_per_epoch", "bare_before_img_s",
                     "bare_after_img_s", "bare_img_s", "fed_img_s", "fed_over_bare", "fed_epochs", "first_epoch_train_s"])
  print(write_json(args.out, "fed_step", rows))


if __name__ == "__main__":
  main()
