"""Filesystem faults end in clear errors naming the path and lose nothing: an uncreatable or
unwritable workdir is refused before any data is loaded, results are written atomically, a full
disk at checkpoint or result time stops the run with what was saved intact, cv retrains a fold
whose result cannot be read, and a second run on a workdir is refused while the first holds it."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from cxflax.errors import ConfigError, WorkdirError
from cxflax.train import checkpoint as ckpt_lib
from cxflax.train import workdir as workdir_lib
from cxflax.files import atomic_file
from cxflax.train.workdir import LOCK_FILE, prepare_workdir, workdir_lock, write_json
from tests.conftest import REPO, TINY_RUN, main_after, read_json, run_main, run_python


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
  """Writes past `nbytes` fail in this process as the kernel fails them (EFBIG), root or not: a
  disk that fills up mid-write, without a mount."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal's kill
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def _no_data_loading(monkeypatch):
  """Makes every mode's first read of the data fail loudly, so that an error raised instead
  shows that it came first."""
  def loaded(*args, **kwargs):
    raise AssertionError("data was loaded before the workdir was checked")
  from cxflax.train import build, evaluate, explain, predict, train
  for module, name in ((build, "create_input"), (train, "create_input"), (train, "pseudo_labelled"),
                       (evaluate, "create_input"), (predict, "make_source"), (predict, "image_folder"),
                       (explain, "image_folder"), (build, "load_run")):
    monkeypatch.setattr(module, name, loaded)


@pytest.mark.parametrize("mode", ["train", "cv", "eval", "predict", "lr_find", "describe", "explain"])
def test_an_uncreatable_workdir_is_refused_before_any_data_is_read(tmp_path, monkeypatch, mode):
  _no_data_loading(monkeypatch)
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(WorkdirError, match=f"cannot create --workdir {blocker}/run: Not a directory"):
    run_main(blocker / "run", mode=mode)


def test_an_unwritable_workdir_is_refused_with_its_path():
  # /proc exists and is a directory in which nobody, root included, can create a file.
  with pytest.raises(WorkdirError, match="cannot write to --workdir /proc: "):
    prepare_workdir("/proc")
  with pytest.raises(ConfigError, match="is not a directory"):  # as before: a file is a config error
    prepare_workdir(REPO + "/README.md")


def test_a_json_result_cut_short_by_a_full_disk_leaves_the_previous_one(tmp_path):
  write_json(str(tmp_path), "metrics.json", {"mae": 1.5})
  big = {"values": np.random.default_rng(0).normal(size=20000).tolist()}  # ~400 kB of JSON
  with _file_size_limit(64 << 10), pytest.raises(WorkdirError) as e:
    write_json(str(tmp_path), "metrics.json", big)
  assert str(e.value) == (f"cannot write {tmp_path}/metrics.json: File too large (EFBIG) "
                          "(the previous file is left as it was)")
  assert read_json(tmp_path, "metrics.json") == {"mae": 1.5}
  assert os.listdir(tmp_path) == ["metrics.json"]  # no temporary file behind
  write_json(str(tmp_path), "metrics.json", big)  # with room, the whole of it
  assert read_json(tmp_path, "metrics.json") == big


def test_a_failure_mid_serialisation_leaves_the_previous_file_and_no_temporary(tmp_path):
  write_json(str(tmp_path), "metrics.json", {"mae": 1.5})
  with pytest.raises(TypeError):  # a value json cannot write, met after part of the file was written
    write_json(str(tmp_path), "metrics.json", {"mae": 2.5, "extra": object()})
  assert read_json(tmp_path, "metrics.json") == {"mae": 1.5}
  assert os.listdir(tmp_path) == ["metrics.json"]


def test_predictions_csv_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
  """predict's CSV goes through the same atomic writer: a full disk at the final sync (where NFS
  and quota-limited disks report it) keeps the previous predictions and names the file."""
  from cxflax.train.predict import _write_predictions

  class Source:
    class_names = ("normal", "covid19")

    def example_name(self, i):
      return f"img_{i}.png"

  path = str(tmp_path / "predictions_val.csv")
  _write_predictions(path, Source(), np.array([[0.9, 0.1], [0.2, 0.8]]), False)
  before = open(path).read()
  assert before == "img_0.png,normal,0.900000,0.100000\nimg_1.png,covid19,0.200000,0.800000\n"

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(workdir_lib.os, "fsync", full)
  with pytest.raises(WorkdirError, match=f"cannot write {path}: No space left on device \\(ENOSPC\\)"):
    _write_predictions(path, Source(), np.array([[0.4, 0.6], [0.7, 0.3]]), False)
  assert open(path).read() == before
  assert os.listdir(tmp_path) == ["predictions_val.csv"]


def test_atomic_file_writes_binary_files_too(tmp_path):
  path = str(tmp_path / "plot.png")
  with atomic_file(path, "wb") as f:
    f.write(b"\x89PNG")
  with pytest.raises(RuntimeError), atomic_file(path, "wb") as f:
    f.write(b"half")
    raise RuntimeError("the plot failed")
  assert open(path, "rb").read() == b"\x89PNG" and os.listdir(tmp_path) == ["plot.png"]


def test_export_on_a_full_disk_is_an_error_line_naming_the_file(tmp_path, capsys):
  """`python -m cxflax.data.export` out of room mid-image: one `error:` line naming the image,
  exit code 2, and no temporary or truncated image left in the layout it was writing."""
  from cxflax.data import export
  from cxflax.data.images import read_image
  out = tmp_path / "covid_ct"
  with _file_size_limit(600), pytest.raises(SystemExit) as e:  # a 32 px phantom PNG is ~1 kB
    export.main(["covid_ct", "--out", str(out), "--subjects", "2", "--size", "32"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert re.fullmatch(rf"error: cannot write {out}/Images-processed/CT_\w+/0%0.png: File too large \(EFBIG\)\n",
                      err), err
  left = [os.path.join(d, f) for d, _, names in os.walk(out) for f in names]
  assert left == []
  export.main(["covid_ct", "--out", str(out), "--subjects", "2", "--size", "32"])  # with room, all of it
  images = [os.path.join(d, f) for d, _, names in os.walk(out) for f in names if f.endswith(".png")]
  assert len(images) >= 4 and all(read_image(p).shape == (32, 32, 1) for p in images)
  assert not [f for _, _, names in os.walk(out) for f in names if f.endswith(".tmp")]


def test_checkpoint_write_errors_name_the_checkpoint_directory():
  """orbax's tensorstore reports a failed write as a ValueError carrying the OS error code."""
  message = ('OUT_OF_RANGE: Error writing "params.w/0" in OCDBT database at local file "/w/checkpoints/5.orbax'
             '-checkpoint-tmp/model.orbax-checkpoint-tmp/ocdbt.process_0/": Failed to write 9428992 bytes to '
             "file 5: No space left on device [os_error_code='28']")
  with pytest.raises(WorkdirError, match=r"^cannot write a checkpoint to /w/checkpoints: No space left on "
                                         r"device \(ENOSPC\); the last complete checkpoint is kept"):
    with workdir_lib.checkpoint_writes("/w/checkpoints"):
      raise ValueError(message)
  with pytest.raises(WorkdirError, match=r"/w/checkpoints: Read-only file system \(EROFS\)"):
    with workdir_lib.checkpoint_writes("/w/checkpoints"):
      raise OSError(errno.EROFS, "Read-only file system")
  with pytest.raises(ValueError, match="shapes differ"):  # anything else is left as it is
    with workdir_lib.checkpoint_writes("/w/checkpoints"):
      raise ValueError("shapes differ")


# --- the workdir lock ---------------------------------------------------------------------------------


def _write_lock(workdir, pid, host):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK_FILE), "w") as f:
    json.dump({"pid": pid, "host": host}, f)


def test_a_workdir_held_by_a_live_run_is_refused(tmp_path, monkeypatch):
  """The second of two runs on a workdir is refused before it reads anything, with the lock
  file, the first run's pid and host and how to remove a stale lock; the lock is left alone."""
  _no_data_loading(monkeypatch)
  wd, host = tmp_path / "w", socket.gethostname()
  first = subprocess.Popen(["sleep", "60"])
  try:
    _write_lock(wd, first.pid, host)
    lock = os.path.join(wd, LOCK_FILE)
    for mode in ("train", "ensemble", "cv"):
      with pytest.raises(WorkdirError) as e:
        run_main(wd, "--config.ensemble.kind=average", mode=mode)
      assert str(e.value) == (f"{wd} is in use by another run: lock file {lock} holds pid {first.pid} on "
                              f"host {host}. Wait for that run to end, or, if it is no longer running, "
                              f"remove {lock}")
    assert json.load(open(lock)) == {"pid": first.pid, "host": host}
  finally:
    first.kill()
    first.wait()


def test_a_lock_from_another_host_is_refused_whatever_its_pid(tmp_path):
  _write_lock(tmp_path, os.getpid(), "gpu-node-7")
  with pytest.raises(WorkdirError, match=f"holds pid {os.getpid()} on host gpu-node-7"):
    with workdir_lock(str(tmp_path)):
      pass


def test_a_stale_lock_is_replaced_with_a_warning_and_released_after(tmp_path):
  gone = subprocess.Popen(["true"])
  gone.wait()
  _write_lock(tmp_path, gone.pid, socket.gethostname())
  lock = os.path.join(tmp_path, LOCK_FILE)
  warnings: list[str] = []

  class Collect(logging.Handler):
    def emit(self, record):
      warnings.append(record.getMessage())
  handler, logger = Collect(logging.WARNING), logging.getLogger("absl")
  logger.addHandler(handler)
  try:
    with workdir_lock(str(tmp_path)):
      assert json.load(open(lock)) == {"pid": os.getpid(), "host": socket.gethostname()}
      with pytest.raises(WorkdirError, match="already locked by this process"):  # no second holder
        with workdir_lock(str(tmp_path)):
          pass
  finally:
    logger.removeHandler(handler)
  assert warnings == [f"replacing the stale lock {lock} ({{'pid': {gone.pid}, 'host': '{socket.gethostname()}'}}): "
                      "its process is no longer running"]
  assert os.listdir(tmp_path) == []


def test_the_lock_works_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
  def no_links(src, dst):
    raise OSError(errno.EPERM, "Operation not permitted")
  monkeypatch.setattr(workdir_lib.os, "link", no_links)
  lock = str(tmp_path / LOCK_FILE)
  with workdir_lock(str(tmp_path)):
    assert read_json(lock) == {"pid": os.getpid(), "host": socket.gethostname()}
    assert os.listdir(tmp_path) == [LOCK_FILE]
    with pytest.raises(FileExistsError):  # still created only where there is none
      workdir_lib._create_exclusive(lock + ".x", lock, {"pid": 1, "host": "h"})
  assert os.listdir(tmp_path) == []


def test_the_lock_is_released_when_the_run_fails(tmp_path):
  with pytest.raises(ConfigError), workdir_lock(str(tmp_path)):
    raise ConfigError("a bad setting found mid-run")
  assert os.listdir(tmp_path) == []
  with workdir_lock(str(tmp_path)):  # and can be taken again
    pass


# --- runs ---------------------------------------------------------------------------------------------


def test_halt_and_a_full_disk_at_result_time_lose_nothing(tmp_path, monkeypatch):
  """A halted run releases its lock; a run whose final results cannot be written (the disk full
  at the last moment) stops with an error naming the file, keeps its checkpoints (the same
  command then only evaluates the last one) and releases its lock."""
  wd = tmp_path / "w"
  args = (*TINY_RUN, "--config.num_epochs=1", "--config.data.phantom.num_subjects=8",
          "--config.schedule.name=constant")  # 2 steps
  halted = run_main(wd, *args, "--config.halt_after_steps=1")
  assert "halted at step 1" in halted.stdout and not os.path.exists(wd / LOCK_FILE)

  real_fsync = os.fsync

  def full_at_results(fd):
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".final_metrics.json."):
      raise OSError(errno.ENOSPC, "No space left on device")
    real_fsync(fd)
  monkeypatch.setattr(workdir_lib.os, "fsync", full_at_results)
  with pytest.raises(WorkdirError, match=f"^cannot write {wd}/final_metrics.json: No space left on device"):
    run_main(wd, *args)
  assert ckpt_lib.Checkpoints(ckpt_lib.checkpoint_dir(str(wd)), create=False).all_steps() == [1, 2]
  assert not os.path.exists(wd / LOCK_FILE)
  assert not [f for f in os.listdir(wd) if "final_metrics" in f]  # neither the file nor a temporary


def test_cv_retrains_a_fold_whose_result_cannot_be_read_and_stops_when_preempted(tmp_path, monkeypatch):
  """A truncated fold result counts as unfinished: it is moved aside and the fold trained. SIGTERM
  during that fold stops the whole cross-validation (no later fold, no cv_metrics.json) with its
  checkpoint saved, and every lock released."""
  import threading
  from cxflax.train import train
  cv = tmp_path / "cv"
  os.makedirs(cv / "fold_0")
  os.makedirs(cv / "fold_1")
  with open(cv / "fold_0" / "final_metrics.json", "w") as f:
    json.dump({"step": 10, "metrics": {"mae": 3.0, "rmse": 4.0}}, f)
  with open(cv / "fold_1" / "final_metrics.json", "w") as f:
    f.write('{"step": 10, "metrics": {"mae": 2.')  # cut short

  check_finite = train._check_finite

  def preempt_at_first_check(steps, policy):  # SIGTERM as SLURM sends it, once the run is under way
    assert threading.current_thread() is threading.main_thread()
    assert getattr(signal.getsignal(signal.SIGTERM), "__self__", None).__class__ is train.Preemption
    if not preempt_at_first_check.sent:
      preempt_at_first_check.sent = True
      os.kill(os.getpid(), signal.SIGTERM)
    return check_finite(steps, policy)
  preempt_at_first_check.sent = False
  monkeypatch.setattr(train, "_check_finite", preempt_at_first_check)
  run = run_main(cv, *TINY_RUN, "--config.num_folds=3", mode="cv")

  assert run.result is None
  assert "fold 0 already trained" in run.log
  assert f"{cv}/fold_1/final_metrics.json cannot be read (JSONDecodeError" in run.log
  assert open(cv / "fold_1" / "final_metrics.json.unreadable").read() == '{"step": 10, "metrics": {"mae": 2.'
  step = int(run.stdout.split("preempted at step ")[1].split()[0])
  assert ckpt_lib.Checkpoints(ckpt_lib.checkpoint_dir(str(cv / "fold_1")), create=False).all_steps() == [step]
  assert "cross-validation stopped in fold 1 of 3; run the same command again to resume" in run.stdout
  assert not os.path.exists(cv / "fold_2") and not os.path.exists(cv / "cv_metrics.json")
  assert not os.path.exists(cv / LOCK_FILE) and not os.path.exists(cv / "fold_1" / LOCK_FILE)


def test_a_disk_that_fills_during_training_stops_it_at_the_next_save(tmp_path):
  """The kernel refuses the checkpoint's writes inside orbax's background save (from the first
  save on, writes past 4 MB fail: the model's arrays are ~20 MB): the command stops at its next
  save with one `error:` line naming the checkpoint directory and exit code 2, no traceback (orbax
  logs one, asyncio one for a failed task, and tensorstore's late writes into orbax's closed
  event loop printed eleven), no committed step and no lock left behind. (The limit is set once
  the steps are compiled, so that no compilation cache entry is cut.)"""
  wd = tmp_path / "w"
  # Two epochs of 2 steps: the checkpoint at step 2 fails in the background, the save at step 4
  # reports it.
  filling = ("import resource, signal\n"
             "from cxflax.train import checkpoint as ckpt_lib\n"
             "save = ckpt_lib.Checkpoints.save\n"
             "def filling(self, *args, **kwargs):\n"
             "  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal's kill\n"
             "  resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
             "  return save(self, *args, **kwargs)\n"
             "ckpt_lib.Checkpoints.save = filling\n")
  proc = run_python(main_after(filling, wd, *TINY_RUN, "--config.data.phantom.num_subjects=8"))
  checkpoints = ckpt_lib.checkpoint_dir(str(wd))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
      f"error: cannot write a checkpoint to {checkpoints}: File too large (EFBIG); the last complete "
      "checkpoint is kept: free space, then run the same command again to resume from it"]
  assert ckpt_lib.Checkpoints(checkpoints, create=False).all_steps() == []
  assert not os.path.exists(wd / LOCK_FILE)


def test_only_orbaxs_leftover_unraisable_errors_are_dropped(capsys, monkeypatch):
  """main's sys.unraisablehook drops asyncio's 'Event loop is closed' (above) and exceptions raised
  in orbax's code (its abandoned reads of a damaged checkpoint: test_checkpoint_faults.py), and
  prints any other unraisable exception as Python does."""
  import asyncio
  import gc
  from cxflax.main import _quiet_checkpoint_leftovers
  monkeypatch.setattr(sys, "unraisablehook", _quiet_checkpoint_leftovers)
  loop = asyncio.new_event_loop()
  loop.close()
  orbax = {}
  exec(compile("def read():\n  raise Exception('Encountered error while reading array index')\n",
               "/site-packages/orbax/checkpoint/serialization.py", "exec"), orbax)

  class Raises:  # an exception in __del__ is unraisable: Python hands it to the hook
    def __init__(self, call):
      self.call = call

    def __del__(self):
      self.call()

  for dropped in (lambda: loop.call_soon_threadsafe(print), orbax["read"]):
    Raises(dropped)
    gc.collect()
    assert capsys.readouterr().err == ""
  Raises(lambda: 1 / 0)
  gc.collect()
  err = capsys.readouterr().err
  assert "Traceback" in err and "ZeroDivisionError" in err


def test_orbax_tracebacks_are_left_out_of_the_log():
  """A failed save makes orbax log the exception with its traceback; the user gets cxflax's one
  `error:` line instead (orbax's message stays). cxflax's own records are left as they are."""
  from cxflax.main import _quiet_libraries
  try:
    raise ValueError("Failed writing: ... [os_error_code='28']")
  except ValueError:
    exc_info = sys.exc_info()
  orbax = logging.LogRecord("absl", logging.ERROR, "/x/orbax/checkpoint/checkpoint_manager.py", 1,
                            "Save Finalize thread failed.", None, exc_info)
  assert _quiet_libraries(orbax) and orbax.exc_info is None
  # asyncio's report of a save's task that failed after the save was given up
  late = logging.LogRecord("asyncio", logging.ERROR, "/usr/lib/python3.11/asyncio/base_events.py", 1,
                           "Task exception was never retrieved", None, exc_info)
  assert _quiet_libraries(late) and late.exc_info is None
  assert not _quiet_libraries(logging.LogRecord("absl", logging.INFO, "/x/orbax/a.py", 1, "chatter", None, None))
  own = logging.LogRecord("absl", logging.ERROR, "/x/cxflax/main.py", 1, "message", None, exc_info)
  assert _quiet_libraries(own) and own.exc_info is exc_info


def test_an_uncreatable_workdir_is_an_error_line_and_exit_code_2(tmp_path):
  """An unusable --workdir is one error line and exit code 2, told at once: before the training
  modules import TensorFlow (~7 s here)."""
  (tmp_path / "a_file").write_text("x")
  tells_tensorflow = "import atexit, sys\natexit.register(lambda: print('tensorflow' in sys.modules))\n"
  proc = run_python(main_after(tells_tensorflow, tmp_path / "a_file" / "run"))
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert f"error: cannot create --workdir {tmp_path}/a_file/run: Not a directory (ENOTDIR)" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stdout.strip() == "False"
