"""The papers' recipes end to end on tiny phantom data: every config, stages, ensembles, the
training phases of seed 004, cross-validation, the LR range test, prediction averaging and
pseudo-labelling. Each run is shrunk to seconds; whether the :runlocal variants *learn* is checked
by the slow test at the end (pytest -m slow) and recorded in the issue notes."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxflax.models.ensembles import FeatureEnsemble, ModelSE, NeuralWeightEnsemble
from tests.conftest import run_python

TINY = ["--config.data.phantom.num_subjects=24", "--config.batch_size=8", "--config.eval_batch_size=8",
        "--config.log_every_steps=2", "--config.data.image_size=32"]


def _main(config, workdir, *extra, mode="train"):
  proc = run_python("", args=["-m", "cxflax.main", f"--config=configs/{config}", f"--workdir={workdir}",
                              f"--mode={mode}", *TINY, *extra])
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _final(workdir):
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    return json.load(f)


# --- ensemble modules against their formulas -----------------------------------------------------


def test_model_se_and_flannel_weights_match_their_formulas():
  rng = np.random.default_rng(0)
  stacked = jnp.asarray(rng.normal(size=(3, 10, 6)), jnp.float32)
  se = ModelSE()
  v = se.init(jax.random.key(0), stacked)
  w1, w2 = np.asarray(v["params"]["fc1"]["kernel"]), np.asarray(v["params"]["fc2"]["kernel"])
  s = np.asarray(stacked).mean(1)
  gate = 1 / (1 + np.exp(-(np.maximum(s @ w1, 0) @ w2)))
  np.testing.assert_allclose(se.apply(v, stacked), np.asarray(stacked) * gate[:, None, :], rtol=1e-5)

  import flax.linen as nn

  class Fixed(nn.Module):
    logits: tuple

    def __call__(self, x, train=False):
      return jnp.broadcast_to(jnp.asarray(self.logits, jnp.float32), (x.shape[0], len(self.logits)))

  members = tuple(Fixed(tuple(rng.normal(size=4).tolist())) for _ in range(5))
  ens = NeuralWeightEnsemble(members=members)
  x = jnp.zeros((2, 8, 8, 3))
  v = ens.init(jax.random.key(1), x)
  probs = np.stack([np.exp(m.logits) / np.exp(m.logits).sum() for m in members])  # (5, 4)
  flat = probs.reshape(-1)
  k, b = np.asarray(v["params"]["ew1"]["kernel"]), np.asarray(v["params"]["ew1"]["bias"])
  weights = np.tanh(np.outer(flat, flat).reshape(-1) @ k + b)
  np.testing.assert_allclose(ens.apply(v, x)[0], (weights[:, None] * probs).sum(0), rtol=1e-5)
  avg = FeatureEnsemble(members=members)
  np.testing.assert_allclose(avg.apply(avg.init(jax.random.key(0), x), x)[0],
                             np.mean([m.logits for m in members], axis=0), rtol=1e-6)


# --- configs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,extra", [
    ("resnest.py:runlocal", ["--config.num_epochs=2"]),
    ("resnest.py:kl,runlocal", ["--config.num_epochs=2", "--config.model=resnet10t"]),
])
def test_configs_run(tmp_path, config, extra):
  _main(config, str(tmp_path / "w"), *extra)
  final = _final(str(tmp_path / "w"))
  assert final["metrics"] and final["baseline"]


def test_stages_freeze_the_backbone_and_resume_across_stages(tmp_path):
  """covid_resnet's first stage trains the head only (BatchNorm aside); a run halted inside the
  last stage resumes there and ends where an uninterrupted run ends."""
  from cxflax.train.build import load_run
  from cxflax.train.steps import init_variables
  straight, halted = str(tmp_path / "straight"), str(tmp_path / "halted")
  # 16 one-image subjects, 12 in training: one step per epoch; stages of 2, 6, 1, 4, 6 epochs
  # (steps 1-2, 3-8, 9, 10-13, 14-19).
  args = ["--config.data.phantom.num_subjects=16", "--config.keep_checkpoints=20", "--config.model=resnet10t"]
  _main("covid_resnet.py:runlocal", straight, *args)
  _main("covid_resnet.py:runlocal", halted, *args, "--config.halt_after_steps=16")
  assert not os.path.exists(os.path.join(halted, "final_metrics.json"))
  proc = _main("covid_resnet.py:runlocal", halted, *args)
  assert "resumed from" in proc.stderr and "(stage 5 of 5)" in proc.stderr
  assert _final(halted)["metrics"]["accuracy"] == pytest.approx(_final(straight)["metrics"]["accuracy"])
  run = load_run(straight, 2)  # the end of stage 1
  fresh = init_variables(run.model, (32, 32, 3), run.config.seed)["params"]
  after = run.variables["params"]
  assert np.array_equal(after["backbone"]["layer2_0"]["conv1"]["kernel"], fresh["backbone"]["layer2_0"]["conv1"]["kernel"])
  assert not np.array_equal(after["backbone"]["layer2_0"]["bn1"]["scale"], fresh["backbone"]["layer2_0"]["bn1"]["scale"])
  assert not np.array_equal(after["head"]["fc2"]["kernel"], fresh["head"]["fc2"]["kernel"])


@pytest.fixture(scope="module")
def members(tmp_path_factory):
  base = tmp_path_factory.mktemp("members")
  out = {}
  for recipe in ("sensemble", "flannel"):
    for seed in (0, 1):  # two members of the smallest backbone: the mechanism is what is tested
      wd = str(base / f"{recipe}_{seed}")
      _main(f"{recipe}.py:resnet10t,runlocal", wd, "--config.num_epochs=1", f"--config.seed={seed}")
      out.setdefault(recipe, []).append(wd)
  return out


@pytest.mark.parametrize("recipe,arg", [("sensemble", "ensemble"), ("sensemble", "average"),
                                        ("flannel", "ensemble")])
def test_ensemble_stage_trains_on_frozen_members(tmp_path, members, recipe, arg):
  from cxflax.train.build import load_run
  wd = str(tmp_path / "ens")
  _main(f"{recipe}.py:{arg},runlocal", wd, "--config.num_epochs=2",
        f"--config.ensemble.members={tuple(members[recipe])}", mode="ensemble")
  assert _final(wd)["metrics"]
  ensemble = load_run(wd).variables["params"]
  member0 = load_run(members[recipe][0]).variables["params"]
  inside = ensemble["backbone"]["members_0"] if recipe == "sensemble" else ensemble["members_0"]["backbone"]
  original = member0["backbone"]
  for a, b in zip(jax.tree.leaves(inside), jax.tree.leaves(original)):
    np.testing.assert_array_equal(a, b)  # frozen


def test_densenet_ct_phases_build_on_each_other(tmp_path):
  from cxflax.train.build import load_run
  phases = {}
  previous = None
  for phase in ("finetune", "triplet", "classify"):
    wd = str(tmp_path / phase)
    extra = ["--config.num_epochs=1", "--config.data.stats_images=16", "--config.model=resnet10t",
             "--config.data.phantom.num_subjects=60"]
    if previous:
      extra.append(f"--config.init_from={previous}")
    _main(f"densenet_ct.py:{phase},runlocal", wd, *extra)
    phases[phase] = _final(wd)
    previous = wd
  assert "accuracy" in phases["triplet"]["metrics"]  # nearest-neighbour accuracy of the embedding
  trip = load_run(str(tmp_path / "triplet")).variables["params"]
  cls = load_run(str(tmp_path / "classify")).variables["params"]
  np.testing.assert_array_equal(trip["head"]["fc3"]["kernel"], cls["head"]["fc3"]["kernel"])  # frozen


# --- modes -------------------------------------------------------------------------------------------


def test_cross_validation_writes_every_fold(tmp_path):
  wd = str(tmp_path / "cv")
  proc = _main("resnest.py:runlocal", wd, "--config.num_folds=2", "--config.num_epochs=1",
               "--config.warmup_epochs=0.5", "--config.model=resnet10t", mode="cv")
  with open(os.path.join(wd, "cv_metrics.json")) as f:
    cv = json.load(f)
  assert len(cv["folds"]) == 2 and set(cv["mean"]) == {"mae", "rmse"}
  assert cv["mean"]["mae"] == pytest.approx(np.mean([f["mae"] for f in cv["folds"]]))
  assert "Cross-validation over 2 folds" in proc.stdout
  for k in range(2):
    assert os.path.isfile(os.path.join(wd, f"fold_{k}", "final_metrics.json"))


def test_cross_validation_classification_metrics(tmp_path):
  wd = str(tmp_path / "cv")
  _main("flannel.py:resnet10t,runlocal", wd, "--config.num_folds=2", "--config.num_epochs=1", mode="cv")
  with open(os.path.join(wd, "cv_metrics.json")) as f:
    cv = json.load(f)
  for key in ("accuracy", "macro_f1", "auc", "sensitivity/covid19", "ppv/normal", "f1/viral"):
    assert key in cv["mean"]
  assert np.array(cv["confusion_matrix"]).sum() == sum(np.array(f["confusion_matrix"]).sum() for f in cv["folds"])


def test_lr_find_writes_csv_png_and_a_rate(tmp_path):
  wd = str(tmp_path / "lr")
  proc = _main("covid_resnet.py:runlocal", wd, "--config.lr_find.steps=20", mode="lr_find")
  with open(os.path.join(wd, "lr_find.csv")) as f:
    rows = list(csv.DictReader(f))
  rates = [float(r["learning_rate"]) for r in rows]
  assert rates[0] == pytest.approx(1e-7) and all(b > a for a, b in zip(rates, rates[1:]))
  assert os.path.getsize(os.path.join(wd, "lr_find.png")) > 1000
  assert "suggested learning rate" in proc.stdout


def test_suggested_rate_is_the_steepest_descent():
  from cxflax.train.loop import suggest_learning_rate
  rates = np.logspace(-6, 0, 61)
  loss = 2.0 - np.tanh((np.log10(rates) + 3.0) * 2) + np.where(rates > 0.1, 50 * (rates - 0.1), 0)
  assert suggest_learning_rate(rates, loss) == pytest.approx(1e-3, rel=0.25)


def test_predict_averages_checkpoints_and_pseudo_labels_extend_training(tmp_path):
  wd = str(tmp_path / "run")
  _main("resnest.py:runlocal", wd, "--config.num_epochs=2", "--config.model=resnet10t")
  proc = _main("resnest.py:runlocal", wd, "--config.predict.last_n=2", "--config.predict.round=True",
               mode="predict")
  with open(os.path.join(wd, "predictions_val.csv")) as f:
    rows = list(csv.reader(f))
  assert rows[0][0] == "Image_00000.png" and all(float(r[1]) == round(float(r[1])) for r in rows)
  with open(os.path.join(wd, "predict_metrics_val.json")) as f:
    assert len(json.load(f)["runs"]) == 2
  assert "Predictions of 2 checkpoint(s)" in proc.stdout
  pseudo = str(tmp_path / "pseudo")
  proc = _main("resnest.py:runlocal", pseudo, "--config.num_epochs=1", "--config.warmup_epochs=0.5",
               "--config.model=resnet10t", f"--config.pseudo_label.runs=('{wd}',)")
  assert "examples of the val split labelled by 1 run(s)" in proc.stderr


# --- the :runlocal variants learn (minutes each) ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("config", ["resnest.py:runlocal", "resnest.py:multitask,runlocal",
                                    "sensemble.py:resnest14d,runlocal", "covid_resnet.py:runlocal",
                                    "flannel.py:resnet10t,runlocal", "densenet_ct.py:finetune,runlocal",
                                    "lung_seg.py:runlocal", "patched_flannel.py:resnet10t,runlocal"])
def test_runlocal_learns(tmp_path, config):
  wd = str(tmp_path / "w")
  proc = run_python("", args=["-m", "cxflax.main", f"--config=configs/{config}", f"--workdir={wd}"], timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = _final(wd)
  if "mae" in final["metrics"]:
    assert final["metrics"]["mae"] < 0.7 * final["baseline"]["mae"]
  elif "jaccard" in final["metrics"]:
    assert final["metrics"]["jaccard"] > final["baseline"]["jaccard"] + 0.3
  else:
    assert final["metrics"]["accuracy"] > final["baseline"]["accuracy"] + 0.1
