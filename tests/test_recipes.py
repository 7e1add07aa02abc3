"""The papers' recipes end to end on phantom data: a recipe that learns, every head and stage
mechanism, ensembles, the training phases of seed 004, cross-validation, the LR range test,
prediction averaging and pseudo-labelling. Runs are shrunk to seconds (TINY) except the learning
check; `-m slow` trains every recipe's :runlocal in full and checks that it learns."""

import csv
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.recipes import CONFIGS as RUNLOCAL
from cxflax.data.images import read_image
from cxflax.data.pipeline import create_input
from cxflax.data.sources import make_source
from cxflax.models.ensembles import FeatureEnsemble, ModelSE, NeuralWeightEnsemble
from cxflax.train.metrics import classification_metrics
from tests.conftest import (TINY, assert_same_variables, checkpoint_predictions, held_out, load_config,
                            once_per_test_run, random_variables, read_json, run_main, run_python, run_variables)


def _held_out(workdir):
  """The source and held-out indices a run evaluated on, from the config in its checkpoint."""
  from cxflax.train.build import load_run
  return held_out(load_run(workdir).config)


def _accuracy_and_confusion(workdir, n):
  source, held_out = _held_out(workdir)
  probs = checkpoint_predictions(workdir, source, held_out)
  m = classification_metrics(probs.argmax(1), source.labels()[held_out], n)
  return m["accuracy"], np.asarray(m["confusion_matrix"])


# --- ensemble modules against their formulas -----------------------------------------------------


def test_config_arguments_take_one_choice_and_any_flags():
  from configs.common import parse_arg
  from cxflax.errors import ConfigError
  assert parse_arg("b,x", flags=("x", "y"), choices=("a", "b"), default="a") == ("b", {"x"})
  assert parse_arg(None, flags=("x",), choices=("a", "b"), default="a") == ("a", set())
  assert parse_arg(" y , x ,", flags=("x", "y")) == (None, {"x", "y"})
  with pytest.raises(ConfigError, match=r"unknown config argument\(s\) \['z'\]; this recipe takes one of a, b "
                     r"and any of x, y; for a model it does not list, add --config.model=NAME$"):
    parse_arg("a,z", flags=("x", "y"), choices=("a", "b"))
  with pytest.raises(ConfigError, match=r"give one of a, b, not \['a', 'b'\]"):
    parse_arg("a,b", choices=("a", "b"))
  with pytest.raises(ConfigError, match="this recipe takes no argument; for a model it does not list"):
    parse_arg("x")
  # A recipe built on another imports it as a module: patched FLANNEL takes FLANNEL's arguments.
  assert load_config("patched_flannel.py:resnet18,ensemble").ensemble.kind == "flannel"


@pytest.mark.parametrize("arg", ["resnest50d", "resnest50d,runlocal"])
def test_sensemble_resizes_to_the_image_size_plus_32_before_its_centre_crop(arg):
  """The authors resize to size + 32 and centre-crop size: 128 px is 160 → 128 (not the centre
  half of a fixed 256), and the image that comes out is the crop of the resized slice."""
  from cxflax.config import finalize
  from cxflax.data.transforms import Preprocess
  c = finalize(load_config(f"sensemble.py:{arg}", "--config.data.image_size=128"))
  assert c.data.train_pp.startswith("to_rgb|resize(160)|center_crop(128)|flip_lr(0.5)|")
  assert c.data.eval_pp == "to_rgb|resize(160)|center_crop(128)|normalize('imagenet')"
  assert finalize(load_config("sensemble.py")).data.eval_pp.startswith("to_rgb|resize(256)|center_crop(224)|")
  image = np.random.default_rng(0).integers(0, 256, (300, 300, 1), np.uint8)
  out = Preprocess("to_rgb|resize(160)|center_crop(128)").random_map({"image": image}, np.random.default_rng(0))
  resized = Preprocess("to_rgb|resize(160)").random_map({"image": image}, np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], resized["image"][16:144, 16:144])


@pytest.mark.parametrize("template,bad", [("resize({size*2})", "'{size*2}'"), ("resize({sise+32})", "'{sise+32}'"),
                                          ("resize({size+32)", "unmatched brace"),
                                          ("resize(size})", "unmatched brace")])
def test_malformed_preprocessing_templates_are_config_errors(template, bad):
  from cxflax.config import finalize
  from cxflax.errors import ConfigError
  c = load_config("sensemble.py:runlocal")
  c.data.eval_pp = template
  with pytest.raises(ConfigError, match=r"config\.data\.eval_pp: .*" + re.escape(bad)):
    finalize(c)
  c.data.eval_pp = "resize({ size - 8 })|center_crop({size})"
  assert finalize(c).data.eval_pp == "resize(56)|center_crop(64)"


# Every word each recipe takes: its model (or phase) choices, small models included, then its flags.
RECIPE_ARGUMENTS = {
    "sensemble.py": ("resnest50d, resnetrs50, seresnext50_32x4d, ecaresnet50t, skresnext50_32x4d, seresnet50, "
                     "resnest14d, resnet10t", "ensemble, average, warm, runlocal"),
    "flannel.py": ("densenet161, inception_v3, resnet152, resnext101_32x8d, vgg19_bn, resnet10t, resnet18",
                   "ensemble, softmax, runlocal"),
    "patched_flannel.py": ("densenet161, inception_v3, resnet152, resnext101_32x8d, vgg19_bn, resnet10t, resnet18",
                           "ensemble, softmax, runlocal"),
    "densenet_ct.py": ("finetune, triplet, classify", "runlocal"),
    "resnest.py": ("", "runlocal, multitask, kl"),
    "covid_resnet.py": ("", "runlocal"),
    "lung_seg.py": ("", "runlocal"),
}


@pytest.mark.parametrize("recipe", sorted(RECIPE_ARGUMENTS))
def test_each_recipe_refuses_an_unknown_argument_listing_all_it_takes(recipe):
  """The error of a real --config=RECIPE:resnet50x (a model no recipe lists) as the flag parser
  reports it: every accepted word, and how to run a model the recipe does not list."""
  from absl import flags
  choices, flag_words = RECIPE_ARGUMENTS[recipe]
  takes = " and ".join(([f"one of {choices}"] if choices else []) + [f"any of {flag_words}"])
  with pytest.raises(flags.IllegalFlagValueError) as e:
    load_config(f"{recipe}:resnet50x,runlocal")
  assert (f"unknown config argument(s) ['resnet50x']; this recipe takes {takes}; for a model it does not "
          "list, add --config.model=NAME") in str(e.value)
  config = load_config(f"{recipe}:runlocal", "--config.model=resnet18")  # ... which it then runs
  assert config.model == "resnet18"


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


# --- recipes -----------------------------------------------------------------------------------------


@pytest.mark.optimized
def test_flannel_vgg19_bn_keeps_torchvisions_two_classifier_dropouts():
  """torchvision's vgg19_bn classifier, which the authors keep but for its last layer: fc →
  ReLU → Dropout(0.5) → fc → ReLU → Dropout(0.5) → fc. The first dropout is inside the backbone
  (timm's pre-logits), the second the head's: both act in training only."""
  from cxflax.config import finalize
  from cxflax.train.build import build_model
  from cxflax.train.tasks import TASKS
  config = finalize(load_config("flannel.py:vgg19_bn"))
  net = build_model(config, TASKS.get("classification"), ["covid", "viral", "bacterial", "normal"])
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  v = random_variables(net, x)  # 140M parameters: init's random generators took 13 s here
  backbone = {"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}

  def features(key, train):
    return net.backbone.apply(backbone, x, train=train, rngs={"dropout": key}, mutable=["batch_stats"])[0]

  def logits(f, key, train):
    return net.head.apply({"params": v["params"]["head"]}, f, train=train, rngs={"dropout": key})

  f = features(jax.random.key(2), False)
  assert f.shape == (2, 1, 1, 4096)  # the pre-logits map: fc2's output, after its ReLU
  assert not np.allclose(features(jax.random.key(2), True), features(jax.random.key(3), True))
  np.testing.assert_array_equal(f, features(jax.random.key(3), False))
  assert not np.allclose(logits(f, jax.random.key(2), True), logits(f, jax.random.key(3), True))
  np.testing.assert_array_equal(logits(f, jax.random.key(2), False), logits(f, jax.random.key(3), False))


@pytest.mark.optimized
def test_resnest_recipe_learns(tmp_path):
  """configs/resnest.py:runlocal at its own model and image size (resnest14d, 64 px), shortened
  to 8 of its 12 epochs on half its phantom subjects, beats the training-mean baseline clearly:
  its MAE ended at 0.68, 0.72, 0.70 and 0.74 of the baseline's as its arithmetic changed by
  rounding alone (compiler emitters, a finiteness check added to the step; each repeatable), so
  the bar is 0.8. (`-m slow` runs every recipe's :runlocal unshortened.) It trains in a process
  of its own with XLA's default emitters, which run a step faster than the suite's
  quicker-compiling ones (tests/conftest.py)."""
  wd = str(tmp_path / "w")
  proc = run_python("", args=["-m", "cxflax.main", "--config=configs/resnest.py:runlocal", f"--workdir={wd}",
                              "--config.data.phantom.num_subjects=50", "--config.num_epochs=8",
                              "--config.eval_every_epochs=4"], default_emitters=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = read_json(wd, "final_metrics.json")
  assert final["metrics"]["mae"] < 0.8 * final["baseline"]["mae"], final
  source, held_out = _held_out(wd)
  pred = checkpoint_predictions(wd, source, held_out)
  assert final["metrics"]["mae"] == pytest.approx(np.mean(np.abs(pred - source.labels()[held_out])), rel=1e-4)


def test_multitask_kl_head(tmp_path):
  """resnest.py:kl (seed 001's approach 3): a 101-way distribution and a regressor fed by it,
  hybrid pooling; the reported MAE is the regressor's, recomputed here from the checkpoint."""
  wd = str(tmp_path / "w")
  run_main(wd, "--config.model=resnet10t", config="resnest.py:kl,runlocal")
  head = run_variables(wd)["params"]["head"]
  shapes = {k: v["kernel"].shape for k, v in head.items() if "kernel" in v}
  assert (512, 101) in shapes.values() and (101, 1) in shapes.values(), shapes
  source, held_out = _held_out(wd)
  pred = checkpoint_predictions(wd, source, held_out)
  mae = read_json(wd, "final_metrics.json")["metrics"]["mae"]
  assert mae == pytest.approx(np.mean(np.abs(pred - source.labels()[held_out])), rel=1e-4)


def _short_stages(config):
  """covid_resnet's five stages (head only, whole network, head only at the second size, whole
  network, whole network at the third size) with one or two one-step epochs each (two in the
  first: in its first step no gradient reaches a block's first BatchNorm, behind the block's
  zero-initialised last one)."""
  config.stages = tuple(dict(stage, num_epochs=n) for stage, n in zip(config.stages, (2, 1, 1, 1, 2)))


def test_stages_freeze_the_backbone_and_resume_across_stages(tmp_path):
  """covid_resnet's first stage trains the head only (BatchNorm aside); a run stopped inside the
  last stage, or preempted at the end of the first, resumes there and ends with the parameters of
  an uninterrupted run."""
  import shutil
  from cxflax.train.build import load_run
  from cxflax.train.steps import init_variables
  straight, halted = str(tmp_path / "straight"), str(tmp_path / "halted")
  # 16 one-image subjects, 12 in training: one step of 8 per epoch (steps 1-2, 3, 4, 5, 6-7), a
  # checkpoint at each; evaluations at the end of each stage.
  args = ["--config.data.phantom.num_subjects=16", "--config.batch_size=8", "--config.eval_batch_size=8",
          "--config.keep_checkpoints=20", "--config.model=resnet10t", "--config.eval_every_epochs=100"]
  kw = dict(config="covid_resnet.py:runlocal", edit=_short_stages, tiny=False)
  run_main(straight, *args, **kw)
  # The run as stopped at step 6, inside stage 5 (halt_after_steps and SIGTERM write that
  # checkpoint as any other: tests/test_faults.py): its checkpoints up to step 6.
  shutil.copytree(straight, halted)
  shutil.rmtree(os.path.join(halted, "checkpoints", "7"))
  os.remove(os.path.join(halted, "final_metrics.json"))
  resumed = run_main(halted, *args, **kw)
  assert "resumed from" in resumed.log and "(stage 5 of 5)" in resumed.log
  assert_same_variables(run_variables(halted), run_variables(straight), rtol=1e-6, what="resumed in stage 5")
  # A SIGTERM noticed at a stage's last step (step 2, the end of stage 1: the preemption check
  # answers yes there, as after a real signal; tests/test_faults.py sends real ones) stops the run
  # with that stage's checkpoint instead of starting stage 2, and the same command goes on from it.
  from cxflax.train.checkpoint import Checkpoints, checkpoint_dir
  from cxflax.train.train import Preemption
  preempted = str(tmp_path / "preempted")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(Preemption, "reached", lambda self, step: step == 2)
    stopped = run_main(preempted, *args, **kw)
  assert "preempted at step 2 (SIGTERM): checkpoint saved" in stopped.log and "stage 2 of 5" not in stopped.log
  assert Checkpoints(checkpoint_dir(preempted), create=False).all_steps() == [1, 2]
  assert not os.path.exists(os.path.join(preempted, "final_metrics.json"))
  resumed = run_main(preempted, *args, **kw)
  assert "/2 (stage 1 of 5)" in resumed.log and "stage 2 of 5" in resumed.log
  assert_same_variables(run_variables(preempted), run_variables(straight), rtol=1e-6, what="preempted at stage 1's end")
  run = load_run(straight, 2)  # the end of stage 1
  fresh = init_variables(run.model, (48, 48, 3), run.config.seed)["params"]
  after = run.variables["params"]
  assert np.array_equal(after["backbone"]["layer2_0"]["conv1"]["kernel"], fresh["backbone"]["layer2_0"]["conv1"]["kernel"])
  assert not np.array_equal(after["backbone"]["layer2_0"]["bn1"]["scale"], fresh["backbone"]["layer2_0"]["bn1"]["scale"])
  assert not np.array_equal(after["head"]["fc2"]["kernel"], fresh["head"]["fc2"]["kernel"])
  later = run_variables(straight, 3)["params"]  # stage 2 trains the whole network
  assert not np.array_equal(later["backbone"]["layer2_0"]["conv1"]["kernel"], fresh["backbone"]["layer2_0"]["conv1"]["kernel"])


def two_members(base, *overrides, config: str) -> list[str]:
  """Two trained runs for an ensemble, for the price of one: a TINY run (two epochs), and a copy
  of it without its last checkpoint, so that the second member is the first after one epoch."""
  import shutil
  first, second = str(base / "member0"), str(base / "member1")
  run_main(first, *overrides, config=config)
  shutil.copytree(first, second)
  steps = sorted(int(s) for s in os.listdir(os.path.join(second, "checkpoints")) if s.isdigit())
  assert len(steps) == 2
  shutil.rmtree(os.path.join(second, "checkpoints", str(steps[-1])))
  return [first, second]


@pytest.fixture(scope="session")
def members(tmp_path_factory):
  """members(recipe): two members of the smallest backbone (the mechanism is what is tested),
  trained once per test run for each recipe a test asks for, whichever worker runs it."""
  made = {}

  def get(recipe):
    if recipe not in made:
      made[recipe] = once_per_test_run(tmp_path_factory, f"members-{recipe}", lambda folder: two_members(
          folder, config=f"{recipe}.py:resnet10t,runlocal"))
    return made[recipe]
  return get


@pytest.mark.parametrize("recipe,arg", [("sensemble", "ensemble"), ("sensemble", "average"),
                                        ("flannel", "ensemble")])
def test_ensemble_stage_trains_on_frozen_members(tmp_path, members, recipe, arg):
  from cxflax.train.build import load_run
  wd = str(tmp_path / "ens")
  run_main(wd, "--config.num_epochs=1", f"--config.ensemble.members={tuple(members(recipe))}",
           mode="ensemble", config=f"{recipe}.py:{arg},runlocal")
  ensemble = load_run(wd).variables["params"]
  sources = [run_variables(m)["params"]["backbone"] for m in members(recipe)]
  assert not np.array_equal(*(s["conv1_0"]["kernel"] for s in sources))  # two different members
  for i, source in enumerate(sources):  # each in its place, unchanged by training
    inside = ensemble["backbone"][f"members_{i}"] if recipe == "sensemble" else ensemble[f"members_{i}"]["backbone"]
    assert_same_variables(inside, source, rtol=0, what=f"frozen member {i}")
  # The ensemble's reported metric is that of its checkpoint, recomputed here.
  final = read_json(wd, "final_metrics.json")["metrics"]
  source, held_out = _held_out(wd)
  pred = checkpoint_predictions(wd, source, held_out)
  truth = source.labels()[held_out]
  if recipe == "sensemble":
    assert final["mae"] == pytest.approx(np.mean(np.abs(pred - truth)), rel=1e-4)
  else:
    assert final["accuracy"] == pytest.approx(np.mean(pred.argmax(1) == truth), abs=1e-9)


def test_densenet_ct_phases_build_on_each_other(tmp_path):
  previous = None
  for phase in ("finetune", "triplet", "classify"):
    wd = str(tmp_path / phase)
    extra = ["--config.num_epochs=1", "--config.data.stats_images=16", "--config.model=resnet10t",
             "--config.data.phantom.num_subjects=60"]
    if previous:
      extra.append(f"--config.init_from={previous}")
    run_main(wd, *extra, config=f"densenet_ct.py:{phase},runlocal")
    previous = wd
  # The triplet phase reports how well its embedding clusters: leave-one-out nearest-neighbour
  # accuracy, recomputed here from the embeddings of its checkpoint.
  trip = str(tmp_path / "triplet")
  source, held_out = _held_out(trip)
  e = checkpoint_predictions(trip, source, held_out)
  d = ((e[:, None] - e[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  labels = source.labels()[held_out]
  assert read_json(trip, "final_metrics.json")["metrics"]["accuracy"] == pytest.approx(
      np.mean(labels[d.argmin(1)] == labels), abs=1e-9)
  # The classify phase adds one linear layer on the 512-d embedding; the backbone stays as the
  # triplet phase left it, the embedding layers it started from train on.
  trip_params, cls = run_variables(trip)["params"], run_variables(str(tmp_path / "classify"))["params"]
  assert set(cls["head"]) == set(trip_params["head"]) | {"cls1"}
  assert cls["head"]["cls1"]["kernel"].shape == (512, 2)
  assert_same_variables(cls["backbone"], trip_params["backbone"], rtol=0, what="frozen backbone")
  for layer in ("fc1", "fc3"):
    kernel, start = cls["head"][layer]["kernel"], trip_params["head"][layer]["kernel"]
    assert not np.array_equal(kernel, start)  # trained ...
    assert np.abs(kernel - start).max() < 0.1 * np.abs(start).max()  # ... from the triplet's


# --- modes -------------------------------------------------------------------------------------------


def test_cross_validation_reports_every_fold_and_skips_finished_ones(tmp_path):
  """Each fold's metrics are those of its own checkpoint on its own held-out fold (recomputed
  here), the mean is over the folds, the confusion matrices add up; a second cv run trains only
  the folds that have no result (fold 1 resumes from its last checkpoint and is only evaluated)."""
  wd = str(tmp_path / "cv")
  args = ("--config.num_folds=2", "--config.num_epochs=1")
  kw = dict(mode="cv", config="flannel.py:resnet10t,runlocal")
  first = run_main(wd, *args, **kw)
  cv = read_json(wd, "cv_metrics.json")
  assert len(cv["folds"]) == 2
  recomputed = [_accuracy_and_confusion(os.path.join(wd, f"fold_{k}"), 4) for k in range(2)]
  for fold, (acc, cm) in zip(cv["folds"], recomputed):
    assert fold["accuracy"] == pytest.approx(acc, abs=1e-9)
    np.testing.assert_array_equal(fold["confusion_matrix"], cm)
  assert cv["mean"]["accuracy"] == pytest.approx(np.mean([a for a, _ in recomputed]), abs=1e-9)
  np.testing.assert_array_equal(cv["confusion_matrix"], recomputed[0][1] + recomputed[1][1])
  for key in ("macro_f1", "auc", "sensitivity/covid19", "ppv/normal", "f1/viral"):
    assert key in cv["mean"]
  assert f"Cross-validation over 2 folds: accuracy={cv['mean']['accuracy']:.4f}" in first.stdout
  os.remove(os.path.join(wd, "fold_1", "final_metrics.json"))
  steps = sorted(os.listdir(os.path.join(wd, "fold_1", "checkpoints")))
  again = run_main(wd, *args, **kw)
  assert "fold 0 already trained" in again.log and "fold 1 already trained" not in again.log
  assert "resumed from" in again.log  # fold 1: its last checkpoint, evaluated, not trained again
  assert sorted(os.listdir(os.path.join(wd, "fold_1", "checkpoints"))) == steps
  assert read_json(wd, "cv_metrics.json") == cv


def test_cross_validation_of_finished_regression_folds(tiny_run, tmp_path):
  """cv over folds that all have results trains nothing and reports their MAE's mean and spread."""
  import json
  from tests.conftest import TINY_RUN
  final = read_json(tiny_run[0], "final_metrics.json")
  maes = [final["metrics"]["mae"], final["metrics"]["mae"] + 2.0]
  for k, mae in enumerate(maes):
    os.makedirs(tmp_path / "cv" / f"fold_{k}")
    with open(tmp_path / "cv" / f"fold_{k}" / "final_metrics.json", "w") as f:
      json.dump({**final, "metrics": {**final["metrics"], "mae": mae}}, f)
  run = run_main(str(tmp_path / "cv"), *TINY_RUN, "--config.num_folds=2", mode="cv")
  cv = read_json(tmp_path / "cv", "cv_metrics.json")
  assert cv["mean"]["mae"] == pytest.approx(maes[0] + 1.0) and cv["std"]["mae"] == pytest.approx(1.0)
  assert f"Cross-validation over 2 folds: mae={maes[0] + 1.0:.4f} ± 1.0000" in run.stdout
  assert "stage 1 of 1" not in run.log


def test_lr_find_writes_csv_png_and_a_rate(tmp_path):
  """A real sweep of 24 steps follows fastai v1's LRFinder: its rates, its smoothed loss, its stop
  rule, and a suggestion at the steepest descent of the smoothed loss outside the first 10 and
  last 5 steps (recorder.plot(skip_start=10, skip_end=5, suggestion=True))."""
  wd, n = str(tmp_path / "lr"), 24
  run = run_main(wd, f"--config.lr_find.steps={n}", mode="lr_find", config="covid_resnet.py:runlocal")
  with open(os.path.join(wd, "lr_find.csv")) as f:
    rows = list(csv.DictReader(f))
  rates = np.array([float(r["learning_rate"]) for r in rows])
  loss = np.array([float(r["loss"]) for r in rows])
  smoothed = np.array([float(r["smoothed_loss"]) for r in rows])
  # step i at 1e-7 · (1e8)^(i / n): fastai's Scheduler never reaches `end` itself
  np.testing.assert_allclose(rates, 1e-7 * (1e8 ** (1 / n)) ** np.arange(len(rates)), rtol=1e-5)
  ema = np.zeros(len(loss))
  for i, value in enumerate(loss):  # SmoothenValue(0.98): moving average, bias-corrected
    ema[i] = 0.98 * (ema[i - 1] if i else 0.0) + 0.02 * value
  np.testing.assert_allclose(smoothed, ema / (1 - 0.98 ** np.arange(1, len(loss) + 1)), rtol=1e-6)
  best = np.minimum.accumulate(smoothed)
  assert np.all(smoothed[:-1] <= 4 * best[:-1])  # no earlier stop ...
  assert len(rows) == n or smoothed[-1] > 4 * best[-1]  # ... and the sweep ends by fastai's rule
  assert len(rows) - 15 >= 2, "the sweep stopped too early for a suggestion by gradient"
  assert os.path.getsize(os.path.join(wd, "lr_find.png")) > 1000
  plot = read_image(os.path.join(wd, "lr_find.png"))  # a real PNG, of the plot's 640x420 pixels
  assert plot.shape == (420, 640, 3) and len(np.unique(plot.reshape(-1, 3), axis=0)) > 10
  suggested = float(run.stdout.split("suggested learning rate ")[1].split()[0])
  i = int(np.argmin(np.abs(np.log(rates / suggested))))
  assert abs(np.log10(rates[i] / suggested)) < 0.01  # one of the swept rates (printed to 3 digits)
  assert 10 <= i < len(rows) - 5  # not one of the skipped steps
  kept = np.gradient(smoothed[10:len(rows) - 5])
  assert kept[i - 10] == kept.min()  # where the smoothed loss falls fastest


def test_suggested_rate_is_the_steepest_descent():
  from cxflax.train.lr_find import suggest_learning_rate
  rates = np.logspace(-6, 0, 61)
  loss = 2.0 - np.tanh((np.log10(rates) + 3.0) * 2) + np.where(rates > 0.1, 50 * (rates - 0.1), 0)
  assert suggest_learning_rate(rates, loss) == pytest.approx(1e-3, rel=0.25)
  # A steeper dip among the first 10 steps (the noise of the first batches) is skipped.
  dipped = loss.copy()
  dipped[3:10] -= 1.0
  assert suggest_learning_rate(rates, dipped) == pytest.approx(1e-3, rel=0.25)
  assert suggest_learning_rate(rates, dipped, skip_start=0) == pytest.approx(rates[3], rel=1e-6)
  # So is the blow-up of the last 5 steps, however it falls there.
  tail = loss.copy()
  tail[-5:] = [9.0, 1.0, 9.0, 1.0, 9.0]
  assert suggest_learning_rate(rates, tail) == pytest.approx(1e-3, rel=0.25)
  # Too short a sweep for a gradient: fastai's other figure, the rate at the lowest loss / 10.
  assert suggest_learning_rate(rates[:16], loss[:16]) == pytest.approx(rates[15] / 10)


def _val_split():
  return make_source(load_config("resnest.py:runlocal", *TINY).data, "val", unlabeled_ok=True)


def test_predict_averages_the_last_checkpoints(tiny_run):
  """--mode=predict with last_n=2: each value is the mean of the two checkpoints' predictions
  (recomputed here), the metrics are those of the mean; round=True rounds each checkpoint's values
  and then their mean, clip_min clips each checkpoint's values before the mean."""
  from tests.conftest import TINY_RUN
  wd, _ = tiny_run
  run = run_main(wd, *TINY_RUN, "--config.predict.last_n=2", mode="predict")
  val = _val_split()
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  each = [checkpoint_predictions(wd, val, np.arange(len(val)), step=s) for s in steps]
  mean = np.mean(each, axis=0)
  assert np.abs(each[0] - each[1]).max() > 0.1  # the two checkpoints really differ
  with open(os.path.join(wd, "predictions_val.csv")) as f:
    rows = list(csv.reader(f))
  assert [r[0] for r in rows] == [val.example_name(i) for i in range(len(val))]
  # written to 4 decimals, computed with BatchNorm folded (other float32 rounding)
  np.testing.assert_allclose([float(r[1]) for r in rows], mean, atol=1e-3)
  metrics = read_json(wd, "predict_metrics_val.json")
  assert [s for _, s in metrics["runs"]] == steps
  assert metrics["metrics"]["mae"] == pytest.approx(np.mean(np.abs(mean - val.labels())), rel=1e-4)
  assert f"Predictions of 2 checkpoint(s) for {len(val)} val examples" in run.stdout
  # round=True (seed 001): each checkpoint's values rounded, then their mean
  run_main(wd, *TINY_RUN, "--config.predict.last_n=2", "--config.predict.round=True", mode="predict")
  with open(os.path.join(wd, "predictions_val.csv")) as f:
    rounded = [float(r[1]) for r in csv.reader(f)]
  np.testing.assert_array_equal(rounded, np.round(np.mean(np.round(each), axis=0)))
  # clip_min (seed 000): each checkpoint's values clipped before averaging
  floor = float(np.median(each[0]))
  run_main(wd, *TINY_RUN, "--config.predict.last_n=2", f"--config.predict.clip_min={floor}", mode="predict")
  with open(os.path.join(wd, "predictions_val.csv")) as f:
    clipped = np.array([float(r[1]) for r in csv.reader(f)])
  np.testing.assert_allclose(clipped, np.mean(np.maximum(each, floor), axis=0), atol=1e-3)
  assert clipped.min() >= floor - 1e-4 and np.abs(clipped - np.maximum(mean, floor)).max() > 1e-2


def test_predict_rounds_and_clips_each_checkpoint_before_the_mean(tiny_run, monkeypatch):
  """predict_source over the tiny run's two checkpoints, their values set to ones where the order
  matters: rounding each (seed 001) then the mean differs from rounding the mean alone, and
  clipping each at 0 (seed 000's authors) differs from clipping the mean."""
  from cxflax import parallel
  from cxflax.errors import ConfigError
  from cxflax.train import checkpoint as ckpt_lib
  from cxflax.train import predict as predict_lib
  wd, _ = tiny_run
  val = _val_split()
  runs = [(wd, s) for s in ckpt_lib.find_steps(wd, last_n=2)[1]]
  assert len(runs) == 2

  def predict(first, second, **kw):
    """predict_source with the two checkpoints' evaluations giving `first` and `second` for
    every example."""
    outputs = iter([first, second])
    monkeypatch.setattr(predict_lib, "run_evaluation", lambda *a, **k: {
        "pred": np.tile(next(outputs), (len(val),) + (1,) * np.ndim(first)), "index": np.arange(len(val))})
    return predict_lib.predict_source(runs, val, 8, parallel.make_mesh(), **kw)

  each = (np.array([1.6, -3.0, 2.4]), np.array([1.2, 1.0, 2.4]))
  for i in range(3):
    assert predict(each[0][i], each[1][i])[0] == pytest.approx([1.4, -1.0, 2.4][i])
    # rounded each: 2 and 1 → 1.5 (then 2 in the CSV; the mean alone would round to 1)
    assert predict(each[0][i], each[1][i], round_each=True)[0] == pytest.approx([1.5, -1.0, 2.0][i])
    # clipped each at 0: 0 and 1 → 0.5 (clipping the mean -1 would give 0)
    assert predict(each[0][i], each[1][i], clip_min=0.0)[0] == pytest.approx([1.4, 0.5, 2.4][i])
  with pytest.raises(ConfigError, match="config.predict.clip_min"):  # class probabilities
    predict(np.full(4, 0.25), np.full(4, 0.25), clip_min=0.0)


def test_pseudo_labels_extend_training_with_those_labels(tiny_run, tmp_path):
  """config.pseudo_label.runs labels the val split with the runs' averaged predictions (rounded
  with round=True), and exactly those examples, with those labels, join the training split."""
  from cxflax import parallel
  from cxflax.config import finalize
  from cxflax.train.train import pseudo_labelled
  from tests.conftest import TINY_RUN
  wd, _ = tiny_run
  overrides = (*TINY, *TINY_RUN, f"--config.pseudo_label.runs=('{wd}',)", "--config.pseudo_label.round=True")
  config = finalize(load_config("resnest.py:runlocal", *overrides))
  val = _val_split()
  expected = np.round(checkpoint_predictions(wd, val, np.arange(len(val))))
  extra = pseudo_labelled(config, parallel.make_mesh())
  np.testing.assert_allclose(extra.labels(), expected)
  plain = create_input(config)
  joined = create_input(config, extra=extra)
  added = np.setdiff1d(joined.train_indices, plain.train_indices)
  assert len(joined.train_indices) == len(plain.train_indices) + len(val) and len(added) == len(val)
  np.testing.assert_allclose(joined.source.labels()[added], expected)
  np.testing.assert_array_equal(joined.eval_indices, plain.eval_indices)  # never evaluated on
  for i in (0, len(val) - 1):  # the images are the val split's
    np.testing.assert_array_equal(joined.source.load(int(added[i]))["image"], val.load(i)["image"])
  # and through the main job
  run = run_main(str(tmp_path / "pseudo"), *TINY_RUN, "--config.num_epochs=1", "--config.schedule.warmup_epochs=0.5",
                 f"--config.pseudo_label.runs=('{wd}',)")
  assert f"{len(val)} examples of the val split labelled by 1 run(s)" in run.log
  assert f"{len(joined.train_indices)} training / {len(joined.eval_indices)} evaluation examples" in run.log


# --- the :runlocal variants learn (minutes each) ---------------------------------------------------


def _headline(final: dict) -> tuple[str, float, float, float]:
  """(metric, value, baseline, the margin a run must beat the baseline by) of a final_metrics.json."""
  m, b = final["metrics"], final["baseline"]
  if "mae" in m:
    return "mae", m["mae"], b["mae"], 0.3 * b["mae"]
  if "jaccard" in m:
    return "jaccard", m["jaccard"], b["jaccard"], 0.3
  return "accuracy", m["accuracy"], b["accuracy"], 0.1


@pytest.mark.optimized
@pytest.mark.slow
@pytest.mark.parametrize("config", RUNLOCAL)
def test_runlocal_learns_in_float32_and_in_bfloat16(tmp_path, config):
  """Every recipe's :runlocal learns (beats its trivial baseline by the margin), in float32 and in
  bfloat16 (what dtype='auto' gives on GPUs), and bfloat16 ends within noise of float32: no
  farther from it than twice what another seed moves the float32 run, or a quarter of what
  float32 gained over the baseline, whichever is larger. (Seeds move these small runs a lot:
  patched_flannel.py:resnet10t,runlocal reached 0.81, 0.51 and 0.63 accuracy in float32 at
  seeds 0, 1 and 2; benchmarks/NOTES.md §15.)"""
  results = {}
  for dtype, seed in (("float32", 0), ("bfloat16", 0), ("float32", 1)):
    wd = str(tmp_path / f"{dtype}-{seed}")
    proc = run_python("", args=["-m", "cxflax.main", f"--config=configs/{config}", f"--workdir={wd}",
                                f"--config.dtype={dtype}", f"--config.seed={seed}"], timeout=3600,
                      default_emitters=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, value, baseline, margin = _headline(read_json(wd, "final_metrics.json"))
    gain = baseline - value if name == "mae" else value - baseline
    assert gain > margin, (dtype, seed, name, value, baseline)
    results[dtype, seed] = (value, gain)
  (f32, gain), (bf16, _), (other_seed, _) = results["float32", 0], results["bfloat16", 0], results["float32", 1]
  assert abs(bf16 - f32) <= max(2 * abs(other_seed - f32), 0.25 * gain), results
