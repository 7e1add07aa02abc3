"""Running an evaluation over a dataset, every example once: shared by training (every epoch and
at the end), eval, cv and predict. The task (cxflax/train/tasks.py) scores the result."""

from __future__ import annotations

import numpy as np

from cxflax import parallel


def run_evaluation(eval_step, variables, batches, mesh) -> dict[str, np.ndarray]:
  """Predictions, labels and example indices for every example of `batches`, padding removed."""
  parts: dict[str, list] = {"pred": [], "label": [], "index": []}
  for out in eval_step.outputs(variables, batches, mesh):
    keep = parallel.gather(out["valid"]) > 0
    for k in parts:
      parts[k].append(parallel.gather(out[k])[keep])
  return {k: np.concatenate(v) for k, v in parts.items()}
