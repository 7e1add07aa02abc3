"""--mode=describe: every stage's effective settings, printed and written as recipe.json, held
against what a run of the same config does."""

import os

import pytest

from tests.conftest import TINY_RUN, load_config, read_json, run_main


def test_describe_counts_the_updates_a_run_makes(tiny_run, tmp_path):
  workdir, _ = tiny_run
  run = run_main(tmp_path, *TINY_RUN, mode="describe")
  (stage,) = run.result["stages"]
  trained = read_json(workdir, "final_metrics.json")
  assert stage["total_updates"] == trained["step"] > 0
  assert stage["steps_per_epoch"] * stage["num_epochs"] == trained["step"]
  assert stage["model"] == "resnet10t" and stage["data.image_size"] == 32
  assert read_json(tmp_path, "recipe.json") == run.result
  assert not os.path.exists(tmp_path / "checkpoints")  # described, not trained
  assert "stage 1 of 1" in run.stdout and '"resnet10t"' in run.stdout


def test_describe_shows_each_stage_and_the_schedule_in_updates(tmp_path):
  run = run_main(tmp_path, "--config.optim.grad_accum_steps=2", mode="describe", config="covid_resnet.py:runlocal")
  config = load_config("covid_resnet.py:runlocal")
  stages = run.result["stages"]
  assert len(stages) == len(config.stages) > 1
  for described, overrides in zip(stages, config.stages):
    overrides = dict(overrides)
    for key in ("data.image_size", "num_epochs", "optim.freeze"):
      value = overrides[key]
      assert described[key] == (list(value) if isinstance(value, tuple) else value), key
    low, high = overrides["optim.group_lr_range"]
    assert [g["learning_rate"] for g in described["optim.groups"]] == pytest.approx([low, (low * high) ** 0.5, high])
    # Every epoch ends with an update: an odd batch left over makes one of its own.
    assert described["updates_per_epoch"] == -(-described["steps_per_epoch"] // 2)
    assert described["examples_per_update"] == 2 * described["batch_size"]
  assert stages[-1]["optim.groups"][0]["learning_rate"] < stages[-1]["optim.groups"][2]["learning_rate"]


def test_describe_names_how_weight_decay_applies_and_the_loss_parameters(tmp_path):
  run = run_main(tmp_path, "--config.schedule.name=cosine_restarts", "--config.schedule.period_epochs=2",
                 mode="describe", config="sensemble.py:resnest14d,runlocal")
  (s,) = run.result["stages"]
  assert s["optim.name"] == "adamw" and "decoupled" in s["optim.weight_decay_applied"]
  assert s["loss.name"] == "smooth_l1" and s["loss.beta"] == 1.0 and "loss.margin" not in s
  assert s["schedule.period_updates"] == 2 * s["updates_per_epoch"]
  assert s["schedule.restart_mult"] == 1
  ensemble = run_main(tmp_path / "e", mode="describe", config="flannel.py:ensemble,runlocal").result["stages"][0]
  assert ensemble["loss.name"] == "focal" and ensemble["loss.alpha"] == []
  assert ensemble["ensemble.kind"] == "flannel" and ensemble["optim.freeze"] == ["^members_"]


def test_describe_of_a_dataset_that_is_not_there_says_why(tmp_path):
  run = run_main(tmp_path, mode="describe", config="covid_resnet.py", tiny=False)
  s = run.result["stages"][0]
  assert s["train_examples"] is None and s["total_updates"] is None
  assert "config.data.root" in s["train_examples_unknown"]
  assert s["schedule.name"] and s["optim.learning_rate"] > 0  # the settings themselves are there


def test_every_key_describe_shows_is_documented_in_the_readme(tmp_path):
  import re
  with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
    readme = f.read()
  section = readme.split("### What `--mode=describe` shows", 1)[1].split("\n#", 1)[0]
  documented = set(re.findall(r"`([a-z0-9_.]+)`", section))
  groups = {k[:-1] for k in re.findall(r"`([a-z_]+\.)\*`", section)}  # `patches.*` and the like
  keys = set()
  for spec in ("covid_resnet.py:runlocal", "flannel.py:ensemble,runlocal", "patched_flannel.py:resnet10t,runlocal",
               "densenet_ct.py:triplet,runlocal", "resnest.py:multitask,runlocal", "sensemble.py:warm,runlocal"):
    for stage in run_main(tmp_path / spec, "--config.optim.sam_rho=0.05", mode="describe", config=spec,
                          tiny=False).result["stages"]:
      keys |= set(stage)
  undocumented = {k for k in keys if k not in documented and k.split(".")[0] not in groups}
  assert not undocumented, f"describe keys the README does not name: {sorted(undocumented)}"
