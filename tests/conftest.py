"""Shared test helpers: subprocess runs (for multi-device / multi-process checks) and tiny configs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torch (a test extra) imports triton when an optimizer is built; importing triton into a process
# that already holds jaxlib's and TensorFlow's LLVM crashed with a segmentation fault here. The
# comparisons run torch on CPU, which never needs triton: make its import fail cleanly.
sys.modules.setdefault("triton", None)


def run_python(code: str, devices: int | None = None, env: dict | None = None, timeout: int = 600,
               args: list[str] | None = None) -> subprocess.CompletedProcess:
  """Runs `code` (or `python -m ...` when args given) in a fresh interpreter, so that XLA_FLAGS
  (simulated device count) take effect; returns the completed process (check=False)."""
  e = dict(os.environ)
  e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
  e.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if devices:
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e.update(env or {})
  cmd = [sys.executable] + (args if args is not None else ["-c", code])
  return subprocess.run(cmd, env=e, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def main_args(workdir, *overrides, mode: str = "train", config: str = "configs/resnest.py:runlocal"):
  """Arguments for `python -m cxflax.main` on a very small phantom run."""
  tiny = ["--config.data.image_size=32", "--config.data.phantom.num_subjects=20",
          "--config.data.phantom.slices_per_subject=(2,3)", "--config.batch_size=8",
          "--config.eval_batch_size=8", "--config.num_epochs=2", "--config.log_every_steps=2"]
  return ["-m", "cxflax.main", f"--config={config}", f"--workdir={workdir}", f"--mode={mode}",
          *tiny, *overrides]


@pytest.fixture
def tiny_config():
  """The runlocal recipe shrunk to seconds: 32-px phantom slices of 20 subjects."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("resnest_config", os.path.join(REPO, "configs", "resnest.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.data.image_size = 32
  c.data.phantom.num_subjects = 20
  c.data.phantom.slices_per_subject = (2, 3)
  c.batch_size = c.eval_batch_size = 8
  c.num_epochs = 2
  return c
