"""grain input pipelines: shuffled, augmented training batches and padded evaluation batches.

Each process reads only its share of every global batch (``process_index::process_count``), so
the pipeline scales to many hosts; the train step assembles the global batch on the mesh.

Training: per-epoch shuffle (reseeded each epoch), per-element augmentation seeded by (seed,
epoch, index), batches with drop-remainder, epochs chained without end; the iterator's state is
checkpointed so that a resumed run sees exactly the batches an uninterrupted run sees.

Evaluation: every held-out example exactly once, the last batch padded with copies flagged
``valid = 0`` so that all batches share one shape (no recompilation) and metrics ignore padding.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
from typing import Any, Sequence

import grain
import numpy as np
from absl import flags, logging

from cxflax.data import folds as folds_lib
from cxflax.data.sources import ConcatSource, Source, make_source
from cxflax.data.sources.per_covid19 import severity_class
from cxflax.data.transforms import Preprocess
from cxflax.errors import ConfigError, DataError

# source_size: (H, W) of each image as stored, in evaluation batches only (masks are predicted at
# the model's size and written back at this one).
BATCH_KEYS = ("image", "label", "index", "valid", "source_size")


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
    ex["source_size"] = np.asarray(np.shape(ex["image"])[:2], np.int32)
    return ex


class _Augment(grain.transforms.RandomMap):
  """The preprocessing spec on one example; a failure names the example's file."""

  def __init__(self, source: Source, spec: str):
    self.source, self.spec, self.pp = source, spec, Preprocess(spec)

  def random_map(self, example, rng):
    try:
      return self.pp.random_map(example, rng)
    except (ValueError, TypeError, IndexError) as e:
      where = self.source.describe(int(example["index"]))
      raise DataError(f"{where}: preprocessing {self.spec!r} failed: {e}") from None


def _select(example: dict[str, Any], target: str = "label") -> dict[str, Any]:
  """The batch fields of an example; for segmentation the (augmented) mask is the label."""
  out = {k: example[k] for k in BATCH_KEYS if k in example}
  if target != "label":
    mask = np.asarray(example[target])
    out["label"] = (mask.reshape(mask.shape[:2]) > 0).astype(np.int32)
  out.setdefault("valid", np.float32(1.0))
  return out


def _selector(source: Source):
  return functools.partial(_select, target=source.key if source.task == "segmentation" else "label")


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
  ds = ds.random_map(_Augment(source, pp))[:n][process_index::process_count].map(_selector(source))
  ds = ds.batch(local_batch, drop_remainder=True).repeat(None)
  return _prefetch(ds, workers)


def eval_dataset(source: Source, indices, *, pp: str, global_batch: int, workers: int = 0,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """One pass over `indices` in padded batches (see the module docstring)."""
  if len(indices) == 0:
    raise DataError("the evaluation split is empty")
  positions = _EvalPositions(source, indices, global_batch, process_index, process_count)
  ds = grain.MapDataset.source(positions).seed(0).random_map(_Augment(source, pp)).map(_selector(source))
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
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app, use defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
                        worker_init_fn=_ignore_ctrl_c)
  return it


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
  """A terminal's Ctrl-C reaches every process of its group: the main process stops the run (with
  a checkpoint) and then its data workers; a worker interrupted on its own printed a traceback
  and left its shared memory behind."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclasses.dataclass
class Input:
  """Everything a mode needs from the data: sources, splits, the preprocessing specs as run
  (normalize('dataset') replaced by the training split's statistics) and dataset factories."""
  source: Source
  train_indices: np.ndarray
  eval_source: Source
  eval_indices: np.ndarray
  steps_per_epoch: int
  config: Any
  train_pp: str
  eval_pp: str
  process_index: int = 0
  process_count: int = 1

  @property
  def task(self) -> str:
    return self.source.task

  @property
  def class_names(self):
    return self.source.class_names

  def train(self) -> grain.IterDataset:
    return train_dataset(self.source, self.train_indices, pp=self.train_pp,
                         global_batch=self.config.batch_size, seed=self.config.seed,
                         workers=self.config.data.workers, process_index=self.process_index,
                         process_count=self.process_count)

  def image_shape(self) -> tuple[int, ...]:
    """The shape of one preprocessed image (H, W, C): what the model is initialised on."""
    ex = dict(self.eval_source.load(int(self.eval_indices[0])))
    ex["index"] = np.int64(self.eval_indices[0])
    return tuple(_Augment(self.eval_source, self.eval_pp).random_map(
        ex, np.random.default_rng(0))["image"].shape)

  def eval(self) -> grain.IterDataset:
    return eval_dataset(self.eval_source, self.eval_indices, pp=self.eval_pp,
                        global_batch=self.config.eval_batch_size, workers=self.config.data.workers,
                        process_index=self.process_index, process_count=self.process_count)


def create_input(config, process_index: int = 0, process_count: int = 1,
                 extra: Source | None = None) -> Input:
  """Sources and splits from the config: train on all folds but `config.fold` and evaluate on it
  (or, with config.data.eval_split='val'/'test', train on the source's training split and
  evaluate on its own validation/test split). normalize('dataset') in the preprocessing specs is
  replaced by the training split's statistics in the Input's specs (the config is left as it
  is). `extra` (pseudo-labelled examples) is added to
  the training examples of every fold and never evaluated."""
  d = config.data
  source, train_idx, eval_source, eval_idx = split_examples(config, extra)
  train_pp, eval_pp = d.train_pp, d.eval_pp
  if DATASET_NORM in train_pp.replace('"', "'") or DATASET_NORM in eval_pp.replace('"', "'"):
    mean, std = dataset_statistics(source, train_idx, eval_pp, d.stats_images, config.seed)
    literal = f"normalize({tuple(round(float(m), 6) for m in mean)}, {tuple(round(float(v), 6) for v in std)})"
    logging.info("normalize('dataset'): training-split statistics %s", literal)
    train_pp = train_pp.replace('"', "'").replace(DATASET_NORM, literal)
    eval_pp = eval_pp.replace('"', "'").replace(DATASET_NORM, literal)
  steps = (len(train_idx) // process_count // (config.batch_size // process_count))
  if steps == 0:
    raise DataError(f"training split has {len(train_idx)} examples, fewer than one batch of "
                    f"{config.batch_size}; lower config.batch_size")
  return Input(source, train_idx, eval_source, eval_idx, steps, config, train_pp, eval_pp,
               process_index, process_count)


def split_examples(config, extra: Source | None = None) -> tuple[Source, np.ndarray, Source, np.ndarray]:
  """(training source, training indices, evaluation source, evaluation indices): the folds of
  config.num_folds with config.fold held out, or (config.data.eval_split 'val' / 'test') the
  source's own split; `extra` joins the training examples."""
  d = config.data
  source = make_source(d, "train")
  if d.eval_split == "fold":
    fold_of = make_folds(source, config.num_folds, config.seed, d.stratify)
    train_idx, eval_idx = folds_lib.split_indices(fold_of, config.fold)
    eval_source = source
  elif d.eval_split in ("val", "test"):
    eval_source = make_source(d, d.eval_split)
    train_idx, eval_idx = np.arange(len(source)), np.arange(len(eval_source))
  else:
    raise ConfigError(f"config.data.eval_split must be 'fold', 'val' or 'test', got {d.eval_split!r}")
  if len(eval_idx) == 0:
    raise DataError(f"the evaluation split ({d.eval_split}) is empty")
  if extra is not None:
    offset = len(source)
    joined = ConcatSource(source, extra)
    eval_source = joined if eval_source is source else eval_source
    source = joined
    train_idx = np.concatenate([train_idx, offset + np.arange(len(extra))])
  return source, train_idx, eval_source, eval_idx


DATASET_NORM = "normalize('dataset')"


def make_folds(source: Source, num_folds: int, seed: int, stratify: str) -> np.ndarray:
  """Fold of each example: grouped by subject, stratified by class or severity (seeded), or with
  'none' scikit-learn's GroupKFold, which no seed changes (seed 000's folds)."""
  if stratify == "none":
    return folds_lib.group_kfold(source.subjects(), num_folds)
  if stratify != "auto":
    raise ConfigError(f"config.data.stratify must be 'auto' or 'none', got {stratify!r}")
  return folds_lib.stratified_group_kfold(source.subjects(), fold_strata(source), num_folds, seed=seed)


def fold_strata(source: Source) -> np.ndarray:
  """What folds are stratified by: the class, or the Per-COVID-19 severity category of an
  infection percentage (seed 001)."""
  labels = source.labels()
  if source.task == "classification":
    return labels.astype(np.int64)
  return np.array([severity_class(float(v)) for v in labels], np.int64)


def dataset_statistics(source: Source, indices, eval_pp: str, max_images: int, seed: int):
  """Per-channel mean and std of up to `max_images` training images after the evaluation
  preprocessing that precedes normalization (e.g. to_rgb|resize(512))."""
  ops = eval_pp.replace('"', "'").split("|")
  prefix = "|".join(op for op in ops[:next((i for i, op in enumerate(ops) if op.strip().startswith("normalize")), len(ops))])
  pp = Preprocess(prefix)
  rng = np.random.default_rng(seed)
  chosen = rng.choice(np.asarray(indices), min(len(indices), max_images), replace=False)
  total, total_sq, count = 0.0, 0.0, 0
  for i in chosen:
    img = pp.random_map(dict(source.load(int(i))), rng)["image"].astype(np.float64)
    total = total + img.sum(axis=(0, 1))
    total_sq = total_sq + (img ** 2).sum(axis=(0, 1))
    count += img.shape[0] * img.shape[1]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
  return mean, std
