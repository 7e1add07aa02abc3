"""tests/conftest.py's once_per_test_run: what several pytest-xdist workers' tests read is made by
the first worker that asks, once, and read back by the others."""

from __future__ import annotations

import pytest

from tests.conftest import once_per_test_run


class _Factory:
  """A worker's tmp_path_factory: its own base folder, inside the folder of the test run."""

  def __init__(self, run, worker):
    self.base = run / f"popen-{worker}"
    self.base.mkdir(parents=True, exist_ok=True)

  def getbasetemp(self):
    return self.base

  def mktemp(self, name):
    folder = self.base / name
    folder.mkdir()
    return folder


def test_made_once_and_read_back_by_the_other_worker(tmp_path, monkeypatch):
  made = []

  def make(folder):
    made.append(folder)
    (folder / "result.txt").write_text("trained")
    return {"folder": str(folder), "step": 10}

  monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
  first = once_per_test_run(_Factory(tmp_path, "gw0"), "run", make)
  monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
  second = once_per_test_run(_Factory(tmp_path, "gw1"), "run", make)
  assert len(made) == 1 and second == first == {"folder": str(tmp_path / "shared-run"), "step": 10}
  assert (tmp_path / "shared-run" / "result.txt").read_text() == "trained"
  # another name is another value
  assert once_per_test_run(_Factory(tmp_path, "gw1"), "other", lambda f: 7) == 7 and len(made) == 1


def test_a_failed_make_is_made_again_from_an_empty_folder(tmp_path, monkeypatch):
  monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")

  def fail(folder):
    (folder / "partial").write_text("half a checkpoint")
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError, match="killed"):
    once_per_test_run(_Factory(tmp_path, "gw0"), "run", fail)
  monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
  assert once_per_test_run(_Factory(tmp_path, "gw1"), "run", lambda f: sorted(p.name for p in f.iterdir())) == []


def test_without_workers_each_session_makes_its_own(tmp_path, monkeypatch):
  monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
  factory = _Factory(tmp_path, "main")
  assert once_per_test_run(factory, "run", lambda f: str(f)) == str(factory.base / "run")
  assert not (tmp_path / "shared-run").exists()
