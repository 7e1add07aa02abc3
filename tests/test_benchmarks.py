"""The benchmark scripts run end to end on tiny settings and write what they promise (their
figures are measured by running them at full size; no timing is asserted here)."""

import json

import jax
import pytest

from tests.conftest import run_python


def _run(module, out, *args, devices=None):
  proc = run_python("", args=["-m", f"benchmarks.{module}", "--out", str(out), *args], devices=devices,
                    timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    return proc, json.load(f)


def _conv_and_matmul_flops(fn, *args) -> int:
  """2 x multiply-adds of every convolution and matrix product in fn's jaxpr: a FLOP count made
  here, from the traced program, not by XLA's cost analysis (which the benchmark reports). As
  XLA does, a convolution counts only the kernel taps that land inside the image, not on its
  zero padding (at 32 px, most of a 3x3 kernel overhangs the 1-2 px maps of the last stages)."""
  import numpy as np

  def taps_inside(size, out, kernel, stride, low, dilation) -> int:
    return sum(0 <= o * stride - low + k * dilation < size for o in range(out) for k in range(kernel))

  def count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      out = eqn.outvars[0].aval.shape
      if eqn.primitive.name == "conv_general_dilated":
        p = eqn.params
        lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        (_, _, *lhs_space), (o_dim, i_dim, *rhs_space), (n_dim, c_dim, *out_space) = p["dimension_numbers"]
        pairs = np.prod([taps_inside(lhs[a], out[c], rhs[b], stride, low, dil) for a, b, c, stride, (low, _), dil
                         in zip(lhs_space, rhs_space, out_space, p["window_strides"], p["padding"],
                                p["rhs_dilation"])])
        total += 2 * out[n_dim] * out[c_dim] * rhs[i_dim] * int(pairs)
      elif eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2 * int(np.prod(out)) * int(np.prod([lhs[d] for d in contract]))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            total += count(inner)
    return total
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_throughput_on_two_devices_with_flops_and_torch(tmp_path):
  import jax.numpy as jnp
  from cxflax.models.heads import create_network
  proc, result = _run("throughput", tmp_path / "t.json", "--models", "resnet10t", "--batch", "4",
                      "--image_size", "32", "--repeats", "1", devices=2)
  (row,) = result["rows"]
  assert row["devices"] == 2 and row["model"] == "resnet10t"
  for key in ("train_img_s", "sam_train_img_s", "eval_img_s", "eval_unfolded_img_s", "torch_train_img_s",
              "torch_eval_img_s", "train_img_s_per_device", "eval_img_s_per_device"):
    assert row[key] > 0, key
  assert row["train_img_s_per_device"] < row["train_img_s"]  # global over the two devices
  # XLA's FLOP counts against the convolutions and products of the same network counted here
  # (XLA adds the elementwise work: BatchNorm, ReLU, pooling): forward for eval, about three
  # forwards for a train step.
  model = create_network("resnet10t", "linear", 1000)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  forward = _conv_and_matmul_flops(lambda v: model.apply(v, x, train=False), variables)
  assert 1.0 <= row["eval_flops_per_img"] / forward < 1.3
  assert 2.5 <= row["train_flops_per_img"] / forward < 3.9
  assert result["matmul_ceiling_flop_s"] > 0
  for key in ("train_mfu", "torch_train_mfu", "torch_eval_mfu"):
    assert row[key] > 0, key
  assert "train_vs_torch" in proc.stdout and "train_img_s_per_device" in proc.stdout


def test_time_alternately_takes_turns_in_alternating_order():
  import time
  from benchmarks.common import time_alternately
  calls = []
  medians = time_alternately({"a": lambda: (calls.append("a"), time.sleep(0.01)),
                              "b": lambda: (calls.append("b"), time.sleep(0.05))}, repeats=3)
  assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up, then rounds in turn
  assert medians["a"] >= 0.01 and medians["b"] >= 0.05  # each median is its own call's


def _run_here(module, out, monkeypatch, *args):
  """A benchmark script's main() in this process (no interpreter to start), as its command line."""
  import importlib
  monkeypatch.setattr("sys.argv", [module, "--out", str(out), *args])
  importlib.import_module(f"benchmarks.{module}").main()
  with open(out) as f:
    return json.load(f)


def test_conv_paths_agree_with_xla(tmp_path, monkeypatch):
  """The matrix-product and group-by-group convolutions the benchmark times compute XLA's
  convolution (a 2x2 map, where every tap is a product; ResNeSt's radix-2 grouped 3x3)."""
  result = _run_here("conv_paths", tmp_path / "c.json", monkeypatch, "--only", "9", "12", "--batch", "2",
                     "--repeats", "1")
  assert [r["shape"] for r in result["rows"]] == ["b2 2x2 512->512 k3 s1 g1", "b2 16x16 64->128 k3 s1 g2"]
  for row in result["rows"]:
    assert row["fwd_rel_diff"] < 1e-5 and row["xla_grad_ms"] > 0 and row["cxflax_grad_ms"] > 0


def test_xla_options_against_xla_defaults(tmp_path, monkeypatch):
  """Both variants of the train and eval step run and compute the same parameters and predictions
  (to float32 rounding); the options and the switch's mode are reported and left as they were."""
  from cxflax.models import xla_cpu
  result = _run_here("xla_options", tmp_path / "x.json", monkeypatch, "--models", "resnet10t", "--image_size",
                     "32", "--batch", "4", "--repeats", "1")
  assert result["options"] == xla_cpu._OPTIONS and xla_cpu.get_mode() == "auto"
  assert [(r["model"], r["program"]) for r in result["rows"]] == [("resnet10t", "train"), ("resnet10t", "eval")]
  for row in result["rows"]:
    assert row["rel_diff"] < 1e-4 and row["default_img_s"] > 0 and row["options_img_s"] > 0


def test_compile_time_with_and_without_expensive_passes(tmp_path, monkeypatch):
  """Both settings compile and run the same programs to the same outputs, and the suite's own
  setting (tests/conftest.py) is left as it was."""
  before = jax.config.values["jax_disable_most_optimizations"]
  result = _run_here("compile_time", tmp_path / "t.json", monkeypatch, "--models", "resnet10t", "--size", "32",
                     "--batch", "2", "--repeats", "1")
  assert [(r["model"], r["program"]) for r in result["rows"]] == [("resnet10t", "eval"), ("resnet10t", "grad")]
  rows = {r["program"]: r for r in result["rows"]}
  assert rows["eval"]["rel_diff"] < 1e-5
  assert rows["grad"]["rel_diff"] < 1e-3  # training-mode BatchNorm over a batch of 2 amplifies rounding
  for row in rows.values():
    assert min(row["default_compile_s"], row["reduced_compile_s"], row["default_run_s"], row["reduced_run_s"]) > 0
  assert jax.config.values["jax_disable_most_optimizations"] == before


def test_input_pipeline_with_and_without_workers(tmp_path, monkeypatch):
  result = _run_here("input_pipeline", tmp_path / "i.json", monkeypatch, "--sizes", "32", "--workers", "0", "1",
                     "--batch", "4", "--batches", "2", "--images", "8", "--model", "resnet10t",
                     "--step_repeats", "1")
  assert [(r["size"], r["workers"]) for r in result["rows"]] == [(32, 0), (32, 1)]
  for row in result["rows"]:
    assert row["pipeline_img_s"] > 0 and row["resnet10t_step_img_s"] > 0


def test_patch_inference_agrees_with_the_loop(tmp_path):
  _, result = _run("patch_inference", tmp_path / "p.json", "--model", "resnet10t", "--image_size", "96",
                   "--patch", "32", "--ks", "3", "--images", "2", "--repeats", "1", "--chunks", "4")
  (row,) = result["rows"]  # the 6 patches in chunks of 4 too: a full pass and a leftover of 2
  assert row["K"] == 3 and row["same_votes"] is True
  assert row["batched_img_s"] > 0 and row["loop_img_s"] > 0 and row["reference_img_s"] > 0
  assert row["chunk_4_img_s"] > 0


def test_scaling_shows_a_split_batch_and_one_gradient_reduction(tmp_path):
  _, result = _run("scaling", tmp_path / "s.json", "--models", "resnet10t", "--devices", "1", "2", "8",
                   "--batch", "8", "--image_size", "32", devices=8)
  rows = {r["devices"]: r for r in result["rows"]}
  for n, r in rows.items():
    assert r["per_device_batch"] and r["hlo_image_batch"] == [8 // n]
  assert rows[1]["all_reduce_ops"] == 0
  for n in (2, 8):  # the gradients (parameter-sized) once, plus BatchNorm statistics and the loss
    assert 1.0 <= rows[n]["all_reduce_over_params"] < 1.1
  assert rows[2]["flops_ratio"] < 1.15  # each device computes its half, not the whole batch


def test_op_profile_reads_flops_and_scopes_from_the_compiled_hlo():
  import jax
  import jax.numpy as jnp
  from benchmarks.op_profile import describe, parse_hlo

  def f(x, k, w):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y).reshape(-1, 6) @ w
  x, k, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 6)), jnp.ones((6, 5))
  text = jax.jit(f).lower(x, k, w).compile().as_text()
  instructions, computations = parse_hlo(text)
  entry = next(name for name in computations if f"ENTRY %{name} " in text)
  rows = [describe(instructions, computations, n) for n in computations[entry]]
  kinds = {r["kind"] for r in rows}
  assert {"convolution", "dot"} <= kinds, kinds
  conv_flops, dot_flops = 2 * 2 * 8 * 8 * 6 * 9 * 3, 2 * 128 * 6 * 5
  assert sum(r["flops"] for r in rows) == conv_flops + dot_flops


def test_op_profile_runs_on_a_train_step(tmp_path):
  _, result = _run("op_profile", tmp_path / "o.json", "--model", "resnet10t", "--mode", "train",
                   "--batch", "2", "--image_size", "32", "--top", "5")
  assert result["mode"] == "train" and result["rows"]
  assert any(r["kind"] == "convolution" and r["gflop_s"] > 0 for r in result["rows"])
  assert any("layer1_0" in r["scope"] for r in result["rows"])
  # the project's own train step (make_train_step's `step`, with its cross-entropy loss)
  assert any(r["scope"].startswith("jit(step)/") and "log_softmax" in r["scope"] for r in result["rows"])
  assert sum(k["ms"] for k in result["by_kind"]) > 0


# --- the GPU check (benchmarks/gpu_check.py), on the CPU --------------------------------------------

# What the GPU machine does not have (/work/.library/device/KINDS.md): the benchmark path must not
# import them.
ABSENT_ON_THE_GPU_MACHINE = ("ml_collections", "grain", "clu", "tensorflow", "tensorflow_datasets")


def test_gpu_check_runs_without_the_modules_the_gpu_machine_lacks(tmp_path):
  """The whole check, as the GPU machine would run it, in processes where importing any of
  ABSENT_ON_THE_GPU_MACHINE fails: cxflax (the CPU-kernel switch off) and timm under
  torch.compile (the 'eager' backend: the path, without generating code) on a tiny model."""
  import math
  import os
  from tests.conftest import REPO
  blocked = tmp_path / "blocked"
  for name in ABSENT_ON_THE_GPU_MACHINE:
    (blocked / name).mkdir(parents=True)
    (blocked / name / "__init__.py").write_text(f"raise ImportError('{name}: not on the GPU machine')\n")
  out = tmp_path / "g.json"
  proc = run_python("", args=["-m", "benchmarks.gpu_check", "--out", str(out), "--models", "resnet10t",
                              "--batch", "2", "--image_size", "32", "--repeats", "1", "--matmul_n", "256",
                              "--variants", "cxflax off", "timm compile", "--compile_backend", "eager"],
                    env={"PYTHONPATH": f"{blocked}{os.pathsep}{REPO}"}, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    result = json.load(f)
  rows = {r["impl"]: r for r in result["rows"]}
  assert set(rows) == {"cxflax off", "timm compile"}
  for impl, row in rows.items():
    assert row["status"] == "ok" and row["model"] == "resnet10t" and row["batch"] == 2, row
    for key in ("train_img_s", "eval_img_s", "train_compile_s", "eval_compile_s", "train_mfu", "eval_mfu"):
      assert math.isfinite(row[key]) and row[key] > 0, (impl, key, row[key])
    assert row["train_mfu"] <= 1 and row["eval_mfu"] <= 1, row
  assert rows["cxflax off"]["train_compiled_mb"] > 0 and rows["cxflax off"]["train_vs_timm"] > 0
  assert result["matmul_ceiling_flop_s"] > 0 and result["machine"]["torch_device"] == "cpu"
  table = proc.stdout[proc.stdout.index("model  "):]
  assert "cxflax off" in table and "timm compile" in table and "train_mfu" in table


def test_gpu_check_skips_what_its_budget_leaves_no_time_for(tmp_path, monkeypatch, capsys):
  result = _run_here("gpu_check", tmp_path / "g.json", monkeypatch, "--models", "resnet10t", "densenet121",
                     "--budget_s", "0")
  variants = ("cxflax off", "timm eager", "timm compile", "cxflax on")
  assert [(r["model"], r["impl"]) for r in result["rows"]] == [
      (m, v) for v in variants for m in ("resnet10t", "densenet121")]
  for row in result["rows"]:
    assert row["status"] == "skipped: 0 s of the budget left" and "train_img_s" not in row
  assert "skipped: 0 s of the budget left" in capsys.readouterr().out


def test_gpu_check_stops_a_measurement_at_its_limit_and_reports_errors():
  import time
  from benchmarks.gpu_check import run_isolated
  t = time.monotonic()
  assert run_isolated(time.sleep, (60,), 1.0) == {"status": "stopped at its 1 s limit"}
  assert time.monotonic() - t < 30
  assert run_isolated(int, ("x",), 30.0)["status"].startswith("error: ValueError: invalid literal")
  assert run_isolated(divmod, (7, 2), 30.0) == (3, 1)


def test_the_plain_config_holds_the_same_defaults_as_the_config_dict():
  """base_config(plain=True), which the benchmarks build without ml_collections, against the
  ConfigDict every run starts from, before and after finalize."""
  from cxflax.config import Fields, base_config, finalize

  def as_dicts(node):
    return {k: as_dicts(v) for k, v in node.items()} if isinstance(node, dict) else node
  plain = base_config(plain=True)
  assert isinstance(plain.optim, Fields) and as_dicts(plain) == base_config().to_dict()
  plain.data.image_size = 64
  done = finalize(plain)
  assert isinstance(done.data, Fields) and done.data.eval_pp == "to_rgb|resize(64)|normalize('imagenet')"
  assert plain.data.eval_pp == "to_rgb|resize({size})|normalize('imagenet')"  # a copy was finalized


def test_throughput_refuses_more_devices_than_it_sees(tmp_path, monkeypatch):
  import pytest
  n = len(jax.devices())
  with pytest.raises(SystemExit, match=f"--devices {n + 1}: this process sees {n} cpu device"):
    _run_here("throughput", tmp_path / "t.json", monkeypatch, "--devices", str(n + 1), "--models", "resnet10t")


def test_gpu_check_halves_the_batch_until_it_fits():
  from benchmarks.gpu_check import _largest_batch_that_fits
  tried = []

  def measure(batch):
    tried.append(batch)
    if batch > 32:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.5GiB.")
    return {"train_img_s": 1.0}
  assert _largest_batch_that_fits(measure, 128, 1) == {"batch": 32, "train_img_s": 1.0}
  assert tried == [128, 64, 32]
  import pytest
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):  # not below the least batch
    _largest_batch_that_fits(measure, 128, 100)
  with pytest.raises(ValueError):  # anything but memory is raised at once
    _largest_batch_that_fits(lambda b: int("x"), 128, 1)


def test_fed_step_reads_the_epoch_lines_the_main_job_logs(caplog, monkeypatch):
  """benchmarks/fed_step.py reads the main job's training rate from its per-epoch log line: the
  pattern must keep matching what the stage's clock (summaries.Progress) logs, else the benchmark
  finds no epoch. Five steps of 0.4 s, then an evaluation of 3 s: the epoch took 5 s, of which
  training 2 s (80 images, 40 images/s)."""
  import logging
  import types
  from benchmarks.fed_step import EPOCH_LINE
  from cxflax.train import summaries
  clock = [50.0]
  monkeypatch.setattr(summaries.time, "monotonic", lambda: clock[0])
  written = []
  report = summaries.Progress(15, types.SimpleNamespace(write_scalars=lambda step, s: written.append(s)),
                              every=100, examples_per_step=16)
  for step in range(11, 16):
    clock[0] += 0.4
    report(step)
  with report.timed("eval"):
    clock[0] += 3.0
  with caplog.at_level(logging.INFO, logger="absl"):
    report.end_epoch(3, 15)
  [(epoch, seconds, images)] = EPOCH_LINE.findall(caplog.text)
  assert (epoch, float(seconds), images) == ("3", 2.0, "80")
  assert "epoch 3 took 5.0 s: training 2.0 s (80 images, 40.0 images/s), evaluation 3.0 s, checkpoint 0.0 s" in caplog.text
  assert written[-1] == pytest.approx({"train/epoch_seconds": 5.0, "train/images_per_second": 40.0})
