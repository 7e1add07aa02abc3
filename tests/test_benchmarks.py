"""The benchmark scripts run end to end on tiny settings and write what they promise (their
figures are measured by running them at full size; no timing is asserted here)."""

import json

import pytest

from tests.conftest import run_python


def _run(module, out, *args, devices=None):
  proc = run_python("", args=["-m", f"benchmarks.{module}", "--out", str(out), *args], devices=devices,
                    timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    return proc, json.load(f)


def test_throughput_on_two_devices_with_flops_and_torch(tmp_path):
  pytest.importorskip("timm")
  proc, result = _run("throughput", tmp_path / "t.json", "--models", "resnet10t", "--batch", "4",
                      "--image_size", "32", "--repeats", "1", devices=2)
  (row,) = result["rows"]
  assert row["devices"] == 2 and row["model"] == "resnet10t"
  for key in ("train_img_s", "sam_train_img_s", "eval_img_s", "eval_unfolded_img_s", "torch_train_img_s",
              "torch_eval_img_s"):
    assert row[key] > 0, key
  # resnet10t: ~1.9 GFLOPs forward at 224 px, so ~0.04 at 32 px; a train step is ~3x that.
  assert 0.06e9 < row["train_flops_per_img"] < 0.3e9
  assert 0 < row["train_mfu"] < 1.5 and result["matmul_ceiling_flop_s"] > 0
  # timm's MFU: its rate times cxflax's FLOPs per image of the same architecture, over the ceiling
  ceiling = result["matmul_ceiling_flop_s"]
  assert row["torch_eval_mfu"] == pytest.approx(row["torch_eval_img_s"] * row["eval_flops_per_img"] / ceiling)
  assert row["torch_train_mfu"] == pytest.approx(
      row["torch_train_img_s"] * row["train_flops_per_img"] / ceiling)
  assert 0.02e9 < row["eval_flops_per_img"] < row["train_flops_per_img"]
  assert "train_vs_torch" in proc.stdout


def test_time_alternately_takes_turns_in_alternating_order():
  from benchmarks.common import time_alternately
  calls = []
  medians = time_alternately({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
  assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up, then rounds in turn
  assert set(medians) == {"a", "b"} and all(t >= 0 for t in medians.values())


def test_patch_inference_agrees_with_the_loop(tmp_path):
  _, result = _run("patch_inference", tmp_path / "p.json", "--model", "resnet10t", "--image_size", "96",
                   "--patch", "32", "--ks", "3", "--images", "2", "--repeats", "1")
  (row,) = result["rows"]
  assert row["K"] == 3 and row["same_votes"] is True
  assert row["batched_img_s"] > 0 and row["loop_img_s"] > 0 and row["reference_img_s"] > 0


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
