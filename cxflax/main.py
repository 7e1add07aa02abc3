"""The main job: python -m cxflax.main --config=configs/resnest.py --workdir=DIR [--mode=...].

--config takes a recipe file from configs/ (with an optional argument, e.g. ':runlocal') and
field overrides (--config.batch_size=16). Modes:
  train     trains (stage by stage) and evaluates every epoch, resuming from --workdir's latest
            checkpoint;
  eval      restores the latest checkpoint (or --checkpoint) and evaluates it;
  cv        trains every fold into --workdir/fold_K and writes per-fold and averaged metrics;
  ensemble  trains the ensemble stage (config.ensemble) on its members' checkpoints;
  predict   averages runs' (folds') and checkpoints' predictions for a split, written as CSV;
  lr_find   the learning-rate range test (CSV, PNG and a suggested rate).
"""

from __future__ import annotations

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "cv", "ensemble", "predict", "lr_find"],
                          "What to run.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "--mode=eval: a workdir, checkpoints/ folder or step folder to "
                                  "evaluate instead of --workdir's latest checkpoint.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process runs: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")

flags.mark_flags_as_required(["config", "workdir"])


def _quiet_libraries(record) -> bool:
  """Keeps orbax's and grain's per-operation INFO chatter out of the log (warnings stay)."""
  noisy = ("/orbax/", "/grain/", "/jax/_src/xla_bridge")
  return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in noisy)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().python_handler.addFilter(_quiet_libraries)
  # Imported here so that --help is fast and jax starts after absl has parsed the flags.
  import jax
  from cxflax import parallel
  from cxflax.errors import ConfigError, CxflaxError
  from cxflax.train import loop

  parallel.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("cxflax %s on %d process(es), %d device(s): %s", _MODE.value, jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  try:
    if mode in ("train", "ensemble"):
      if mode == "ensemble" and not config.ensemble.kind:
        raise ConfigError("--mode=ensemble needs config.ensemble.kind and config.ensemble.members")
      loop.train_and_evaluate(config, workdir)
    elif mode == "eval":
      loop.evaluate(config, workdir, _CHECKPOINT.value)
    elif mode == "cv":
      loop.cross_validate(config, workdir)
    elif mode == "predict":
      loop.predict(config, workdir)
    else:
      loop.lr_find(config, workdir)
  except CxflaxError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
