"""The main job: python -m cxflax.main --config=configs/resnest.py --workdir=DIR [--mode=...].

--config takes a recipe file from configs/ (with an optional argument, e.g. ':runlocal') and
field overrides (--config.batch_size=16). Modes:
  train     trains (stage by stage) and evaluates every epoch, resuming from --workdir's latest
            checkpoint;
  eval      restores the latest checkpoint (or --checkpoint) and evaluates it;
  cv        trains every fold into --workdir/fold_K and writes per-fold and averaged metrics;
  ensemble  trains the ensemble stage (config.ensemble) on its members' checkpoints;
  predict   averages runs' (folds') and checkpoints' predictions for a split, written as CSV;
  lr_find   the learning-rate range test (CSV, PNG and a suggested rate);
  explain   Grad-CAM overlays (PNG, CSV, TensorBoard) of the latest checkpoint (or --checkpoint)
            for the evaluation split's first images (config.explain) or config.predict.images;
  describe  prints every stage's effective settings and writes them to --workdir/recipe.json.
"""

from __future__ import annotations

import gc
import logging as std_logging
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "cv", "ensemble", "predict", "lr_find",
                                             "describe", "explain"],
                          "What to run.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "--mode=eval / explain: a workdir, checkpoints/ folder or step folder "
                                  "to use instead of --workdir's latest checkpoint.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process runs: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")

flags.mark_flags_as_required(["config", "workdir"])


def _quiet_libraries(record) -> bool:
  """Keeps orbax's and grain's per-operation INFO chatter out of the log (warnings stay), and the
  tracebacks orbax logs with a failed save out of the user's way, with asyncio's for the save's
  tasks whose failure nobody retrieved: the error reaches them as cxflax's one `error:` line (a
  full disk: cxflax.train.workdir.checkpoint_writes). cxflax itself runs no asyncio."""
  noisy = ("/orbax/", "/grain/", "/jax/_src/xla_bridge", "/asyncio/")
  if not any(n in record.pathname for n in noisy):
    return True
  record.exc_info = record.exc_text = None
  return record.levelno >= std_logging.WARNING


def _quiet_checkpoint_leftovers(unraisable) -> None:
  """sys.unraisablehook: drops the unraisable exceptions raised in orbax's code and asyncio's
  'Event loop is closed'. They come from orbax's leftover asyncio work once a checkpoint save or
  restore has failed, a traceback apiece (eleven after a full disk here: tensorstore's late writes
  into the closed loop; after a damaged checkpoint, the abandoned reads), for a failure the user
  already has as cxflax's `error:` line. Any other exception is printed as Python prints it."""
  frames, tb = [], unraisable.exc_traceback
  while tb is not None:
    frames.append(tb.tb_frame.f_code)
    tb = tb.tb_next
  closed_loop = (isinstance(unraisable.exc_value, RuntimeError) and frames
                 and frames[-1].co_name == "_check_closed")
  if closed_loop or any("/orbax/" in code.co_filename for code in frames):
    return
  sys.__unraisablehook__(unraisable)


def run(mode: str, config, workdir: str, checkpoint: str | None = None):
  """Runs one mode of the job on a parsed config; bad input raises CxflaxError. (main() is this
  after flag parsing and distributed start-up, with CxflaxError turned into `error:` and exit 2;
  tests call it directly.) config.cpu_kernels holds for the whole run, before anything is traced;
  the previous setting is back afterwards."""
  from cxflax import config as config_lib, parallel
  from cxflax.errors import ConfigError
  from cxflax.models import xla_cpu

  for stage in config_lib.stage_configs(config_lib.finalize(config)):
    parallel.check_batch_sizes(stage)
  if config.cpu_kernels not in xla_cpu.MODES:
    raise ConfigError(f"config.cpu_kernels must be one of {xla_cpu.MODES}, got {config.cpu_kernels!r}")
  with xla_cpu.mode(config.cpu_kernels):
    return _run(mode, config, workdir, checkpoint)


def _run(mode: str, config, workdir: str, checkpoint: str | None):
  # Each mode imports what it needs (the train loop's modules only where it trains).
  from cxflax.errors import ConfigError
  from cxflax.train.workdir import prepare_workdir, workdir_lock

  if mode in ("train", "ensemble"):
    if mode == "ensemble" and not config.ensemble.kind:
      raise ConfigError("--mode=ensemble needs config.ensemble.kind and config.ensemble.members")
    # Training (and cv) writes checkpoints: one run per workdir. The other modes write only their
    # own result files, atomically, so they may run beside a training (eval of its checkpoints).
    # A workdir that cannot be used is told before the train loop's imports.
    with workdir_lock(prepare_workdir(workdir)):
      from cxflax.train import train
      return train.train_and_evaluate(config, workdir)
  if mode == "eval":
    from cxflax.train import evaluate
    return evaluate.evaluate(config, workdir, checkpoint)
  if mode == "cv":
    from cxflax.train import evaluate
    with workdir_lock(prepare_workdir(workdir)):
      return evaluate.cross_validate(config, workdir)
  if mode == "predict":
    from cxflax.train import predict
    return predict.predict(config, workdir)
  if mode == "lr_find":
    from cxflax.train import lr_find
    return lr_find.lr_find(config, workdir)
  if mode == "describe":
    from cxflax.train import describe
    return describe.describe(config, workdir)
  if mode == "explain":
    from cxflax.train import explain
    return explain.explain(config, workdir, checkpoint)
  raise ConfigError(f"unknown mode {mode!r}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().python_handler.addFilter(_quiet_libraries)
  sys.unraisablehook = _quiet_checkpoint_leftovers
  # Imported here so that --help is fast and jax starts after absl has parsed the flags.
  import jax
  from cxflax import parallel

  parallel.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("cxflax %s on %d process(es), %d device(s): %s", _MODE.value, jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  code = 0
  try:
    run(_MODE.value, _CONFIG.value, _WORKDIR.value, _CHECKPOINT.value)
  except KeyboardInterrupt as e:  # Ctrl-C: after a checkpoint (Interrupted, announced), or at once
    from cxflax.errors import CxflaxError, Interrupted
    message = parallel.share_failure(CxflaxError(  # (the other processes of a run stop too)
        "interrupted (Ctrl-C); a training run resumes from its last complete checkpoint with the same command"))
    if not isinstance(e, Interrupted):
      logging.error("%s", message)
      print(f"error: {message}", file=sys.stderr)
    code = 130
  except Exception as e:  # in a multi-process run, any failure must also stop the other processes
    message = parallel.share_failure(e)
    if message is None:  # a bug: its traceback
      raise
    logging.error("%s", message)
    print(f"error: {message}", file=sys.stderr)
    code = 2
  _release_shared_batches()
  if code:
    sys.exit(code)
  parallel.stop_watching()


def _release_shared_batches() -> None:
  """Frees the batches that grain's data workers handed over in shared memory, while the
  interpreter can still unlink them (at exit it no longer could, and Python's resource tracker
  reported them as leaked): those still held by reference cycles (and, after a failure, by its
  traceback's frames, released once the except clause is left), and those whose deletion grain
  had queued on its background thread (SharedMemoryArray's async deletion, which its
  multiprocess prefetch turns on): a Ctrl-C run with a data worker, stopped at an epoch's end,
  once reported one such segment as leaked."""
  gc.collect()
  shm = sys.modules.get("grain._src.python.ipc.shared_memory_array")  # (only if grain was used)
  pool = getattr(getattr(shm, "SharedMemoryArray", None), "_del_thread_pool", None)
  if pool is not None:
    shm.SharedMemoryArray._del_thread_pool = None  # deletions from here on happen at once
    pool.close()
    pool.join()  # the queued ones are done


def describe_flag_error(error: Exception, argv) -> str:
  """One line for a flag that could not be parsed: absl's message, or for a bad --config (a
  missing file, a recipe argument it refuses, an override of a field the config lacks) the cause
  that ml_collections wraps in other exceptions."""
  root = error
  while (root.__cause__ or root.__context__) is not None:
    root = root.__cause__ or root.__context__
  if isinstance(root, KeyError):  # ml_collections: an override of a field the config lacks
    name = str(root).strip("'\"")
    given = [a.split("=")[0] for a in argv[1:] if a.split("=")[0].endswith(f".{name}")]
    return (f"{given[0] if given else '--config.' + name}: the config has no field {name!r} "
            "(cxflax/config.py lists them)")
  lines = str(root).strip().splitlines()
  message = lines[-1].strip() if lines else type(root).__name__
  if isinstance(root, OSError):  # the recipe file could not be read
    return f"--config: {message}"
  flag = re.match(r"flag (--\S+): ", str(error))  # absl names the flag it refused
  return f"{flag.group(1)}: {message}" if flag and flag.group(1) not in message else message


def _parse_flags(argv):
  """absl's flag parsing, with any refusal reported as one `error:` line and exit code 2."""
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.to_dict()  # a recipe that failed to load raises here (ml_collections defers it)
    return rest
  except Exception as e:  # absl's flag errors, and whatever loading the recipe file raises
    print(f"error: {describe_flag_error(e, argv)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
