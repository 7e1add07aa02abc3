"""The main job end to end: train, checkpoint, resume, evaluate, bfloat16, and bad input. Runs go
through cxflax.main.run in this process (tests/conftest.py's run_main); the command line itself
(exit codes, process launch) is exercised by the subprocess tests at the end. Two processes
training what one trains: tests/test_multiprocess_faults.py."""

import os
import re

import numpy as np
import pytest

from cxflax.data.sources import make_source
from cxflax.errors import CheckpointError, ConfigError, DataError
from tests.conftest import (assert_same_variables, checkpoint_predictions, held_out, load_config, main_args,
                            read_json, run_main, run_python, run_variables, TINY_RUN)


def _held_out(config_spec="resnest.py:runlocal", *overrides):
  """The source and the held-out fold's indices of a TINY run, from the fold assignment."""
  from tests.conftest import TINY
  return held_out(load_config(config_spec, *TINY, *overrides))


def test_train_writes_checkpoints_events_and_metrics(tiny_run):
  workdir, run = tiny_run
  final = read_json(workdir, "final_metrics.json")
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert len(steps) == 2 and steps[-1] == final["step"] == 2 * steps[0]  # one per epoch, both kept
  for item in ("model", "opt", "data", "meta"):
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(steps[-1]), item))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  # The reported metrics are those of the last checkpoint on the held-out fold, computed here
  # from the checkpoint without cxflax's evaluation code.
  source, held_out = _held_out()
  pred = checkpoint_predictions(workdir, source, held_out)
  truth = source.labels()[held_out]
  assert final["metrics"]["mae"] == pytest.approx(np.mean(np.abs(pred - truth)), rel=1e-4)
  assert final["metrics"]["rmse"] == pytest.approx(np.sqrt(np.mean((pred - truth) ** 2)), rel=1e-4)
  train_mean = np.mean(np.delete(source.labels(), held_out))
  assert final["baseline"]["mae"] == pytest.approx(np.mean(np.abs(train_mean - truth)), rel=1e-6)
  assert f"Final (step {final['step']}): eval mae={final['metrics']['mae']:.4f}" in run.stdout
  assert "trivial baseline (training mean)" in run.stdout
  assert "Total:" in run.log  # clu's parameter overview
  assert "steps/s" in run.log and "ETA" in run.log  # summaries.Progress
  assert "eval/mae" in run.log  # summaries.MetricWriter's log lines
  # Each epoch's seconds and training images/s: one line per epoch, counting the epoch's batches.
  epochs = re.findall(r"epoch (\d+) took ([\d.]+) s: training ([\d.]+) s \((\d+) images, ([\d.]+) images/s\), "
                      r"evaluation ([\d.]+) s, checkpoint ([\d.]+) s", run.log)
  from tests.conftest import TINY
  batch = load_config("resnest.py:runlocal", *TINY, *TINY_RUN).batch_size
  assert [(int(e[0]), int(e[3])) for e in epochs] == [(1, steps[0] * batch), (2, steps[0] * batch)]
  assert all(float(e[4]) > 0 for e in epochs)


def test_eval_mode_restores_any_checkpoint_path(tiny_run, tmp_path):
  """--mode=eval on the workdir, and --checkpoint given as a workdir, its checkpoints/ folder or
  one step's folder (an earlier step, whose metrics differ)."""
  workdir, _ = tiny_run
  run_main(workdir, *TINY_RUN, mode="eval")
  ev = read_json(workdir, "eval_metrics.json")
  final = read_json(workdir, "final_metrics.json")
  assert ev["step"] == final["step"] and ev["num_examples"] == len(_held_out()[1])
  assert ev["metrics"]["mae"] == pytest.approx(final["metrics"]["mae"], rel=1e-6)
  ckpts = os.path.join(workdir, "checkpoints")
  first = min(int(s) for s in os.listdir(ckpts) if s.isdigit())
  for i, (path, step) in enumerate([(workdir, final["step"]), (ckpts, final["step"]),
                                    (os.path.join(ckpts, str(first)), first)]):
    other = str(tmp_path / f"other{i}")
    run_main(other, *TINY_RUN, mode="eval", checkpoint=path)
    got = read_json(other, "eval_metrics.json")
    assert got["step"] == step and got["checkpoint"] == os.path.join(ckpts, str(step))
    source, held_out = _held_out()
    pred = checkpoint_predictions(workdir, source, held_out, step=step)
    assert got["metrics"]["mae"] == pytest.approx(np.mean(np.abs(pred - source.labels()[held_out])), rel=1e-4)


def test_halted_run_resumes_to_the_same_parameters(tiny_run, tmp_path):
  """Stopped in the middle of an epoch and started again, a run ends with the parameters and
  BatchNorm statistics of the uninterrupted run."""
  workdir = str(tmp_path / "halted")
  first = run_main(workdir, *TINY_RUN, "--config.halt_after_steps=3")
  assert "halted at step 3" in first.log
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
  second = run_main(workdir, *TINY_RUN)
  assert "resumed from" in second.log and "/3 (stage 1 of 1)" in second.log
  straight = tiny_run[0]
  assert read_json(workdir, "final_metrics.json")["step"] == read_json(straight, "final_metrics.json")["step"]
  assert_same_variables(run_variables(workdir), run_variables(straight), rtol=1e-6, what="resumed run")


def test_bfloat16_trains_evaluates_and_predicts(tmp_path):
  """--config.dtype=bfloat16 end to end (resnet10t: its average-pool shortcut once promoted
  bfloat16 to float32 and broke the first gradient). Parameters stay float32, and the metrics and
  predictions are those of the same checkpoint computed in float32, to bfloat16's rounding."""
  import jax
  from tests.conftest import TINY
  workdir = str(tmp_path / "bf16")
  bf16 = ("--config.dtype=bfloat16", "--config.model=resnet10t")
  run_main(workdir, *bf16)
  mae = read_json(workdir, "final_metrics.json")["metrics"]["mae"]
  assert {np.asarray(v).dtype for v in jax.tree.leaves(run_variables(workdir))} == {np.dtype("float32")}
  run_main(workdir, "--config.model=resnet10t", mode="eval")  # float32: dtype 'auto' on CPU
  assert mae == pytest.approx(read_json(workdir, "eval_metrics.json")["metrics"]["mae"], rel=0.05)
  run_main(workdir, *bf16, "--config.predict.last_n=1", mode="predict")  # the latest checkpoint alone
  rows = [r.split(",") for r in open(os.path.join(workdir, "predictions_val.csv")).read().splitlines()]
  val = make_source(load_config("resnest.py:runlocal", *TINY).data, "val", unlabeled_ok=True)
  assert [r[0] for r in rows] == [val.example_name(i) for i in range(len(val))]
  f32 = checkpoint_predictions(workdir, val, np.arange(len(val)))
  np.testing.assert_allclose([float(r[1]) for r in rows], f32, atol=0.03 * np.abs(f32).max() + 0.05)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_every_recipe_computes_in_bfloat16_on_accelerators_by_default(monkeypatch, backend):
  """config.dtype='auto' (every recipe's default): bfloat16 where JAX's backend is a GPU or TPU,
  float32 on CPU, in the finalized config the run logs and in the model it builds; a dtype set
  on the command line is kept."""
  import glob
  import jax
  import jax.numpy as jnp
  from cxflax.config import finalize
  from cxflax.train.build import build_model
  from cxflax.train import tasks
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  expected = "float32" if backend == "cpu" else "bfloat16"
  recipes = sorted(os.path.basename(p) for p in glob.glob("configs/*.py") if not p.endswith(
      ("common.py", "__init__.py")))
  assert len(recipes) >= 7, recipes
  for recipe in recipes:
    config = load_config(recipe)
    assert config.dtype == "auto", recipe
    assert finalize(config).dtype == expected, recipe
  config = finalize(load_config("resnest.py:runlocal"))
  model = build_model(config, tasks.resolve(config, "regression"))
  assert jnp.dtype(model.backbone.dtype) == jnp.dtype(expected)
  assert finalize(load_config("resnest.py:runlocal", "--config.dtype=float32")).dtype == "float32"


# --- bad input -------------------------------------------------------------------------------------


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoint to evaluate"):
    run_main(str(tmp_path / "empty"), mode="eval")


def test_checkpoint_of_another_model_is_refused(tiny_run):
  with pytest.raises(CheckpointError, match="different model or config") as e:
    run_main(tiny_run[0], "--config.model=resnet18", mode="eval")
  assert "model: checkpoint 'resnet10t', config 'resnet18'" in str(e.value)


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "afile"
  path.write_text("x")
  with pytest.raises(ConfigError, match="is not a directory"):
    run_main(str(path))


def test_bad_config_values_are_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="config.dtype"):
    run_main(str(tmp_path / "w"), "--config.dtype=float16")
  with pytest.raises(ConfigError, match="unknown data source 'imagenet'"):
    run_main(str(tmp_path / "w"), "--config.data.source=imagenet")
  with pytest.raises(ConfigError, match=r"config.cpu_kernels must be one of \('auto', 'on', 'off'\), got 'fast'"):
    run_main(str(tmp_path / "w"), "--config.cpu_kernels=fast")
  with pytest.raises(ConfigError, match=r"config.stages\[0\]: cpu_kernels holds for the whole run"):
    run_main(str(tmp_path / "w"), edit=lambda c: setattr(c, "stages", ({"cpu_kernels": "off"},)))
  with pytest.raises(ConfigError, match=r"config.drop_rate must be in \[0, 1\), got 1.0"):
    run_main(str(tmp_path / "w"), "--config.drop_rate=1.0")
  with pytest.raises(ConfigError, match=r"config.head_dropout must be in \[0, 1\), got -0.1"):
    run_main(str(tmp_path / "w"), "--config.head_dropout=-0.1")


@pytest.mark.parametrize("override,match", [
    ("--config.lr_find.start=0", r"config.lr_find.start and config.lr_find.end must satisfy 0 < start < end"),
    ("--config.lr_find.end=1e-8", r"config.lr_find.start and config.lr_find.end"),
    ("--config.lr_find.steps=1", r"config.lr_find.steps must be at least 2, got 1"),
    ("--config.lr_find.skip_start=-1", r"config.lr_find.skip_start must be >= 0, got -1"),
    ("--config.predict.last_n=0", r"config.predict.last_n must be >= 1, got 0")])
def test_bad_lr_find_and_predict_settings_are_config_errors(override, match):
  from cxflax.config import finalize
  with pytest.raises(ConfigError, match=match):
    finalize(load_config("covid_resnet.py:runlocal", override))


def test_nested_fields_on_the_command_line_and_in_stages():
  """Optimisation, schedule and loss fields are groups (--config.optim.learning_rate=...); a
  stage's keys are field paths, or a bare field of config.data."""
  from cxflax.config import base_config, stage_configs
  c = load_config("resnest.py:runlocal", "--config.optim.learning_rate=3e-4", "--config.loss.name=multitask",
                  "--config.schedule.warmup_epochs=0.5")
  assert (c.optim.learning_rate, c.loss.name, c.schedule.warmup_epochs) == (3e-4, "multitask", 0.5)
  c = base_config()
  c.stages = ({"image_size": 64, "optim.learning_rate": 0.1, "optim.freeze": ["^backbone/"], "num_epochs": 2},
              {"data.image_size": 96, "schedule.warmup_epochs": 0.5})
  first, second = stage_configs(c)
  assert (first.data.image_size, first.optim.learning_rate, first.optim.freeze, first.num_epochs) == (
      64, 0.1, ("^backbone/",), 2)
  assert (second.data.image_size, second.optim.learning_rate, second.schedule.warmup_epochs) == (96, 1e-3, 0.5)
  assert "resize(96)" in second.data.train_pp and second.num_epochs == c.num_epochs
  for key, match in [("learning_rate", r"unknown field 'learning_rate' \(did you mean 'optim.learning_rate'\?\)"),
                     ("optim.lr", "unknown field 'optim.lr'"), ("data.image_size.x", "unknown field"),
                     ("num_epochs.x", "unknown field"), ("optim", "'optim' is a group of fields")]:
    c.stages = ({"num_epochs": 1}, {key: 1})
    with pytest.raises(ConfigError, match=r"config.stages\[1\]: " + match):
      stage_configs(c)


def test_batch_sizes_must_split_over_the_devices_and_processes_of_the_run(monkeypatch):
  import jax
  from cxflax import parallel
  from cxflax.config import base_config, finalize
  config = finalize(base_config())
  config.batch_size, config.eval_batch_size = 12, 24
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  with pytest.raises(ConfigError, match=r"config.batch_size=12 must be a positive multiple of the device count \(8\)"):
    parallel.check_batch_sizes(config)
  config.batch_size = 16
  parallel.check_batch_sizes(config)
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with pytest.raises(ConfigError, match=r"config.batch_size=16 must divide among 3 processes"):
    parallel.check_batch_sizes(config)
  config.batch_size = 48
  parallel.check_batch_sizes(config)  # eval_batch_size 24 splits too


def test_reading_a_config_imports_no_jax():
  """Configs are plain Python: reading one (as --help and describe do) starts no accelerator
  library; nor does exporting a dataset layout (the image and file writers it shares with the
  modes)."""
  out = run_python("import sys, cxflax.config, configs.resnest, cxflax.data.export\n"
                   "configs.resnest.get_config('runlocal')\n"
                   "print(sorted(m for m in ('jax', 'optax', 'flax', 'tensorflow') if m in sys.modules))")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_cpu_kernels_hold_for_the_run(tmp_path, monkeypatch, kernels):
  """config.cpu_kernels is the CPU-kernel mode while the run traces and runs, and the previous
  one afterwards."""
  from cxflax.models import xla_cpu
  from cxflax.train import train
  seen = []
  monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir: seen.append(xla_cpu.enabled()))
  run_main(str(tmp_path / "w"), f"--config.cpu_kernels={kernels}")
  assert seen == [kernels == "on"] and xla_cpu.get_mode() == "auto"


@pytest.mark.parametrize("flag,message", [
    ("--config.no_such_field=3", "--config.no_such_field: the config has no field 'no_such_field'"),
    ("--config.data.nofield=1", "--config.data.nofield: the config has no field 'nofield'"),
    ("--config.batch_size=abc", "--config.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
    ("--config=resnest.py:bogus", "unknown config argument(s) ['bogus']"),
    ("--config=nothere.py", "--config: [Errno 2] No such file or directory"),
])
def test_bad_flags_are_described_in_one_line(flag, message):
  """What `error:` says for a --config the flag parser refuses (ml_collections wraps the cause in
  other exceptions, and defers a missing file's until the config is read)."""
  from cxflax.main import describe_flag_error
  spec, overrides = ("resnest.py:runlocal", [flag]) if flag.startswith("--config.") else (flag[9:], [])
  argv = ["cxflax", f"--config={spec}", *overrides]
  with pytest.raises(Exception) as e:
    load_config(spec, *overrides).to_dict()
  assert message in describe_flag_error(e.value, argv)


def test_bad_input_is_an_error_line_and_exit_code_2(tmp_path):
  """The command line turns cxflax's errors, and flags it cannot parse, into one `error:` line
  and exit code 2, without a traceback."""
  for bad, message in [("--config.dtype=float16", "error: config.dtype must be one of"),
                       ("--config.no_such_field=3", "error: --config.no_such_field: the config has no field")]:
    proc = run_python("", args=main_args(str(tmp_path / "w"), bad))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_no_mode_imports_tensorflow(tmp_path):
  """TensorFlow takes ~7 s to import here: no mode's modules, the command line, nor writing
  TensorBoard events (cxflax.train.summaries, which writes without it) import it."""
  proc = run_python("import sys\nimport numpy as np\nfrom cxflax import main\n"
                    "from cxflax.train import describe, evaluate, explain, lr_find, predict, train\n"
                    "from cxflax.train.summaries import MetricWriter\n"
                    f"w = MetricWriter({str(tmp_path)!r})\n"
                    "w.write_hparams({'a': 1}); w.write_scalars(1, {'x': 2.0})\n"
                    "w.write_images(1, {'i': np.zeros((1, 4, 4, 3), np.uint8)}); w.close()\n"
                    "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "[]"
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_classification_on_a_real_layout(tmp_path):
  """COVIDx written from phantom X-rays, its label files renamed and named by
  data.train_file / data.test_file, trained, evaluated on its test split, and predicted."""
  from cxflax.data.export import export_covidx
  root = tmp_path / "COVIDx"
  export_covidx(str(root), num_subjects=40, image_size=32, four_class=True)
  (root / "train_COVIDx.txt").rename(root / "my_train_list.txt")
  (root / "test_COVIDx.txt").rename(root / "my_test_list.txt")
  data = ["--config.data.source=covidx", f"--config.data.root={root}", "--config.loss.name=cross_entropy",
          "--config.data.eval_split=test", "--config.data.train_file=my_train_list.txt",
          "--config.data.test_file=my_test_list.txt"]
  workdir = str(tmp_path / "work")
  run = run_main(workdir, *data, "--config.model=resnet10t")
  m = read_json(workdir, "final_metrics.json")["metrics"]
  test = make_source(load_config("resnest.py:runlocal", *data).data, "test")
  assert len(test) == len((root / "my_test_list.txt").read_text().split("\n")) - 1
  probs = checkpoint_predictions(workdir, test, np.arange(len(test)))
  labels = test.labels()
  assert m["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels), abs=1e-9)
  cm = np.zeros((4, 4), int)
  np.add.at(cm, (labels, probs.argmax(1)), 1)
  np.testing.assert_array_equal(m["confusion_matrix"], cm)
  assert "trivial baseline (majority class)" in run.stdout
  # --mode=predict writes each example's predicted class and every class's probability.
  run_main(workdir, *data, "--config.model=resnet10t", "--config.predict.split=test", "--config.predict.last_n=1",
           mode="predict")
  rows = [r.split(",") for r in open(os.path.join(workdir, "predictions_test.csv")).read().splitlines()]
  assert [r[0] for r in rows] == [test.example_name(i) for i in range(len(test))]
  assert [r[1] for r in rows] == [test.class_names[k] for k in probs.argmax(1)]
  np.testing.assert_allclose(np.array([[float(v) for v in r[2:]] for r in rows]), probs, atol=2e-6)


def test_corrupt_image_inside_a_worker_names_the_file(tmp_path):
  from cxflax.data.export import export_per_covid19
  root = tmp_path / "Per-COVID-19"
  export_per_covid19(str(root), num_subjects=6, image_size=32, num_val_subjects=0)
  bad = root / "Train" / "Image_00004.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
  with pytest.raises(DataError, match="Image_00004.png: cannot decode image"):
    run_main(str(tmp_path / "work"), "--config.data.source=per_covid19", f"--config.data.root={root}",
             "--config.data.workers=1", "--config.num_folds=2")
