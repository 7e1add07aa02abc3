"""Shared test helpers: the main job run in this process (`run_main`) or in a fresh interpreter
(`run_python`, for simulated device counts, process launches and exit codes), tiny configs, one
JAX compilation cache for the whole test run, and the skip policy (tests/skip_policy.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

pytest_plugins = ["pytester", "tests.skip_policy"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torch (a test extra) imports triton when an optimizer is built; importing triton into a process
# that already holds jaxlib's and TensorFlow's LLVM crashed with a segmentation fault here. The
# comparisons run torch on CPU, which never needs triton: make its import fail cleanly.
sys.modules.setdefault("triton", None)

# One persistent compilation cache per test run, shared by this process, the pytest-xdist workers
# it starts and every subprocess (through the environment): the same tiny train and eval steps
# are compiled by many tests. A fresh folder each run, so that no run depends on what an earlier
# one left behind; the process that made it removes it.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _CACHE, _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"], False
else:
  _CACHE, _OWN_CACHE = tempfile.mkdtemp(prefix="cxflax-jax-cache-"), True
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# XLA's CPU backend without its expensive LLVM passes (the HLO passes still run; outputs agree to
# float32 rounding): most of the suite's time is compilation of programs that then run a step or
# two, and this compiles 1.6-2x faster and runs about 2x slower (benchmarks/NOTES.md, section 9).
# Tests that mostly run what they compiled are marked `optimized` (pytest_runtest_call below).
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
# And XLA's CPU backend with its older element-wise emitters instead of the MLIR fusion emitters
# (read once, when the backend starts): they compile about twice as fast at this optimisation
# level (benchmarks/NOTES.md, section 16, has the figures); their reductions round differently
# (outputs agree to float32 rounding). Processes that mostly run what they compiled start with
# XLA's default emitters (python_env(default_emitters=True)).
QUICK_COMPILE_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_COMPILE_EMITTERS}".strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
  import jax
  jax.config.update("jax_compilation_cache_dir", _CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_disable_most_optimizations", True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
  """Tests marked `optimized` (long training, EfficientNet's float64 network) run more than they
  compile: for them, and the processes they start, XLA's full optimisations."""
  if item.get_closest_marker("optimized") is None:
    return (yield)
  import jax
  jax.config.update("jax_disable_most_optimizations", False)
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
  try:
    return (yield)
  finally:
    jax.config.update("jax_disable_most_optimizations", True)
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_CACHE, ignore_errors=True)


# --- the main job ----------------------------------------------------------------------------------

# A very small phantom run of any recipe: 32-px slices of 20 subjects, two epochs.
TINY = ("--config.data.image_size=32", "--config.data.phantom.num_subjects=20",
        "--config.data.phantom.slices_per_subject=(2,3)", "--config.batch_size=8",
        "--config.eval_batch_size=8", "--config.num_epochs=2", "--config.log_every_steps=2")


# The shared trained run (fixture tiny_run): resnest.py:runlocal's recipe with resnet10t, which has
# no bias ahead of a BatchNorm (a bias whose gradient is rounding noise, which Adam turns into
# full-size steps in a random direction, so that two runs could never be compared parameter by
# parameter).
TINY_RUN = ("--config.model=resnet10t",)


def load_config(spec: str, *overrides: str):
  """A recipe config as `python -m cxflax.main --config=configs/SPEC OVERRIDES...` reads it (the
  same ml_collections flag parser, on a private flag set)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["cxflax", f"--config={os.path.join(REPO, 'configs', spec)}", *overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "recipe", flag_values=values,
                                           lock_config=True, sys_argv=argv)
  values(argv)
  return holder.value


@dataclasses.dataclass
class MainRun:
  """What a run of the main job printed (stdout) and logged (absl, INFO and up), and returned."""
  stdout: str
  log: str
  result: object


def run_main(workdir, *overrides: str, mode: str = "train", config: str = "resnest.py:runlocal",
             checkpoint: str | None = None, tiny: bool = True, edit=None) -> MainRun:
  """`python -m cxflax.main --config=configs/CONFIG --workdir=WORKDIR --mode=MODE [TINY] OVERRIDES`
  in this process: the job's own code after flag parsing (cxflax.main.run), without paying for a
  fresh interpreter. `edit(config)` may change what the command line cannot (e.g. stages). Bad
  input raises CxflaxError (the command line turns it into exit code 2, checked in test_main.py)."""
  from absl import logging as absl_logging
  from cxflax import main
  cfg = load_config(config, *(TINY if tiny else ()), *overrides)
  if edit is not None:
    edit(cfg)
  records: list[str] = []

  class Collect(logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())

  handler, logger = Collect(logging.INFO), logging.getLogger("absl")
  verbosity = absl_logging.get_verbosity()
  logger.addHandler(handler)
  absl_logging.set_verbosity(absl_logging.INFO)
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      result = main.run(mode, cfg, str(workdir), checkpoint)
  finally:
    logger.removeHandler(handler)
    absl_logging.set_verbosity(verbosity)
  return MainRun(out.getvalue(), "\n".join(records), result)


def main_args(workdir, *overrides, mode: str = "train", config: str = "configs/resnest.py:runlocal"):
  """Arguments for `python -m cxflax.main` on the TINY run, for tests that need a process."""
  return ["-m", "cxflax.main", f"--config={config}", f"--workdir={workdir}", f"--mode={mode}",
          *TINY, *overrides]


def main_after(before: str, workdir, *overrides) -> str:
  """Python code that runs `before` (which may patch cxflax), then `python -m cxflax.main` on the
  TINY run with `overrides` (main_args) in the same process: a fault injected into the command."""
  return (before + f"import runpy, sys\nsys.argv = ['cxflax.main'] + {main_args(workdir, *overrides)[2:]!r}\n"
          "runpy.run_module('cxflax.main', run_name='__main__', alter_sys=True)\n")


def python_env(devices: int | None = None, env: dict | None = None, default_emitters: bool = False) -> dict:
  """The environment of a subprocess: this checkout importable, the shared compilation cache,
  `devices` simulated CPU devices, and the suite's quick-compiling emitters unless
  `default_emitters`."""
  e = dict(os.environ)
  e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
  if default_emitters:
    e["XLA_FLAGS"] = e["XLA_FLAGS"].replace(QUICK_COMPILE_EMITTERS, "").strip()
  if devices:
    e["XLA_FLAGS"] = f"{e.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  e.update(env or {})
  return e


def run_python(code: str, devices: int | None = None, env: dict | None = None, timeout: int = 600,
               args: list[str] | None = None, default_emitters: bool = False) -> subprocess.CompletedProcess:
  """Runs `code` (or `python ARGS` when args given) in a fresh interpreter, so that XLA_FLAGS
  (simulated device count, emitters) take effect; returns the completed process (check=False)."""
  cmd = [sys.executable] + (args if args is not None else ["-c", code])
  return subprocess.run(cmd, env=python_env(devices, env, default_emitters), cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def tensorboard_events(logdir):
  """{tag: [(step, value)]} of the scalars, {tag: [(step, picture)]} of the images and the
  hyperparameters {name: value} ({} where none were written), as TensorBoard's own reader reads
  the event files in logdir (cxflax/train/summaries.py writes TF2 summaries: an image is a string
  tensor [width, height, png...])."""
  import numpy as np
  from PIL import Image
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.plugins.hparams import plugin_data_pb2
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
  acc.Reload()
  scalars, images = {}, {}
  for tag in acc.Tags()["tensors"]:
    for ev in acc.Tensors(tag) if not tag.startswith("_hparams_/") else ():
      if ev.tensor_proto.dtype == 7:  # DT_STRING: [width, height, png...]
        width, height, *pngs = ev.tensor_proto.string_val
        for png in pngs:
          picture = np.asarray(Image.open(io.BytesIO(png)))
          assert picture.shape[:2] == (int(height), int(width)), tag
          images.setdefault(tag, []).append((ev.step, picture))
      else:
        scalars.setdefault(tag, []).append((ev.step, float(tensor_util.make_ndarray(ev.tensor_proto))))
  hparams = {}
  with contextlib.suppress(KeyError):  # (no hparams plugin data)
    data = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}
  return scalars, images, hparams


def data_config(source: str, root, **fields):
  """config.data of the defaults, reading `source` from `root` with `fields` set: what the
  sources' tests build a source from."""
  from cxflax.config import base_config
  d = base_config().data
  d.source, d.root = source, str(root)
  for k, v in fields.items():
    d[k] = v
  return d


def read_json(*path) -> dict:
  import json
  with open(os.path.join(*map(str, path))) as f:
    return json.load(f)


def held_out(config):
  """The source and the indices of the held-out fold a run with `config` evaluates on, from the
  fold assignment itself (not from cxflax's input pipeline)."""
  from cxflax.data import folds as folds_lib
  from cxflax.data.pipeline import make_folds
  from cxflax.data.sources import make_source
  source = make_source(config.data, "train")
  fold_of = make_folds(source, config.num_folds, config.seed, config.data.stratify)
  return source, folds_lib.split_indices(fold_of, config.fold)[1]


def checkpoint_predictions(path, source, indices, step: int | None = None, batch: int = 16):
  """A checkpoint's predictions for source[indices], computed without cxflax's evaluation code
  (no grain batches, padding, gathering or BatchNorm folding): each image preprocessed on its
  own, the model applied as a plain flax module. Regressed values, class probabilities or
  embeddings."""
  import jax
  import numpy as np
  from cxflax.data.transforms import Preprocess
  from cxflax.train.build import load_run
  run = load_run(str(path), step)
  pp = Preprocess(run.config.data.eval_pp)
  apply = jax.jit(lambda v, x: run.model.apply(v, x, train=False))
  outs = []
  for start in range(0, len(indices), batch):
    images = np.stack([pp.random_map(dict(source.load(int(i))), np.random.default_rng(0))["image"]
                       for i in indices[start:start + batch]])
    out = apply(run.variables, images)
    outs.append(np.asarray(out["prediction"] if isinstance(out, dict) else out, np.float64))
  raw = np.concatenate(outs)
  if run.meta["task"] == "regression":
    return raw[:, 0]
  if run.meta["task"] == "embedding":
    return raw
  e = np.exp(raw - raw.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def run_variables(path, step: int | None = None) -> dict:
  """{'params', 'batch_stats'} of a run's checkpoint (the latest unless `step`)."""
  from cxflax.train.build import load_run
  return load_run(str(path), step).variables


def assert_same_variables(a: dict, b: dict, rtol: float, what: str = "", per_collection: bool = False) -> None:
  """Every parameter and BatchNorm statistic of `a` equals `b`'s to rtol of the largest magnitude
  of its array (or, per_collection, of all of 'params' / 'batch_stats': for arrays whose own
  values are near zero, such as biases that barely moved)."""
  import numpy as np
  from flax import traverse_util
  fa = traverse_util.flatten_dict(a, sep="/")
  fb = traverse_util.flatten_dict(b, sep="/")
  assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))[:5]
  big = lambda x: float(np.max(np.abs(np.asarray(x, np.float64))))
  top = {col: max(big(v) for k, v in fb.items() if k.split("/")[0] == col) for col in {k.split("/")[0] for k in fb}}
  worst = max((big(np.asarray(fa[k], np.float64) - np.asarray(fb[k], np.float64))
               / max(top[k.split("/")[0]] if per_collection else big(fb[k]), 1e-12), k) for k in fa)
  assert worst[0] <= rtol, f"{what}: {worst[1]} differs by {worst[0]:.3g} (allowed {rtol})"


def random_variables(model, *inputs, seed: int = 0, **kwargs) -> dict:
  """Variables of init's structure, shapes and dtypes, with values drawn by numpy instead of
  init's: compiling a deep network's init (one random generator per parameter) took 5-25 s here,
  and tests of what a network computes need weights, not init's. Kernels ~ N(0, 1/fan-in) (no
  exploding activations), BatchNorm scales and running variances in [0.5, 1.5], biases and
  running means ~ N(0, 0.3) (so that eval-mode BatchNorm and folding are not identities)."""
  import jax
  import numpy as np
  from flax import traverse_util
  shapes = jax.eval_shape(lambda *x: model.init(jax.random.key(0), *x, **kwargs), *inputs)
  rng = np.random.default_rng(seed)
  out = {}
  for col, tree in shapes.items():
    flat = traverse_util.flatten_dict(dict(tree))
    for path, leaf in flat.items():
      if path[-1] == "kernel":
        value = rng.normal(size=leaf.shape) / np.sqrt(max(np.prod(leaf.shape[:-1]), 1))
      elif path[-1] in ("scale", "var"):
        value = rng.uniform(0.5, 1.5, leaf.shape)
      else:
        value = rng.normal(0, 0.3, leaf.shape)
      flat[path] = np.asarray(value, leaf.dtype)
    out[col] = traverse_util.unflatten_dict(flat)
  return out


@contextlib.contextmanager
def reserved_port():
  """A free TCP port on 127.0.0.1 that nobody else can take until the block ends: the socket
  holding it is bound with SO_REUSEPORT (and never listens), so only a server that also asks for
  SO_REUSEPORT, as jax's gRPC coordinator does, can bind it beside us."""
  import socket
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]


def run_processes(commands: list[list[str]], envs: list[dict], timeout: float,
                  signal_when: tuple[int, str, int] | None = None) -> list[tuple[int, str, str]]:
  """Starts the commands together and returns (returncode, stdout, stderr) of each. Their output
  is drained concurrently (a full pipe cannot stall one while we wait on another); past
  `timeout` seconds every process is killed and the test fails with the last lines of each.
  signal_when=(i, text, signum): process i is sent signum once its stderr has printed `text`."""
  import threading
  import time
  procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for cmd, env in zip(commands, envs)]
  streams = [([], []) for _ in procs]
  readers = []

  def drain(pipe, sink, proc, watch):
    for line in pipe:
      sink.append(line)
      if watch and watch[0] in line:
        proc.send_signal(watch[1])
        watch = None

  for i, (p, (out, err)) in enumerate(zip(procs, streams)):
    watch = signal_when[1:] if signal_when and signal_when[0] == i else None
    for pipe, sink, w in ((p.stdout, out, None), (p.stderr, err, watch)):
      t = threading.Thread(target=drain, args=(pipe, sink, p, w), daemon=True)
      t.start()
      readers.append(t)
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    for p in procs:
      p.wait()
    for t in readers:
      t.join(5)
    tails = "\n".join(f"--- process {i} (exit {p.returncode}), last lines:\n" + "".join(err[-15:])
                      for i, (p, (_, err)) in enumerate(zip(procs, streams)))
    pytest.fail(f"processes still running after {timeout:.0f}s, killed:\n{tails}")
  for t in readers:
    t.join()
  return [(p.returncode, "".join(out), "".join(err)) for p, (out, err) in zip(procs, streams)]


def once_per_test_run(tmp_path_factory, name: str, make):
  """make(folder) → value, made once for the whole test run and shared by the pytest-xdist
  workers: the first to ask makes it (the others wait on a file lock) and leaves the value pickled
  beside the folder. A session fixture alone is made once per worker, and the trained runs that
  several tests read (tiny_run, ensemble members) would otherwise be trained by both workers."""
  import fcntl
  import pickle
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    return make(tmp_path_factory.mktemp(name))
  folder = tmp_path_factory.getbasetemp().parent / f"shared-{name}"  # the run's, not a worker's
  with open(f"{folder}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    done = f"{folder}.pickle"
    if os.path.exists(done):
      with open(done, "rb") as f:
        return pickle.load(f)
    shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed to make it left
    folder.mkdir()
    value = make(folder)
    with open(done, "wb") as f:
      pickle.dump(value, f)
    return value


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(workdir, MainRun) of the TINY resnest.py:runlocal run, trained once for every test that
  needs a trained regression run: two epochs, a checkpoint after each (both kept)."""
  return once_per_test_run(tmp_path_factory, "tiny_run",
                           lambda folder: (str(folder / "work"), run_main(folder / "work", *TINY_RUN)))
