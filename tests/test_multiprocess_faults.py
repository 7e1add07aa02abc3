"""Many processes: when one fails, every process stops within a bounded time and says which one
failed and why, instead of waiting in a collective for a peer that will never answer."""

import os
import sys
import threading
import types

import jax
import numpy as np
import pytest

from cxflax import parallel
from cxflax.config import finalize
from cxflax.data import export
from cxflax.data.pipeline import create_input
from tests.conftest import TINY, TINY_RUN, load_config, main_args, python_env, reserved_port, run_processes


@pytest.fixture
def watch(monkeypatch):
  """parallel's failure watch on a real coordination service (jax's key-value store, one task),
  in this process; what the watch thread calls to end a process (jax.distributed.shutdown, then
  os._exit) is recorded in w.ended instead."""
  from jax._src.lib import _jax
  with reserved_port() as port:
    service = _jax.get_distributed_runtime_service(f"[::]:{port}", 1)
  client = _jax.get_distributed_runtime_client(f"127.0.0.1:{port}", 0)
  client.connect()
  w = parallel._Watch(client)
  w.ended = []
  monkeypatch.setattr(parallel, "_watch", w)
  monkeypatch.setattr(jax.distributed, "shutdown", lambda: w.ended.append("shutdown"))
  exit_ = lambda code: w.ended.append(f"exit {code}")
  monkeypatch.setattr(parallel, "os", types.SimpleNamespace(_exit=exit_))
  yield w
  client.shutdown()
  service.shutdown()


def test_a_bug_is_published_and_left_to_raise(watch):
  assert parallel.share_failure(ZeroDivisionError("division by zero")) is None  # main re-raises
  assert watch.client.key_value_try_get(parallel._FAILURE_KEY) == (
      "process 0 of 1 failed: ZeroDivisionError: division by zero")


def test_an_error_after_another_process_failed_reports_that_failure(watch):
  """A collective that lost its peer fails with gloo's words; what the user needs is the peer's."""
  first = "process 1 of 2 failed: x.png: cannot decode image"
  watch.client.key_value_set(parallel._FAILURE_KEY, first)
  assert parallel.share_failure(RuntimeError("Gloo all-reduce failed")) == f"{first}; process 0 stopped too"


@pytest.mark.parametrize("finished", [False, True])
def test_the_watch_reports_another_process_failure_unless_finished(watch, capfd, finished):
  watch.thread = threading.Thread(target=parallel._wait_for_failure, args=(watch,), daemon=True)
  watch.thread.start()
  if finished:
    parallel.stop_watching()
    assert not watch.thread.is_alive()  # joined: no thread inside the client at interpreter exit
  # What process 1's share_failure does: publish, then wake the others.
  watch.client.key_value_set(parallel._FAILURE_KEY, "process 1 of 2 failed: x.png: cannot decode image")
  parallel._wake(0, "process 1 of 2 failed: x.png: cannot decode image")
  watch.thread.join(30)
  assert not watch.thread.is_alive()
  errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error: ")]
  if finished:
    assert errors == [] and watch.ended == []
  else:
    assert errors == ["error: process 1 of 2 failed: x.png: cannot decode image; process 0 stopped too"]
    assert watch.ended == ["shutdown", "exit 2"]


# argv: coordinator, process id, what it does: "end" (its run ends; process 0 then says so in the
# key-value store), "fail" (process 1: fails once process 0 has said so), or "end_in_failure"
# (process 0: says so first, and its run ends while its watch thread is ending it for that failure).
_WATCHED_RUN = """
import sys, time
import jax.numpy as jnp
from jax._src.distributed import global_state
from cxflax import parallel
from cxflax.errors import CxflaxError
parallel.maybe_initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
float(jnp.ones(3).sum())
if sys.argv[3] == "fail":
  global_state.client.blocking_key_value_get("test/process_0", 60_000)
  print(parallel.share_failure(CxflaxError("x.png: cannot decode image")), file=sys.stderr)
  sys.exit(2)
if sys.argv[3] == "end_in_failure":
  global_state.client.key_value_set("test/process_0", "here")
  while not parallel._watch.lock.locked():
    time.sleep(0.01)
parallel.stop_watching()
if sys.argv[2] == "0" and sys.argv[3] == "end":
  global_state.client.key_value_set("test/process_0", "ended")
"""


@pytest.mark.parametrize("outcome", ["success", "failure", "failure_at_the_end"])
def test_two_processes_exit_without_an_abort_at_interpreter_exit(outcome):
  """A run's end, with the watch thread started: each process exits with its own code. (A watch
  thread left blocked in jax's client aborted every process at exit: "FATAL: exception not
  rethrown", exit -6, in 10 of 10 runs of this script; so did a run that ended while its watch
  thread was stopping it, in 1 of 2 clean-clone CI runs.) On failure, process 1 fails after process
  0's run ended: process 0 ends normally. On failure at the end, process 0's run ends while its
  watch thread reports process 1's failure: it exits as stopped by that failure."""
  roles = {"success": ("end", "end"), "failure": ("end", "fail"),
           "failure_at_the_end": ("end_in_failure", "fail")}[outcome]
  with reserved_port() as port:
    commands = [[sys.executable, "-c", _WATCHED_RUN, f"127.0.0.1:{port}", str(i), role]
                for i, role in enumerate(roles)]
    results = run_processes(commands, [python_env()] * 2, timeout=120)
  codes = [code for code, _, _ in results]
  expected = {"success": [0, 0], "failure": [0, 2], "failure_at_the_end": [2, 2]}[outcome]
  assert codes == expected, [err[-2000:] for _, _, err in results]
  if outcome != "success":
    assert "process 1 of 2 failed: x.png: cannot decode image" in results[1][2]
  if outcome == "failure_at_the_end":
    assert "error: process 1 of 2 failed: x.png: cannot decode image; process 0 stopped too" in results[0][2]


def test_a_corrupt_image_in_one_process_stops_both(tmp_path):
  """A garbage image that only process 1 reads, in its third training batch (the image check
  before training is off, as by default): process 1 fails with the file's name while process 0
  waits in the step's gradient all-reduce; both exit with code 2 and `error:` naming process 1 and
  the file, no traceback."""
  root = tmp_path / "data"
  export.export_per_covid19(str(root), num_subjects=20, image_size=32, num_val_subjects=0,
                            slices_per_subject=(2, 3))
  # test_main.py's two-process run, on these files.
  overrides = (*TINY_RUN, "--config.optim.name=sgd", "--config.optim.learning_rate=0.01",
               "--config.data.source=per_covid19", f"--config.data.root={root}")
  # An example of process 1's third batch that process 0 does not read in two epochs (it reads
  # ahead), from the input pipeline each process builds itself.
  config = finalize(load_config("resnest.py:runlocal", *TINY, *overrides))
  inputs = [create_input(config, p, 2) for p in range(2)]
  batches = lambda p, n: [b["index"] for _, b in zip(range(n), inputs[p].train())]
  read_by_0 = np.concatenate(batches(0, 2 * inputs[0].steps_per_epoch))
  bad = inputs[1].source.paths[next(int(i) for i in batches(1, 3)[2] if i not in read_by_0)]
  with open(bad, "wb") as f:
    f.write(b"not a PNG")
  workdir = str(tmp_path / "work")
  with reserved_port() as port:
    address = f"127.0.0.1:{port}"
    commands = [[sys.executable, *main_args(workdir, *overrides), f"--coordinator_address={address}",
                 "--num_processes=2", f"--process_id={i}"] for i in range(2)]
    results = run_processes(commands, [python_env()] * 2, timeout=240)
  name = os.path.basename(bad)
  for i, (code, _, err) in enumerate(results):
    assert code == 2, f"process {i} exited {code}:\n{err[-3000:]}"
    assert "Traceback" not in err, f"process {i}:\n{err[-3000:]}"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "process 1 of 2 failed: " in errors[0] and name in errors[0], (
        f"process {i}:\n{err[-3000:]}")
  assert "process 0 stopped too" in results[0][2]


def test_the_coordinator_failing_stops_the_others(tmp_path):
  """Process 0, which hosts jax's coordination service, fails at once (its --workdir is a file);
  process 1, busy starting its run, stops too, both naming process 0 and the path."""
  bad = tmp_path / "file"
  bad.write_text("not a folder")
  with reserved_port() as port:
    address = f"127.0.0.1:{port}"
    commands = [[sys.executable, *main_args(workdir, *TINY_RUN), f"--coordinator_address={address}",
                 "--num_processes=2", f"--process_id={i}"] for i, workdir in enumerate([bad, tmp_path / "w"])]
    results = run_processes(commands, [python_env()] * 2, timeout=240)
  for i, (code, _, err) in enumerate(results):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, (
        f"process {i} exited {code}:\n{err[-3000:]}")
    assert f"process 0 of 2 failed: --workdir '{bad}' exists and is not a directory" in errors[0]
  assert "process 1 stopped too" in results[1][2]


def test_two_processes_train_what_one_trains_through_a_preemption(tmp_path):
  """Two processes (jax.distributed on 127.0.0.1, gloo) train what one process trains, through a
  preemption of a job on two hosts whose notice reaches one (process 1, not the coordinator):
  JAX's preemption sync point has both processes save the same step and exit cleanly (code 0);
  the same two commands resume from that step and finish. Process 0 is started by flags,
  process 1 by the JAX_* environment variables; the single process runs beside the first two."""
  import re
  import signal
  from cxflax.train import checkpoint as ckpt_lib
  from tests.conftest import assert_same_variables, read_json, run_variables
  # SGD at a small, stable rate, not the recipe's AdamW: Adam steps every parameter by about the
  # learning rate whatever its gradient's size, so where a gradient is near zero (the first
  # convolutions of each block, behind the zero-initialised last BatchNorm) rounding decides the
  # direction of a full step, and two correct runs end ~10% apart.
  sgd = (*TINY_RUN, "--config.optim.name=sgd", "--config.optim.learning_rate=0.01", "--config.log_every_steps=1",
         "--config.num_epochs=3", "--config.keep_checkpoints=10")
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")

  def run(*alongside, **kwargs):
    with reserved_port() as port:
      address = f"127.0.0.1:{port}"
      commands = [[sys.executable, *main_args(multi, *sgd), f"--coordinator_address={address}",
                   "--num_processes=2", "--process_id=0"], [sys.executable, *main_args(multi, *sgd)]]
      envs = [python_env(), python_env(env={"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
                                            "JAX_PROCESS_ID": "1"})]
      return run_processes(commands + [c for c, _ in alongside], envs + [e for _, e in alongside], timeout=600,
                           **kwargs)

  # The progress line (every log_every_steps) says training has begun.
  *preempted, (code, _, single_log) = run(([sys.executable, *main_args(single, *sgd)], python_env()),
                                          signal_when=(1, " steps/s, ", signal.SIGTERM))
  assert code == 0, f"the single process:\n{single_log[-4000:]}"
  steps = []
  for i, (code, _, err) in enumerate(preempted):
    assert code == 0, f"process {i} exited {code}:\n{err[-3000:]}"
    assert f"process {i} of 2" in err
    steps.append([int(s) for s in re.findall(r"preempted at step (\d+) \(SIGTERM\): checkpoint saved", err)])
  assert len(steps[0]) == 1 and steps[1] == steps[0], steps
  step, last = steps[0][0], read_json(single, "final_metrics.json")["step"]
  assert step < last and max(ckpt_lib.Checkpoints(ckpt_lib.checkpoint_dir(multi), create=False).all_steps()) == step
  assert not os.path.exists(os.path.join(multi, "final_metrics.json"))
  resumed = run()
  for i, (code, _, err) in enumerate(resumed):
    assert code == 0, f"process {i} exited {code} on resuming:\n{err[-3000:]}"
    assert f"resumed from {ckpt_lib.checkpoint_dir(multi)}/{step} " in err, err[-3000:]
  assert read_json(multi, "final_metrics.json")["step"] == last
  # At the end of the first epoch: same batches and global BatchNorm statistics; only the order in
  # which gloo sums the two processes' gradients and statistics differs, float32 rounding
  # (measured 1.3e-7 and 1.7e-7 of the largest parameter). A process that normalised with its own
  # half-batch statistics, or updated with its own half's gradient, would differ by the size of
  # the updates themselves (~1e-2).
  epoch = last // 3
  assert_same_variables(run_variables(multi, epoch), run_variables(single, epoch), rtol=1e-5,
                        what="two processes, first epoch", per_collection=True)
  # Not at the end: at step 7, in the second epoch, the two runs' losses agree to 1e-6 but their
  # gradient norms differ by 2e-4 (15.381 against 15.3845), a discrete choice (which input of a
  # max-pool, which side of a ReLU) made by the last bit, which the remaining steps grow to 2e-3 in
  # a BatchNorm variance: as far from the single run as two correct runs may end. Every step's loss
  # of the first two epochs (what process 0 logs, before and after the preemption) still shows that
  # they trained on the same batches: the rounding grows to ~1e-3 of a loss by their last step (in
  # the third epoch, beyond 1e-2: 1.3e-2 at step 14), batches of other examples differ by ~10x.
  logged = lambda log: {int(s): float(v) for s, v in re.findall(r"\[(\d+)\] [^\n]*train/loss=([-0-9.e+]+)", log)}
  before, after, one = logged(preempted[0][2]), logged(resumed[0][2]), logged(single_log)
  assert sorted(before) == list(range(1, step + 1)) and sorted(after) == list(range(step + 1, last + 1))
  assert sorted(one) == list(range(1, last + 1))
  for s, loss in {**before, **after}.items():
    if s <= 2 * epoch:
      assert loss == pytest.approx(one[s], rel=1e-2), s
