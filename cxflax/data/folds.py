"""Cross-validation folds that never split a subject across folds, optionally stratified."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cxflax.errors import ConfigError, DataError


def group_kfold(subjects: Sequence[str], num_folds: int) -> np.ndarray:
  """Fold index (0..num_folds-1) of each example: fold k holds the examples scikit-learn's
  GroupKFold(num_folds) tests in its k-th split, grouped by subject (seed 000's folds).

  GroupKFold is unshuffled, as the authors ran it (no seed changes the folds): subjects go,
  largest first, to the fold with the fewest examples so far, and subjects of equal size are
  taken in reverse order of their sorted ids. That order is why the subjects are compared as the
  authors' pandas read their table: as integers when every id is one ('10' after '9').
  """
  from sklearn.model_selection import GroupKFold  # imported here: only seed 000's folds need it
  if num_folds < 2:
    raise ConfigError(f"num_folds must be at least 2, got {num_folds}")
  groups = np.asarray(subjects, dtype=object).astype(str)
  if len(np.unique(groups)) < num_folds:
    raise DataError(f"cannot make {num_folds} subject-grouped folds from {len(np.unique(groups))} subject(s)")
  if all(g.strip().lstrip("+-").isdigit() for g in groups):
    as_int = groups.astype(np.int64)
    if len(np.unique(as_int)) == len(np.unique(groups)):  # '07' and '7' stay two subjects
      groups = as_int
  fold_of = np.empty(len(groups), np.int64)
  for k, (_, held_out) in enumerate(GroupKFold(n_splits=num_folds).split(groups, groups=groups)):
    fold_of[held_out] = k
  return fold_of


def stratified_group_kfold(subjects: Sequence[str], strata: Sequence[int], num_folds: int,
                           seed: int = 0) -> np.ndarray:
  """Fold index of each example: subjects kept whole, and the distribution of `strata` (class,
  or severity category) made as even across folds as subjects allow.

  The greedy procedure of scikit-learn's StratifiedGroupKFold: subjects in a seeded random
  order, those with the most uneven strata first, each placed in the fold that keeps the
  per-stratum spread across folds smallest (ties: the fold with fewest examples).
  """
  if num_folds < 2:
    raise ConfigError(f"num_folds must be at least 2, got {num_folds}")
  strata = np.asarray(strata, np.int64)
  names, inverse = np.unique(np.asarray(subjects, dtype=object).astype(str), return_inverse=True)
  if len(names) < num_folds:
    raise DataError(f"cannot make {num_folds} subject-grouped folds from {len(names)} subject(s)")
  _, strata_idx = np.unique(strata, return_inverse=True)
  k = int(strata_idx.max()) + 1
  per_subject = np.zeros((len(names), k), np.int64)
  np.add.at(per_subject, (inverse, strata_idx), 1)
  totals = per_subject.sum(0)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(names))
  order = order[np.argsort(-np.std(per_subject[order], axis=1), kind="stable")]
  per_fold = np.zeros((num_folds, k), np.int64)
  subject_fold = np.empty(len(names), np.int64)
  for g in order:
    best, best_key = 0, None
    for f in range(num_folds):
      per_fold[f] += per_subject[g]
      spread = float(np.mean(np.std(per_fold / totals, axis=0)))
      per_fold[f] -= per_subject[g]
      key = (spread, per_fold[f].sum())
      if best_key is None or key < best_key:
        best, best_key = f, key
    per_fold[best] += per_subject[g]
    subject_fold[g] = best
  return subject_fold[inverse]


def split_indices(fold_of: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, held-out indices) for holding out fold `fold`."""
  num_folds = int(fold_of.max()) + 1
  if not 0 <= fold < num_folds:
    raise ConfigError(f"fold must be in 0..{num_folds - 1}, got {fold}")
  return np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
