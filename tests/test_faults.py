"""Faults end in clear errors and lose nothing: divergence stops the run at the step where it
happens, before anything non-finite is saved, logged or scored."""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxflax import parallel
from cxflax.config import base_config, finalize
from cxflax.errors import DivergenceError
from cxflax.train import checkpoint as ckpt_lib
from cxflax.train.steps import create_train_state, make_train_step
from cxflax.train.train import _check_finite, _mean_metrics
from tests.conftest import TINY_RUN, main_args, read_json, run_main, run_python, run_variables


class _Net(nn.Module):  # conv, BatchNorm, linear: every kind of state a train step changes
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return nn.Dense(1)(jnp.mean(x, axis=(1, 2)))


def test_a_non_finite_step_leaves_the_state_as_it_was():
  c = base_config()
  c.optim.name, c.optim.learning_rate, c.batch_size = "adam", 0.1, 4
  c = finalize(c)
  model, mesh = _Net(), parallel.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 6, 6, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), images)
  tx = optax.adam(0.1)
  state = create_train_state(model, tx, variables, mesh)
  step = make_train_step(model, c, mesh)
  before = jax.device_get(state)
  poisoned = {"image": np.where(np.arange(4)[:, None, None, None] == 2, np.nan, images), "label": np.ones(4, np.float32)}
  state, m = step(state, parallel.shard_batch(poisoned, mesh))
  after = jax.device_get(state)
  assert float(m["finite"]) == 0.0 and not np.isfinite(float(m["loss"]))
  assert int(after.step) == int(before.step) + 1
  for a, b in zip(jax.tree.leaves((after.params, after.batch_stats, after.opt_state)),
                  jax.tree.leaves((before.params, before.batch_stats, before.opt_state))):
    np.testing.assert_array_equal(a, b)
  state, m = step(state, parallel.shard_batch({"image": images, "label": np.ones(4, np.float32)}, mesh))
  assert float(m["finite"]) == 1.0
  assert not np.array_equal(jax.device_get(state.params)["Dense_0"]["kernel"], after.params["Dense_0"]["kernel"])


def test_an_update_that_overflows_the_parameters_is_kept_out_and_named():
  """A finite loss and gradient times a rate of 1e60 (two scalings of 1e30: each finite in
  float32) makes every parameter with a non-zero gradient infinite: the step keeps the state."""
  c = finalize(base_config())
  model, mesh = _Net(), parallel.make_mesh(jax.devices()[:1])
  images = np.random.default_rng(1).normal(size=(4, 6, 6, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), images)
  state = create_train_state(model, optax.chain(optax.scale(1e30), optax.scale(1e30)), variables, mesh)
  before = jax.device_get(state)
  state, m = make_train_step(model, c, mesh)(
      state, parallel.shard_batch({"image": images, "label": np.ones(4, np.float32)}, mesh))
  assert np.isfinite(float(m["loss"])) and 0 < float(m["grad_norm"]) < np.inf
  assert float(m["finite"]) == 0.0
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                  jax.tree.leaves((before.params, before.batch_stats))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(DivergenceError, match=r"step 5: non-finite parameters, optimizer state or BatchNorm "
                                            r"statistics after the update \(loss="):
    _check_finite([(5, m)], "error")


def test_an_optimizer_state_that_overflows_alone_is_kept_out():
  """Gradients scaled by 1e25 before Adam square to inf in its second moment, which then makes
  every update 0: the parameters stay finite, so only the optimizer-state check sees the fault."""
  c = finalize(base_config())
  model, mesh = _Net(), parallel.make_mesh(jax.devices()[:1])
  images = np.random.default_rng(2).normal(size=(4, 6, 6, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), images)
  tx = optax.chain(optax.scale(1e25), optax.scale_by_adam(), optax.scale(-1e-3))
  state = create_train_state(model, tx, variables, mesh)
  before = jax.device_get(state)
  batch = parallel.shard_batch({"image": images, "label": np.ones(4, np.float32)}, mesh)
  unchecked = jax.device_get(tx.update(jax.grad(lambda p: jnp.sum(model.apply(
      {"params": p, "batch_stats": before.batch_stats}, images) ** 2))(before.params),
      before.opt_state, before.params))
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(unchecked[0]))
  assert not all(np.isfinite(s).all() for s in jax.tree.leaves(unchecked[1]))
  state, m = make_train_step(model, c, mesh)(state, batch)
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert float(m["finite"]) == 0.0
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state, state.batch_stats)),
                  jax.tree.leaves((before.params, before.opt_state, before.batch_stats))):
    np.testing.assert_array_equal(a, b)


def _diverging(tmp_path, *overrides, rate="1e6"):
  """The TINY run at a learning rate it cannot survive: the step it diverges at, and its workdir."""
  wd = tmp_path / "w"
  with pytest.raises(DivergenceError, match=r"training diverged at step (\d+): non-finite") as e:
    run_main(wd, *TINY_RUN, "--config.optim.name=sgd", f"--config.optim.learning_rate={rate}",
             "--config.optim.momentum=0.0", "--config.schedule.name=constant", *overrides)
  return int(e.value.args[0].split("step ")[1].split(":")[0]), wd


def test_divergence_stops_the_run_at_its_step_whatever_the_log_interval(tmp_path, monkeypatch):
  """At a rate of 30 the run's train steps survive two epochs (5 steps each) and diverge in the third. The same
  step is named whether every step is logged or none before the stage's end (step 100, its only
  log, evaluation or save): the run stops soon after that step is computed (the loop checks the
  steps done so far at every step, and waits for them at each epoch's end), not at the stage's
  end. The checkpoints of the epochs before hold finite values only."""
  from cxflax.train import train as train_lib
  dispatched, make = [], train_lib.make_train_step

  def counting(*args, **kwargs):
    step = make(*args, **kwargs)
    return lambda state, batch: (dispatched.append(1), step(state, batch))[1]

  monkeypatch.setattr(train_lib, "make_train_step", counting)
  first, _ = _diverging(tmp_path / "a", "--config.log_every_steps=1000", "--config.num_epochs=20",
                        "--config.eval_every_epochs=100", "--config.checkpoint_every_epochs=100", rate=30)
  assert len(dispatched) < 100
  # Evaluation stays off in both: after step 10 the parameters are still finite, but so large that
  # eval mode (BatchNorm's running statistics) overflows, which is reported as the evaluation's
  # finding (the next test).
  second, wd = _diverging(tmp_path / "b", "--config.log_every_steps=1", "--config.num_epochs=4",
                          "--config.eval_every_epochs=100", rate=30)
  assert second == first
  steps = ckpt_lib.Checkpoints(ckpt_lib.checkpoint_dir(str(wd)), create=False).all_steps()
  assert steps and max(steps) < first
  for s in steps:
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(run_variables(str(wd), s)))


def test_divergence_seen_only_by_evaluation_names_the_step_and_the_last_checkpoint(tmp_path, monkeypatch):
  """Parameters finite to training's check but overflowing in eval mode (the second evaluation's
  are scaled by 1e38): the run stops at that evaluation's step with scoring's finding, the step
  and the last checkpoint named, and that step is not saved."""
  from cxflax.train import train as train_lib
  real, calls = train_lib.run_evaluation, []

  def overflowing_on_the_second_call(eval_step, variables, batches, mesh):
    calls.append(1)
    if len(calls) == 2:
      variables = {**variables, "params": jax.tree.map(lambda p: p * 1e38, variables["params"])}
    return real(eval_step, variables, batches, mesh)

  monkeypatch.setattr(train_lib, "run_evaluation", overflowing_on_the_second_call)
  wd = tmp_path / "w"
  with pytest.raises(DivergenceError) as e:
    run_main(wd, *TINY_RUN, "--config.num_epochs=3")
  message = str(e.value)
  assert re.search(r"diverged by step 10 \(epoch 2\.00\): .* the model predicts non-finite values for \d+ of "
                   r"\d+ examples.*the last checkpoint is step 5\)\. Lower config\.optim\.learning_rate", message)
  assert ckpt_lib.Checkpoints(ckpt_lib.checkpoint_dir(str(wd)), create=False).all_steps() == [5]


def test_divergence_is_an_error_line_and_exit_code_2(tmp_path):
  # _diverging's run (the same compiled programs, from the run's shared compilation cache), on the command line
  proc = run_python("", args=main_args(tmp_path / "w", *TINY_RUN, "--config.optim.name=sgd",
                                       "--config.optim.learning_rate=1e6", "--config.optim.momentum=0.0",
                                       "--config.schedule.name=constant"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: training diverged at step" in proc.stderr and "Traceback" not in proc.stderr


def test_on_nonfinite_skip_counts_what_it_skips():
  steps = [(1, {"finite": 1.0, "loss": 2.0, "grad_norm": 1.0}), (2, {"finite": 0.0, "loss": np.nan, "grad_norm": 1.0}),
           (3, {"finite": 1.0, "loss": 4.0, "grad_norm": 3.0})]
  assert _check_finite(steps, "skip") == 1
  assert _mean_metrics(steps) == {"loss": 3.0, "grad_norm": 2.0}  # over the applied updates
  with pytest.raises(DivergenceError, match=r"step 2: non-finite loss=nan;"):
    _check_finite(steps, "error")


def test_on_nonfinite_skip_trains_to_the_end_counting_every_skipped_update(tmp_path):
  """A rate of 1e60 (infinite in float32) makes every update non-finite: under 'skip' the run
  ends, reports every step's update as skipped, and its checkpoints all hold the initial state."""
  wd = tmp_path / "w"
  run = run_main(wd, *TINY_RUN, "--config.optim.name=sgd", "--config.optim.learning_rate=1e60",
                 "--config.optim.momentum=0.0", "--config.schedule.name=constant",
                 "--config.on_nonfinite=skip")
  final = read_json(wd, "final_metrics.json")
  logged = re.findall(r"^\[(\d+)\] .*train/skipped_updates=(\d+)", run.log, re.M)
  counts = [(int(a), int(b)) for a, b in logged]
  assert counts and counts[-1][0] == final["step"] and all(a == b for a, b in counts), counts
  steps = ckpt_lib.Checkpoints(ckpt_lib.checkpoint_dir(str(wd)), create=False).all_steps()
  assert len(steps) >= 2
  first, last = (jax.tree.leaves(run_variables(str(wd), s)) for s in (steps[0], steps[-1]))
  for a, b in zip(first, last):
    np.testing.assert_array_equal(a, b)


def test_non_finite_predictions_are_an_error_not_a_metric():
  from cxflax.train.scoring import run_evaluation

  class Step:  # an eval step whose second example's prediction is NaN
    def outputs(self, variables, batches, mesh):
      for b in batches:
        yield b

  batch = {"pred": np.array([[0.1, 0.9], [np.nan, np.nan]]), "label": np.array([1, 0]),
           "index": np.array([7, 8]), "valid": np.array([1.0, 1.0])}
  with pytest.raises(DivergenceError, match=r"non-finite values for 1 of 2 examples \(e.g. example 8\)"):
    run_evaluation(Step(), None, [batch], parallel.make_mesh(jax.devices()[:1]))


def test_sigterm_saves_at_the_next_step_and_the_rerun_resumes_there(tmp_path):
  """Preemption as SLURM and cloud machines signal it: the run checkpoints at the step boundary,
  exits cleanly (code 0), and the same command resumes from that step; Ctrl-C does the same with
  code 130, and the command resumes again to the end. With a data worker process, as the recipes
  have: its shared-memory batches are released before exit (Python's resource tracker reported
  them as leaked)."""
  import signal
  import sys
  from tests.conftest import python_env, run_processes
  wd = tmp_path / "w"
  overrides = (*TINY_RUN, "--config.num_epochs=3", "--config.checkpoint_every_epochs=100", "--config.data.workers=1")
  args = main_args(wd, *overrides)
  steps = []
  for signum, code, says in ((signal.SIGTERM, 0, r"preempted at step (\d+) \(SIGTERM\)"),
                             (signal.SIGINT, 130, r"interrupted at step (\d+) \(Ctrl-C\)")):
    # the progress line (every log_every_steps, 2) says training has begun
    [(returncode, _, log)] = run_processes([[sys.executable, *args]], [python_env()], timeout=300,
                                           signal_when=(0, " steps/s, ", signum))
    m = re.search(says + ": checkpoint saved; run the same command again to resume", log)
    assert returncode == code and m and "Traceback" not in log and "leaked" not in log, log[-3000:]
    if steps:
      assert f"resumed from {ckpt_lib.checkpoint_dir(str(wd))}/{steps[-1]} " in log, log[-3000:]
    steps.append(int(m.group(1)))
    assert ckpt_lib.Checkpoints(ckpt_lib.checkpoint_dir(str(wd)), create=False).all_steps() == steps
    assert not os.path.exists(wd / "final_metrics.json")
  assert steps[1] > steps[0]
  resumed = run_main(wd, *overrides)
  assert f"resumed from {ckpt_lib.checkpoint_dir(str(wd))}/{steps[1]} " in resumed.log, resumed.log[-2000:]
  assert read_json(wd, "final_metrics.json")["step"] > steps[1]


def test_ctrl_c_during_a_stages_last_evaluation_stops_before_the_next_stage(tmp_path, monkeypatch):
  """Ctrl-C while the first of two stages evaluates its last step: that step's checkpoint is the
  run's last, and the run stops there, not after the second stage's first step. (Resuming at a
  stage's end: tests/test_recipes.py's stages test.)"""
  import signal
  from cxflax.errors import Interrupted
  from cxflax.train import train as train_lib
  real, calls = train_lib.run_evaluation, []

  def interrupted_at_the_first_evaluation(*args):
    if not calls:
      os.kill(os.getpid(), signal.SIGINT)
    calls.append(1)
    return real(*args)

  monkeypatch.setattr(train_lib, "run_evaluation", interrupted_at_the_first_evaluation)
  wd = tmp_path / "w"
  with pytest.raises(Interrupted):
    run_main(wd, *TINY_RUN, "--config.schedule.warmup_epochs=0",
             edit=lambda c: setattr(c, "stages", ({"num_epochs": 1}, {"num_epochs": 1})))
  assert ckpt_lib.Checkpoints(ckpt_lib.checkpoint_dir(str(wd)), create=False).all_steps() == [5]


def test_the_exit_waits_for_grains_queued_deletions_of_shared_batches():
  """A batch in shared memory whose deletion grain queued on its background thread (as its
  multiprocess prefetch has it) is unlinked before main returns: queued behind other work here,
  it would still exist at exit, and Python's resource tracker would report it as leaked."""
  import time
  from multiprocessing import shared_memory
  from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
  from cxflax import main
  SharedMemoryArray.enable_async_del(1)
  pool = SharedMemoryArray._del_thread_pool
  batch = SharedMemoryArray((4, 4), np.float32)
  name = batch.shm.name
  batch.unlink_on_del()
  pool.apply_async(time.sleep, (1.0,))  # the deletion waits behind this
  del batch
  main._release_shared_batches()
  with pytest.raises(FileNotFoundError):
    shared_memory.SharedMemory(name)
  assert SharedMemoryArray._del_thread_pool is None  # later deletions happen at once


def test_a_second_ctrl_c_stops_at_once_with_one_error_line(tmp_path):
  """The first Ctrl-C (or a SIGTERM) asks for a checkpoint at the next step; another Ctrl-C then
  raises KeyboardInterrupt at once, which the command reports as one `error:` line, exit 130."""
  import signal
  from cxflax.train.train import Preemption
  for first in (signal.SIGINT, signal.SIGTERM):
    p = Preemption()
    p._notice(first, None)
    assert p.reached(1) and p.interrupted == (first == signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      p._notice(signal.SIGINT, None)
  code = ("import sys, cxflax.main as m\n"
          "def run(*args):\n"
          "  raise KeyboardInterrupt\n"
          "m.run = run\n"
          f"sys.argv = ['cxflax.main'] + {main_args(tmp_path / 'w')[2:]!r}\n"
          "m.app.run(m.main, flags_parser=m._parse_flags)\n")
  proc = run_python(code)
  assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
      "error: interrupted (Ctrl-C); a training run resumes from its last complete checkpoint with the same command"]
