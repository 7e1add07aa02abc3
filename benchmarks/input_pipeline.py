"""Images/s of the augmented input pipeline beside the train step that consumes it.

    python -m benchmarks.input_pipeline [--sizes 224 512] [--workers 0 1 2] [--out FILE]

The pipeline reads 8-bit PNG slices in the Per-COVID-19 layout (phantom data written once to a
temporary folder at 512 px), decodes them and applies seed 001's training augmentation
(RandAugment(2, 9), flips, resize, ImageNet normalisation) in 0, 1 or 2 grain worker processes.
In the same run, resnet50's train step (SGD, float32) is timed at the same image sizes: the
ratio pipeline / step says whether the input keeps the device fed (> 1) on this machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import optax

from benchmarks.common import default_out, print_table, time_call, write_json
from cxflax import parallel
from cxflax.config import base_config, finalize
from cxflax.data import export, pipeline
from cxflax.data.sources import make_source
from cxflax.models.heads import create_network
from cxflax.train import optim
from cxflax.train.steps import create_train_state, init_variables, make_train_step

PP = "to_rgb|resize({size})|rand_augment(2, 9)|flip_lr(0.5)|flip_ud(0.5)|normalize('imagenet')"


def pipeline_rate(source, size: int, workers: int, batch: int, batches: int) -> float:
  ds = pipeline.train_dataset(source, np.arange(len(source)), pp=PP.format(size=size),
                              global_batch=batch, seed=0, workers=workers)
  it = iter(ds)
  next(it)  # start-up (worker processes, first batch) is not throughput
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * batch / (time.perf_counter() - t)
  if hasattr(it, "close"):
    it.close()
  return rate


def train_step_rate(model_name: str, size: int, batch: int, repeats: int) -> float:
  c = base_config()
  c.model, c.batch_size, c.data.image_size, c.schedule.name = model_name, batch, size, "constant"
  c = finalize(c)
  mesh = parallel.make_mesh()
  model = create_network(model_name, num_outputs=1)
  variables = init_variables(model, (size, size, 3), 0)
  tx, _ = optim.make_optimizer(c.optim, variables["params"], optax.constant_schedule)
  state = create_train_state(model, tx, variables, mesh)
  step = make_train_step(model, c, mesh)
  rng = np.random.default_rng(0)
  data = parallel.shard_batch({"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                               "label": rng.uniform(0, 100, batch).astype(np.float32)}, mesh)
  holder = {"state": state}

  def run():
    holder["state"], m = step(holder["state"], data)
    return m["loss"]
  return batch / time_call(run, repeats=repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--batches", type=int, default=8, help="batches timed per pipeline setting")
  parser.add_argument("--images", type=int, default=160, help="phantom slices written to disk")
  parser.add_argument("--model", default="resnet50")
  parser.add_argument("--step_repeats", type=int, default=3)
  parser.add_argument("--out", default=default_out("input_pipeline"))
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "Per-COVID-19")
    export.export_per_covid19(root, num_subjects=max(2, args.images // 4), image_size=512,
                              num_val_subjects=0)
    d = base_config().data
    d.source, d.root = "per_covid19", root
    source = make_source(d)
    rows = []
    for size in args.sizes:
      step = train_step_rate(args.model, size, args.batch, args.step_repeats)
      for w in args.workers:
        rate = pipeline_rate(source, size, w, args.batch, args.batches)
        rows.append({"size": size, "workers": w, "pipeline_img_s": rate,
                     f"{args.model}_step_img_s": step, "pipeline_over_step": rate / step})
        print(f"size {size}, {w} workers: pipeline {rate:.1f} img/s, train step {step:.1f} img/s",
              flush=True)
  path = write_json(args.out, "input_pipeline", rows, model=args.model, batch=args.batch,
                    augmentation=PP, devices=jax.device_count())
  print_table(rows, ["size", "workers", "pipeline_img_s", f"{args.model}_step_img_s", "pipeline_over_step"])
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
