"""The main job end to end: train, checkpoint, resume, evaluate, multi-process, and bad input."""

import json
import os
import socket

import numpy as np

import pytest

from tests.conftest import main_args, run_python


def _run(workdir, *overrides, mode="train", **kw):
  return run_python("", args=main_args(workdir, *overrides, mode=mode), **kw)


def _final(workdir):
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run") / "work")
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc


def test_train_writes_checkpoints_events_and_metrics(trained):
  workdir, proc = trained
  final = _final(workdir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps[-1] == final["step"] and len(steps) <= 2  # runlocal keeps the last 2
  for item in ("model", "opt", "data", "meta"):
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(steps[-1]), item))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  assert "mae" in final["metrics"] and "rmse" in final["metrics"]
  assert "Final (step" in proc.stdout and "trivial baseline" in proc.stdout
  log = proc.stderr
  assert "parameters" in log and "Total:" in log  # clu parameter overview
  assert "steps/s" in log and "ETA" in log  # clu ReportProgress
  assert "eval/mae" in log


def test_eval_mode_restores_and_reproduces_metrics(trained, tmp_path):
  workdir, _ = trained
  proc = _run(workdir, mode="eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "eval_metrics.json")) as f:
    ev = json.load(f)
  assert ev["step"] == _final(workdir)["step"]
  assert ev["metrics"]["mae"] == pytest.approx(_final(workdir)["metrics"]["mae"], rel=1e-6)
  # --checkpoint: a step folder, evaluated into another workdir.
  step_dir = os.path.join(workdir, "checkpoints", str(ev["step"]))
  other = str(tmp_path / "other")
  proc = _run(other, f"--checkpoint={step_dir}", mode="eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(other, "eval_metrics.json")) as f:
    assert json.load(f)["metrics"]["mae"] == pytest.approx(ev["metrics"]["mae"], rel=1e-6)


def test_halted_run_resumes_to_the_same_result(trained, tmp_path):
  """Stopped half-way and started again, a run ends where an uninterrupted one ends."""
  workdir = str(tmp_path / "halted")
  first = _run(workdir, "--config.halt_after_steps=3")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "halted at step 3" in first.stderr
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
  second = _run(workdir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from" in second.stderr
  resumed, straight = _final(workdir), _final(trained[0])
  assert resumed["step"] == straight["step"]
  assert resumed["metrics"]["mae"] == pytest.approx(straight["metrics"]["mae"], rel=1e-5)


def test_two_processes_match_one(trained, tmp_path):
  """Two processes (jax.distributed on 127.0.0.1, gloo) train the same model as one process."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / "multi")
  import subprocess
  import sys
  from tests.conftest import REPO
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  procs = [subprocess.Popen(
      [sys.executable] + main_args(workdir) + [f"--coordinator_address=127.0.0.1:{port}",
                                               "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  assert "process 0 of 2" in outs[0][1] or "process 1 of 2" in outs[1][1]
  multi, single = _final(workdir), _final(trained[0])
  assert multi["step"] == single["step"]
  # Same batches and global BatchNorm statistics; only the order of the gradient sums differs
  # (gloo across processes), which drifts the result by well under a percent over the run.
  assert multi["metrics"]["mae"] == pytest.approx(single["metrics"]["mae"], rel=2e-2)


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  proc = _run(str(tmp_path / "empty"), mode="eval")
  assert proc.returncode == 2
  assert "no checkpoint to evaluate" in proc.stderr


def test_checkpoint_of_another_model_is_refused(trained):
  proc = _run(trained[0], "--config.model=resnet18", mode="eval")
  assert proc.returncode == 2
  assert "different model or config" in proc.stderr and "resnest14d" in proc.stderr


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "afile"
  path.write_text("x")
  proc = _run(str(path))
  assert proc.returncode == 2 and "is not a directory" in proc.stderr


def test_unknown_config_field_and_bad_value(tmp_path):
  proc = _run(str(tmp_path / "w"), "--config.no_such_field=3")
  assert proc.returncode != 0 and "no_such_field" in proc.stderr
  proc = _run(str(tmp_path / "w"), "--config.dtype=float16")
  assert proc.returncode == 2 and "config.dtype" in proc.stderr
  proc = _run(str(tmp_path / "w"), "--config.data.source=imagenet")
  assert proc.returncode == 2 and "unknown data source 'imagenet'" in proc.stderr


def test_classification_on_a_real_layout(tmp_path):
  """COVIDx written from phantom X-rays, trained and evaluated through the main job."""
  from cxflax.data.export import export_covidx
  root = tmp_path / "COVIDx"
  export_covidx(str(root), num_subjects=40, image_size=32, four_class=True)
  workdir = str(tmp_path / "work")
  proc = _run(workdir, "--config.data.source=covidx", f"--config.data.root={root}",
              "--config.loss=cross_entropy", "--config.data.eval_split=test")
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = _final(workdir)
  m = final["metrics"]
  assert {"accuracy", "macro_f1", "auc", "confusion_matrix", "sensitivity/COVID-19", "ppv/viral"} <= set(m)
  assert np.array(m["confusion_matrix"]).shape == (4, 4)
  assert "trivial baseline (majority class)" in proc.stdout


def test_corrupt_image_inside_a_worker_names_the_file(tmp_path):
  from cxflax.data.export import export_per_covid19
  root = tmp_path / "Per-COVID-19"
  export_per_covid19(str(root), num_subjects=6, image_size=32, num_val_subjects=0)
  bad = root / "Train" / "Image_00004.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
  proc = _run(str(tmp_path / "work"), "--config.data.source=per_covid19", f"--config.data.root={root}",
              "--config.data.workers=1", "--config.num_folds=2")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "error:" in proc.stderr and "Image_00004.png: cannot decode image" in proc.stderr
