"""Every recipe's settings held against its paper: tests/paper_settings/seedNNN.py lists, per
recipe (and stage), what the paper or its authors' code states, each with its source; this
compares them with what `--mode=describe` shows. A difference passes only where the recipe lists
it in config.departures with a reason, and its docstring names the field in backticks."""

import importlib
import pkgutil

import pytest

import tests.paper_settings
from cxflax import config as config_lib
from cxflax.train.describe import json_ready, stage_settings
from tests.conftest import load_config


def _paper_settings() -> list[tuple[str, str, dict]]:
  """(module, recipe key, {field path: (value, source)}) of every tests/paper_settings module."""
  out = []
  for m in pkgutil.iter_modules(tests.paper_settings.__path__):
    module = importlib.import_module(f"tests.paper_settings.{m.name}")
    out += [(m.name, key, settings) for key, settings in module.SETTINGS.items()]
  return out


SETTINGS = _paper_settings()


def _described(key: str) -> tuple[dict, object]:
  """(describe's settings of the stage `key` names — 'resnest.py:arg' or 'covid_resnet.py#stage2',
  stages counted from 1 —, the recipe's config)."""
  spec, _, stage = key.partition("#")
  config = load_config(spec)
  stages = config_lib.stage_configs(config_lib.finalize(config))
  index = int(stage.removeprefix("stage")) - 1 if stage else 0
  assert 0 <= index < len(stages), f"{key}: the recipe has {len(stages)} stage(s)"
  return stage_settings(stages[index]), config


def _docstring(key: str) -> str:
  return importlib.import_module(f"configs.{key.split('.py')[0]}").__doc__ or ""


def _same(described, paper) -> bool:
  paper = json_ready(paper)
  if isinstance(paper, float) or isinstance(described, float):
    return isinstance(described, (int, float)) and described == pytest.approx(paper, rel=1e-9)
  return described == paper


def test_every_paper_has_its_settings():
  assert {m for m, _, _ in SETTINGS} == {f"seed00{i}" for i in range(5)}


@pytest.mark.parametrize("module,key,settings", SETTINGS, ids=[f"{m}:{k}" for m, k, _ in SETTINGS])
def test_recipe_runs_its_papers_settings_or_names_the_departure(module, key, settings):
  described, config = _described(key)
  departures = dict(config.departures)
  recipe_doc = _docstring(key)
  silent = []
  for path, (value, source) in settings.items():
    assert path in described, f"{key}: describe does not show {path!r} (the paper's {value!r}, {source})"
    if _same(described[path], value):
      continue
    if path not in departures:
      silent.append(f"{path}: paper {value!r} ({source}), recipe {described[path]!r}")
    elif f"`{path}`" not in recipe_doc:
      silent.append(f"{path}: listed as a departure but not named (`{path}`) in the recipe's docstring")
  assert not silent, f"{key} departs from its paper without saying so:\n  " + "\n  ".join(silent)


@pytest.mark.parametrize("recipe", sorted({k.split(".py")[0] for _, k, _ in SETTINGS}))
def test_every_listed_departure_has_a_reason_and_is_in_the_docstring(recipe):
  keys = [k for _, k, _ in SETTINGS if k.split(".py")[0] == recipe]
  for key in keys:
    config = load_config(key.partition("#")[0])
    doc = _docstring(key)
    for path, reason in config.departures:
      assert len(reason) > 10, f"{key}: departure {path!r} gives no reason"
      assert f"`{path}`" in doc, f"{key}: departure {path!r} is not named in configs/{recipe}.py's docstring"
