"""Cross-validation folds that never split a subject across folds."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cxflax.errors import ConfigError, DataError


def group_kfold(subjects: Sequence[str], num_folds: int, seed: int = 0) -> np.ndarray:
  """Fold index (0..num_folds-1) of each example; all examples of a subject share a fold.

  Like scikit-learn's GroupKFold, subjects go, largest first, to the fold with the fewest
  examples so far, which balances fold sizes; ties between equal-sized subjects are broken by a
  seeded shuffle so that different seeds give different folds.
  """
  if num_folds < 2:
    raise ConfigError(f"num_folds must be at least 2, got {num_folds}")
  names, inverse, counts = np.unique(np.asarray(subjects, dtype=object).astype(str),
                                     return_inverse=True, return_counts=True)
  if len(names) < num_folds:
    raise DataError(f"cannot make {num_folds} subject-grouped folds from {len(names)} subject(s)")
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(names))
  order = order[np.argsort(-counts[order], kind="stable")]
  sizes = np.zeros(num_folds, np.int64)
  subject_fold = np.empty(len(names), np.int64)
  for g in order:
    f = int(np.argmin(sizes))
    subject_fold[g] = f
    sizes[f] += counts[g]
  return subject_fold[inverse]


def split_indices(fold_of: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, held-out indices) for holding out fold `fold`."""
  num_folds = int(fold_of.max()) + 1
  if not 0 <= fold < num_folds:
    raise ConfigError(f"fold must be in 0..{num_folds - 1}, got {fold}")
  return np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
