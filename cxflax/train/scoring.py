"""Running an evaluation over a dataset, every example once: shared by training (every epoch and
at the end), eval, cv and predict. The task (cxflax/train/tasks.py) scores the result."""

from __future__ import annotations

import numpy as np

from cxflax import parallel
from cxflax.errors import DivergenceError


def run_evaluation(eval_step, variables, batches, mesh) -> dict[str, np.ndarray]:
  """Predictions, labels and example indices for every example of `batches`, padding removed;
  non-finite predictions are a DivergenceError, never a metric."""
  parts: dict[str, list] = {"pred": [], "label": [], "index": []}
  for out in eval_step.outputs(variables, batches, mesh):
    keep = parallel.gather(out["valid"]) > 0
    for k in parts:
      parts[k].append(parallel.gather(out[k])[keep])
  out = {k: np.concatenate(v) for k, v in parts.items()}
  bad = ~np.isfinite(out["pred"].reshape(len(out["pred"]), -1)).all(axis=1)
  if bad.any():  # NaN probabilities would otherwise become class 0 through argmax
    raise DivergenceError(f"the model predicts non-finite values for {int(bad.sum())} of {len(bad)} "
                          f"examples (e.g. example {int(out['index'][bad][0])}); its parameters have "
                          "diverged or overflowed (config.dtype?)")
  return out
