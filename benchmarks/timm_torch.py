"""timm's model in PyTorch, timed on the batch cxflax's steps are timed on: the reference the
throughput benchmarks compare against.

No jax here (and no import of it through this module): on a GPU machine the PyTorch process,
with torch.compile's triton, stays apart from jaxlib's compiler (tests/conftest.py says what
loading both into one process did here).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import time


def torch_rates(name: str, batch: int, size: int, repeats: int, **options) -> dict:
  """torch_rates_here in a fresh process of its own (see there)."""
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    return pool.apply(torch_rates_here, (name, batch, size, repeats), options)


def torch_rates_here(name: str, batch: int, size: int, repeats: int, device: str = "cpu",
                     bf16: bool = False, channels_last: bool = False, compile: bool = False,
                     backend: str = "inductor") -> dict:
  """SGD train-step and no_grad eval images/s on one random batch, each the median of `repeats`
  calls after two warm-up calls; `bf16`: under torch.autocast in bfloat16, as timm's own
  benchmark runs mixed precision; `compile`: the model under torch.compile(backend=backend)
  (the optimizer step stays eager). Also the first call's seconds (compilation included) and, on
  a CUDA device, the peak memory allocated by each.

  PyTorch's CPU speed here depends on the process's history: glibc returns large tensors to the
  system and faults their pages in again on the next step, less so once earlier frees have
  raised its mmap threshold, so timm's figures moved by up to 1.7x with the models measured
  before them in the same process (benchmarks/NOTES.md §8). Run this in a fresh process per
  model (torch_rates), which gives every model the same start, that of a user's training script.
  """
  import torch
  import timm
  torch.set_num_threads(os.cpu_count() or 1)
  cuda = device.startswith("cuda")
  layout = torch.channels_last if channels_last else torch.contiguous_format
  model = timm.create_model(name, pretrained=False, num_classes=1000).to(device, memory_format=layout)
  x = torch.randn(batch, 3, size, size, device=device).to(memory_format=layout)
  y = torch.randint(0, 1000, (batch,), device=device)
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()
  forward = torch.compile(model, backend=backend) if compile else model

  def autocast():
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

  def train():
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = loss_fn(forward(x), y)
    loss.backward()
    opt.step()

  def evaluate():
    with torch.no_grad(), autocast():
      forward(x)

  def call(fn) -> float:
    t = time.perf_counter()
    fn()
    if cuda:
      torch.cuda.synchronize(device)
    return time.perf_counter() - t

  out = {}
  for key, fn, training in (("train", train, True), ("eval", evaluate, False)):
    model.train(training)
    if cuda:
      torch.cuda.reset_peak_memory_stats(device)
    out[f"torch_{key}_first_call_s"] = call(fn)
    call(fn)
    out[f"torch_{key}_img_s"] = batch / statistics.median(call(fn) for _ in range(repeats))
    if cuda:
      out[f"torch_{key}_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
  return out
