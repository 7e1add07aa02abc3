"""Checkpoints survive faults and refuse what is not theirs: a run killed (SIGKILL) mid-step,
mid-save or while deleting an old step resumes with the same command to the parameters of an
uninterrupted run, and leaves nothing half-written or half-deleted that resume, eval or predict
could choose; a checkpoint of another run is refused with everything that differs."""

import os
import shutil
import textwrap

import jax
import numpy as np
import pytest

from cxflax.errors import CheckpointError
from cxflax.train import checkpoint as ckpt_lib
from tests.conftest import TINY_RUN, assert_same_variables, main_args, read_json, run_main, run_python, run_variables

# The tiny run (the tiny_run fixture's parameters) keeping one checkpoint: its second save (step
# 10, the end) deletes the first (step 5).
_KILLED_RUN = (*TINY_RUN, "--config.keep_checkpoints=1")

# Code run before `python -m cxflax.main`, in the killed process: SIGKILL at one point.
_KILL_AT = {
    # before the train step that starts from step `n` (the save of step n may still be running)
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
    # while an old step's files are removed: after its model item, before the rest
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
  code = "import os, runpy, signal, sys\n"
  code += "def die():\n  os.kill(os.getpid(), signal.SIGKILL)\n"
  code += textwrap.dedent(_KILL_AT[point].format(n=n))
  code += f"sys.argv = ['cxflax.main'] + {main_args(workdir, *_KILLED_RUN)[2:]!r}\n"
  code += "runpy.run_module('cxflax.main', run_name='__main__', alter_sys=True)\n"
  proc = run_python(code)
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
