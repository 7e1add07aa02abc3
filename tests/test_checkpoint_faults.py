"""Checkpoints survive faults and refuse what is not theirs: a run killed (SIGKILL) mid-step,
mid-save or while deleting an old step resumes with the same command to the parameters of an
uninterrupted run, and leaves nothing half-written or half-deleted that resume, eval or predict
could choose; a checkpoint of another run is refused with everything that differs."""

import os
import shutil
import textwrap
import types

import numpy as np
import pytest

from cxflax.errors import CheckpointError
from cxflax.train import checkpoint as ckpt_lib
from tests.conftest import (TINY_RUN, assert_same_variables, main_after, main_args, read_json, run_main, run_python,
                            run_variables)

# The tiny run (the tiny_run fixture's parameters) keeping one checkpoint: its second save (step
# 10, the end) deletes the first (step 5).
_KILLED_RUN = (*TINY_RUN, "--config.keep_checkpoints=1")

# Code run before `python -m cxflax.main`, in the killed process: SIGKILL at one point.
_KILL_AT = {
    # before the train step that starts from step `n` (while a save started earlier may be running)
    "step": """
        import cxflax.train.train as train
        make = train.make_train_step
        def make_train_step(*a, **k):
          step = make(*a, **k)
          def killing(state, batch):
            if int(state.step) == {n}:
              die()
            return step(state, batch)
          return killing
        train.make_train_step = make_train_step
        """,
    # when orbax renames a step's complete temporary folder to its final name
    "save": """
        from orbax.checkpoint._src.path import async_path
        rename = async_path.rename
        async def renaming(src, dst):
          if "orbax-checkpoint-tmp" in str(src):
            die()
          return await rename(src, dst)
        async_path.rename = renaming
        """,
    # while a step folder's files are removed (whoever removes it): after its model item
    "delete": """
        import shutil
        rmtree = shutil.rmtree
        def removing(path, *a, **k):
          if os.path.basename(str(path)).isdigit() and "checkpoints" in str(path):
            rmtree(os.path.join(str(path), "model"))
            die()
          return rmtree(path, *a, **k)
        shutil.rmtree = removing
        """,
}


def _killed(workdir, point: str, n: int = 0):
  """The killed run's command (main_args) in a fresh process, SIGKILLed at `point`."""
  before = "import os, signal\ndef die():\n  os.kill(os.getpid(), signal.SIGKILL)\n"
  proc = run_python(main_after(before + textwrap.dedent(_KILL_AT[point].format(n=n)), workdir, *_KILLED_RUN))
  assert proc.returncode == -9, f"not killed at {point}: exit {proc.returncode}\n{proc.stderr[-3000:]}"


def _layout(workdir) -> tuple[list[int], list[str], list[str]]:
  """(steps as the checkpoint readers see them, orbax's temporary folders, steps being deleted)."""
  directory = ckpt_lib.checkpoint_dir(str(workdir))
  names = os.listdir(directory)
  todelete = os.path.join(directory, ckpt_lib._TODELETE)
  steps = ckpt_lib.find_steps(str(workdir), last_n=100)[1] if any(n.isdigit() for n in names) else []
  return (steps, [n for n in names if "orbax-checkpoint-tmp" in n],
          sorted(os.listdir(todelete)) if os.path.isdir(todelete) else [])


def test_a_run_killed_mid_step_mid_save_and_mid_delete_resumes_to_the_uninterrupted_parameters(tiny_run, tmp_path):
  wd = tmp_path / "w"
  _killed(wd, "step", n=7)  # the save of step 5 started before
  _killed(wd, "save")  # resumed from step 5 (or 0), killed before its next step is complete
  steps, tmp, _ = _layout(wd)
  assert len(tmp) == 1 and all(s < int(tmp[0].split(".")[0]) for s in steps), (steps, tmp)
  _killed(wd, "delete")  # removes the leftover, saves step 10, and is killed removing step 5
  steps, tmp, todelete = _layout(wd)
  # The half-deleted step is nowhere a reader looks (predict's last_n=100 sees the complete step only).
  assert (steps, tmp, todelete) == ([10], [], ["5"])
  assert not os.path.exists(os.path.join(ckpt_lib.checkpoint_dir(str(wd)), ckpt_lib._TODELETE, "5", "model"))
  assert not os.path.exists(wd / "final_metrics.json")
  resumed = run_main(wd, *_KILLED_RUN)
  assert "/10 (stage 1 of 1)" in resumed.log
  assert _layout(wd) == ([10], [], [])
  assert read_json(wd, "final_metrics.json")["step"] == read_json(tiny_run[0], "final_metrics.json")["step"] == 10
  assert_same_variables(run_variables(wd), run_variables(tiny_run[0]), rtol=1e-6, what="killed thrice, resumed")


def _copy(tiny_run, tmp_path) -> str:
  """A workdir holding a copy of the tiny run's checkpoints, for runs that would resume it (only
  the checkpoints: tests on the other pytest worker write result files into the shared run)."""
  wd = str(tmp_path / "copy")
  shutil.copytree(os.path.join(tiny_run[0], "checkpoints"), os.path.join(wd, "checkpoints"))
  return wd


def test_resume_refuses_a_checkpoint_of_another_run_with_every_difference(tiny_run, tmp_path):
  wd = _copy(tiny_run, tmp_path)
  two_stages = lambda c: setattr(c, "stages", ({"num_epochs": 1}, {"num_epochs": 1}))
  with pytest.raises(CheckpointError, match="different model or config") as e:
    run_main(wd, *TINY_RUN, "--config.data.image_size=48", "--config.optim.name=sgd", edit=two_stages)
  message = str(e.value)
  for line in ("image_size: checkpoint 32, config 48", "num_stages: checkpoint 1, config 2",
               "optimizer: checkpoint 'adamw', config 'sgd'", "config.checkpoint_mismatch='accept'"):
    assert line in message, message
  assert "model:" not in message and "variable" not in message
  # Accepted, the differences are logged and the run goes on: here, evaluating its last step at 48 px.
  accepted = run_main(wd, *TINY_RUN, "--config.data.image_size=48", "--config.checkpoint_mismatch=accept")
  assert "image_size: checkpoint 32, config 48" in accepted.log and "accepted" in accepted.log
  assert read_json(wd, "final_metrics.json")["metrics"]["mae"] != read_json(tiny_run[0], "final_metrics.json")["metrics"]["mae"]
  # An optimizer state of another structure cannot be restored, accepted or not.
  for override in ("--config.optim.name=sgd", "--config.optim.grad_clip_norm=1.0"):
    with pytest.raises(CheckpointError, match=r"its optimizer state does not fit this config's optimizer \(\d+ entries"):
      run_main(wd, *TINY_RUN, override, "--config.checkpoint_mismatch=accept")


def test_a_damaged_checkpoint_is_named_by_resume_predict_and_eval(tiny_run, tmp_path):
  """A checkpoint whose largest file was cut short (a copy interrupted), or missing an item: every
  mode that reads it stops with an error naming the step's folder and what could not be read;
  the command prints it as one `error:` line with exit code 2, without the tracebacks it printed
  before (orbax wraps tensorstore's read error in a bare Exception, and its abandoned reads raised
  one apiece)."""
  import re
  wd = _copy(tiny_run, tmp_path)
  last = max(ckpt_lib.Checkpoints(ckpt_lib.checkpoint_dir(wd), create=False).all_steps())
  where = os.path.join(ckpt_lib.checkpoint_dir(wd), str(last))
  files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(where, "model")) for f in names]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)
  message = re.escape(f"cannot read checkpoint {where}: ") + r"OUT_OF_RANGE: .* is not valid for value of size"
  for mode in ("train", "predict"):
    with pytest.raises(CheckpointError, match=message + ".*the checkpoint is damaged or incomplete"):
      run_main(wd, *TINY_RUN, mode=mode)
  proc = run_python("", args=main_args(tmp_path / "eval", *TINY_RUN, f"--checkpoint={wd}", mode="eval"))
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
  assert re.match("error: " + message, errors[0]), errors[0]
  # A step folder missing one of its items (cxflax looks up 'model' itself; orbax, 'data').
  for item, mode, says in (("model", "eval", "its 'model' item is missing"),
                           ("data", "train", 'Item "data" was not found in the checkpoint')):
    wd = _copy(tiny_run, tmp_path / item)
    shutil.rmtree(os.path.join(ckpt_lib.checkpoint_dir(wd), str(last), item))
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read checkpoint {ckpt_lib.checkpoint_dir(wd)}/{last}: {says}")):
      run_main(wd, *TINY_RUN, mode=mode)


def test_eval_refuses_a_checkpoint_of_another_stage_size(tiny_run, tmp_path):
  with pytest.raises(CheckpointError, match="image_size: checkpoint 32, config 48"):
    run_main(tmp_path / "e", *TINY_RUN, "--config.data.image_size=48", mode="eval", checkpoint=tiny_run[0])


def test_eval_evaluates_at_the_image_size_of_the_checkpoints_stage(tiny_run, tmp_path):
  """A staged config (one stage at 32 px over a 48-px base) evaluates the tiny run's checkpoint
  at its stage's 32 px, as trained: the run's own final metrics."""
  at_32 = lambda c: setattr(c, "stages", ({"image_size": 32},))
  run_main(tmp_path / "e", *TINY_RUN, "--config.data.image_size=48", mode="eval", checkpoint=tiny_run[0], edit=at_32)
  got = read_json(tmp_path / "e", "eval_metrics.json")["metrics"]["mae"]
  assert got == pytest.approx(read_json(tiny_run[0], "final_metrics.json")["metrics"]["mae"], rel=1e-6)


def _classifier_checkpoint(directory, class_names, step: int = 5) -> dict:
  """A checkpoint of a (tiny, untrained) classifier of `class_names`, as a run writes it; returns
  its model variables."""
  from cxflax.config import base_config, finalize
  from cxflax.train import build, tasks
  config = finalize(base_config())
  variables = {"params": {"head": {"kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3)}}, "batch_stats": {}}
  state = types.SimpleNamespace(**variables, step=np.int32(step), opt_state={"mu": variables["params"]})
  ckpts = ckpt_lib.Checkpoints(directory)
  ckpts.save(step, state, None, build.checkpoint_meta(config, tasks.TASKS.get("classification"), class_names))
  ckpts.close()
  return variables


def test_class_names_in_another_order_are_refused(tmp_path):
  from cxflax.config import base_config, finalize
  from cxflax.train import build, tasks
  classes = ("normal", "bacterial", "viral")
  variables = _classifier_checkpoint(str(tmp_path / "a"), classes)
  target = ckpt_lib.abstract(variables, None)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path / "a"), create=False)
  task = tasks.TASKS.get("classification")
  reordered = build.checkpoint_meta(finalize(base_config()), task, ("viral", "normal", "bacterial"))
  with pytest.raises(CheckpointError, match=r"class_names: checkpoint \['normal', 'bacterial', 'viral'\], "
                                            r"config \['viral', 'normal', 'bacterial'\]"):
    ckpts.check_compatible(5, reordered, target)
  ckpts.check_compatible(5, reordered, target, accept=True)
  # Another head and task: each difference listed, on its own line.
  other = base_config()
  other.head = "mlp"
  regression = build.checkpoint_meta(finalize(other), tasks.TASKS.get("regression"), None)
  with pytest.raises(CheckpointError) as e:
    ckpts.check_compatible(5, regression, target)
  listed = str(e.value).splitlines()
  for line in ("head: checkpoint 'linear', config 'mlp'", "num_outputs: checkpoint 3, config 1",
               "task: checkpoint 'classification', config 'regression'",
               "class_names: checkpoint ['normal', 'bacterial', 'viral'], config []"):
    assert f"  {line}" in listed, listed
  ckpts.close()
  # Predictions averaged: every checkpoint's classes, in order, are the data's.
  _classifier_checkpoint(str(tmp_path / "b"), classes[::-1])
  runs = [(str(tmp_path / "a"), 5), (str(tmp_path / "b"), 5)]
  with pytest.raises(CheckpointError, match=r"/b/5: class_names: checkpoint \['viral', "
                                            r"'bacterial', 'normal'\], first checkpoint \['normal'"):
    ckpt_lib.check_same_outputs(runs, None)
  with pytest.raises(CheckpointError, match=r"/a/5: class_names: checkpoint \['normal', 'bacterial', 'viral'\], "
                                            r"data \['bacterial'"):
    ckpt_lib.check_same_outputs(runs[:1], ("bacterial", "normal", "viral"))
  ckpt_lib.check_same_outputs(runs[:1], classes)
  ckpt_lib.check_same_outputs(runs, None, accept=True)


def test_a_save_orbax_refuses_is_an_error(tmp_path):
  directory = str(tmp_path / "c")
  _classifier_checkpoint(directory, ("a", "b"), step=5)
  for step in (5, 3):  # orbax saves a step only after the latest
    with pytest.raises(CheckpointError, match=rf"orbax refused to save step {step} in {directory}: its latest step is 5"):
      _classifier_checkpoint(directory, ("a", "b"), step=step)


def test_the_folder_of_a_save_that_never_finished_is_removed_by_the_next_run_only(tmp_path, monkeypatch):
  """What a save killed before orbax's final rename leaves (its temporary folder) is no step for
  readers, who leave it alone (a run may be writing it), and the next run in that folder
  removes it before it saves."""
  from orbax.checkpoint._src.path import async_path
  directory = str(tmp_path / "c")
  _classifier_checkpoint(directory, ("a", "b"), step=5)

  async def broken(src, dst):
    raise OSError("the process died here")

  monkeypatch.setattr(async_path, "rename", broken)
  with pytest.raises(OSError, match="the process died here"):  # orbax's background save, on close
    _classifier_checkpoint(directory, ("a", "b"), step=6)
  monkeypatch.undo()
  leftover = [n for n in os.listdir(directory) if "orbax-checkpoint-tmp" in n]
  assert [n.split(".")[0] for n in leftover] == ["6"]
  assert ckpt_lib.find_steps(directory, last_n=10)[1] == [5]
  assert os.path.isdir(os.path.join(directory, leftover[0]))
  _classifier_checkpoint(directory, ("a", "b"), step=7)
  assert sorted(os.listdir(directory)) == ["5", "7"]
