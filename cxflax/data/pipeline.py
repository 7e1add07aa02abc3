"""grain input pipelines: shuffled, augmented training batches and padded evaluation batches.

Each process reads only its share of every global batch (``process_index::process_count``), so
the pipeline scales to many hosts; the loop assembles the global batch on the mesh.

Training: per-epoch shuffle (reseeded each epoch), per-element augmentation seeded by (seed,
epoch, index), batches with drop-remainder, epochs chained without end; the iterator's state is
checkpointed so that a resumed run sees exactly the batches an uninterrupted run sees.

Evaluation: every held-out example exactly once, the last batch padded with copies flagged
``valid = 0`` so that all batches share one shape (no recompilation) and metrics ignore padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from cxflax.data import folds as folds_lib
from cxflax.data.sources import Source, make_source
from cxflax.data.transforms import Preprocess
from cxflax.errors import ConfigError, DataError

BATCH_KEYS = ("image", "label", "index", "valid")


class _Examples:
  """grain random-access source over a subset of a Source's examples."""

  def __init__(self, source: Source, indices: Sequence[int]):
    self.source = source
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, j: int) -> dict[str, Any]:
    i = int(self.indices[j])
    ex = dict(self.source.load(i))
    ex["index"] = np.int64(i)
    return ex


class _EvalPositions:
  """This process's part of the padded evaluation order.

  Global position g holds example g (or, past the end, a copy of example g mod n marked invalid).
  Global batch k is positions [kG, (k+1)G); process p owns [kG + pL, kG + (p+1)L) of it.
  """

  def __init__(self, source: Source, indices, global_batch: int, process_index: int,
               process_count: int):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    self.global_batch, self.local_batch = global_batch, global_batch // process_count
    self.process_index = process_index
    self.num_batches = -(-len(self.indices) // global_batch)

  def __len__(self) -> int:
    return self.num_batches * self.local_batch

  def __getitem__(self, j: int) -> dict[str, Any]:
    k, r = divmod(j, self.local_batch)
    g = k * self.global_batch + self.process_index * self.local_batch + r
    i = int(self.indices[g % len(self.indices)])
    ex = dict(self.source.load(i))
    ex["index"] = np.int64(i)
    ex["valid"] = np.float32(g < len(self.indices))
    return ex


def _select(example: dict[str, Any]) -> dict[str, Any]:
  out = {k: example[k] for k in BATCH_KEYS if k in example}
  out.setdefault("valid", np.float32(1.0))
  return out


def train_dataset(source: Source, indices, *, pp: str, global_batch: int, seed: int,
                  workers: int = 0, process_index: int = 0, process_count: int = 1
                  ) -> grain.IterDataset:
  """Endless training batches of this process's share of `global_batch`, epoch after epoch."""
  local_batch = global_batch // process_count
  n = (len(indices) // process_count) * process_count
  if n // process_count < local_batch:
    raise DataError(f"training split has {len(indices)} examples, fewer than one batch of "
                    f"{global_batch}; lower config.batch_size")
  ds = grain.MapDataset.source(_Examples(source, indices)).seed(seed).shuffle()
  # Augment before splitting among processes: each element's random draw depends on its place
  # in the shuffled epoch only, so 1 process and N processes train on identical batches.
  ds = ds.random_map(Preprocess(pp))[:n][process_index::process_count].map(_select)
  ds = ds.batch(local_batch, drop_remainder=True).repeat(None)
  return _prefetch(ds, workers)


def eval_dataset(source: Source, indices, *, pp: str, global_batch: int, workers: int = 0,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """One pass over `indices` in padded batches (see the module docstring)."""
  if len(indices) == 0:
    raise DataError("the evaluation split is empty")
  positions = _EvalPositions(source, indices, global_batch, process_index, process_count)
  ds = grain.MapDataset.source(positions).seed(0).random_map(Preprocess(pp)).map(_select)
  return _prefetch(ds.batch(positions.local_batch), workers)


def _prefetch(ds: grain.MapDataset, workers: int) -> grain.IterDataset:
  """Batches made ahead of use: by `workers` processes, or by one background thread.

  The elements here are whole batches, so the buffers are counted in batches and kept small:
  reading far ahead only takes CPU from the train step.
  """
  if workers < 0:
    raise ConfigError(f"config.data.workers must be >= 0, got {workers}")
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
  return it


@dataclasses.dataclass
class Input:
  """Everything the loop needs from the data: sources, splits and dataset factories."""
  source: Source
  train_indices: np.ndarray
  eval_source: Source
  eval_indices: np.ndarray
  steps_per_epoch: int
  config: Any
  process_index: int = 0
  process_count: int = 1

  @property
  def task(self) -> str:
    return self.source.task

  @property
  def class_names(self):
    return self.source.class_names

  def train(self) -> grain.IterDataset:
    d = self.config.data
    return train_dataset(self.source, self.train_indices, pp=d.train_pp,
                         global_batch=self.config.batch_size, seed=self.config.seed,
                         workers=d.workers, process_index=self.process_index,
                         process_count=self.process_count)

  def eval(self) -> grain.IterDataset:
    d = self.config.data
    return eval_dataset(self.eval_source, self.eval_indices, pp=d.eval_pp,
                        global_batch=self.config.eval_batch_size, workers=d.workers,
                        process_index=self.process_index, process_count=self.process_count)

  def train_label_mean(self) -> float:
    return float(np.mean(self.source.labels()[self.train_indices]))

  def eval_labels(self) -> np.ndarray:
    return self.eval_source.labels()[self.eval_indices]


def create_input(config, process_index: int = 0, process_count: int = 1) -> Input:
  """Sources and splits from the config: train on all folds but `config.fold`, evaluate on it
  (or, with config.data.eval_split='val', on the source's own validation split)."""
  source = make_source(config.data, "train")
  if len(source) == 0:
    raise DataError("the training source has no examples")
  fold_of = folds_lib.group_kfold(source.subjects(), config.num_folds, seed=config.seed)
  train_idx, held_out = folds_lib.split_indices(fold_of, config.fold)
  if config.data.eval_split == "fold":
    eval_source, eval_idx = source, held_out
  elif config.data.eval_split == "val":
    eval_source = make_source(config.data, "val")
    eval_idx = np.arange(len(eval_source))
    train_idx = np.arange(len(source))
  else:
    raise ConfigError(f"config.data.eval_split must be 'fold' or 'val', got {config.data.eval_split!r}")
  steps = (len(train_idx) // process_count // (config.batch_size // process_count))
  if steps == 0:
    raise DataError(f"training split has {len(train_idx)} examples, fewer than one batch of "
                    f"{config.batch_size}; lower config.batch_size")
  return Input(source, train_idx, eval_source, eval_idx, steps, config, process_index, process_count)
