"""Model registry, parameter counts, outputs, sizes, dtypes, dropout, the task network, and
timm weight import / conversion."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxflax.errors import CheckpointError, ConfigError
from cxflax.models import create_model, list_models
from cxflax.models.heads import create_network, with_backbone
from cxflax.models.timm_weights import load_timm_weights
from tests.conftest import REPO, random_variables

# timm.create_model(name) parameter counts with 1000 classes (../shared/DESIGN.md).
TIMM_PARAMS = {
    "resnet18": 11_689_512, "resnet50": 25_557_032, "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904, "resnext101_32x8d": 88_791_336, "seresnet50": 28_088_024,
    "seresnext50_32x4d": 27_559_896, "skresnext50_32x4d": 27_479_784, "resnest50d": 27_483_240,
    "resnest101e": 48_275_016, "resnest200e": 70_201_544, "ecaresnet50t": 25_573_814,
    "resnetrs50": 35_691_912, "densenet121": 7_978_856, "densenet161": 28_681_000,
    "densenet169": 14_149_480, "vgg19_bn": 143_678_248, "inception_v3": 23_834_568,
    "efficientnet_b4": 19_341_616,
}
REQUIRED = set(TIMM_PARAMS) | {"resnet34", "resnet101"}
# One small member of each family, for the checks that run real computations.
FAMILY = ["resnet10t", "resnest14d", "skresnext50_32x4d", "densenet121", "vgg19_bn", "efficientnet_b0"]


def _shapes(model, size=96):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


def _count(name):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_shapes(create_model(name))["params"]))


def test_every_required_model_is_registered():
  assert REQUIRED <= set(list_models())


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_parameter_count_equals_timm(name):
  assert _count(name) == TIMM_PARAMS[name]


def test_unknown_model_lists_known_ones():
  with pytest.raises(ValueError, match="unknown model 'resnet9000'.*resnet50"):
    create_model("resnet9000")


@pytest.mark.parametrize("name", FAMILY + ["inception_v3"])
def test_logits_embedding_and_feature_map(name):
  size = 80 if name == "inception_v3" else 32
  x = jnp.ones((2, size, size, 3))
  outs = {}
  for key, kw in [("logits", {"num_classes": 7}), ("pooled", {"num_classes": 0}),
                  ("map", {"num_classes": 0, "global_pool": ""})]:
    model = create_model(name, **kw)
    outs[key] = jax.eval_shape(lambda m=model: m.init_with_output(jax.random.key(0), x)[0]).shape
  assert outs["logits"] == (2, 7)
  assert len(outs["pooled"]) == 2 and outs["pooled"][1] == outs["map"][3]
  assert len(outs["map"]) == 4 and outs["map"][0] == 2


@pytest.mark.parametrize("name", FAMILY + ["resnetrs50", "ecaresnet50t"])
def test_any_input_size_from_32px(name):
  """Shapes for square and non-square inputs from 32 px to 512 px (values: see the odd-size
  parity tests in test_timm_parity.py)."""
  model = create_model(name, num_classes=3)
  for h, w in [(32, 32), (33, 47), (45, 45), (97, 64), (224, 224), (512, 512)]:
    x = jnp.zeros((2, h, w, 3))
    out, _ = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)  # one trace
    assert out.shape == (2, 3), (h, w)


def test_inception_rejects_inputs_below_75px():
  model = create_model("inception_v3")
  with pytest.raises(ValueError, match="at least 75x75"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


def test_train_mode_updates_batch_stats():
  model = create_model("resnet10t", num_classes=3)
  x = jax.random.normal(jax.random.key(1), (4, 48, 48, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  before, after = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("name,train", [("resnet10t", True), ("resnest14d", False), ("densenet121", False),
                                        ("efficientnet_b0", False)])
def test_bfloat16_compute_keeps_float32_params(name, train):
  """bfloat16 activations and float32 parameters, the float32 function to bfloat16's rounding;
  with `train`, also float32 gradients in training mode close to float32's (resnet10t: the
  average-pool shortcut of its 'd'-style downsampling, which ResNeSt and ECA-ResNet share, once
  promoted bfloat16 to float32 and broke the first training-mode gradient)."""
  x = jax.random.normal(jax.random.key(1), (8 if train else 2, 64, 64, 3))
  m32, m16 = create_model(name, num_classes=4), create_model(name, num_classes=4, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda x: m16.init(jax.random.key(0), x), x)
  assert {p.dtype for p in jax.tree.leaves(shapes["params"])} == {jnp.dtype("float32")}
  variables = random_variables(m16, x)
  out32 = jax.jit(lambda v, x: m32.apply(v, x))(variables, x)
  lowered = jax.jit(lambda v, x: m16.apply(v, x)).lower(variables, x)
  out16 = lowered.compile()(variables, x)
  assert out16.dtype == jnp.bfloat16 and "bf16" in lowered.as_text()
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, rtol=0.1,
                             atol=0.1 * float(jnp.abs(out32).max()))

  if not train:
    return

  def grad(model):
    def loss(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(out.astype(jnp.float32)))
    return jax.jit(jax.grad(loss))(variables["params"])
  g16, g32 = grad(m16), grad(m32)
  assert {g.dtype for g in jax.tree.leaves(g16)} == {jnp.dtype("float32")}
  flat16, flat32 = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)]) for t in (g16, g32))
  assert np.corrcoef(flat16, flat32)[0, 1] > 0.95  # the same gradient, to bfloat16's rounding


@pytest.mark.parametrize("name,kw", [("resnet10t", {"drop_path_rate": 0.5, "zero_init_last": False}),
                                     ("resnet10t", {"drop_rate": 0.5}),
                                     ("efficientnet", {"drop_path_rate": 0.5}),
                                     ("densenet", {"proj_drop_rate": 0.5})])
def test_dropout_and_drop_path_only_in_training(name, kw):
  """(DenseNet and EfficientNet as small members of their families: their blocks, fewer and
  narrower.)"""
  from cxflax.models.densenet import DenseNet
  from cxflax.models.efficientnet import EfficientNet
  small = {"densenet": lambda **k: DenseNet(growth_rate=8, block_config=(2, 2), **k),
           "efficientnet": lambda **k: EfficientNet(0.25, 0.5, **k)}  # 1-2 blocks per stage
  model = (small[name] if name in small else functools.partial(create_model, name))(num_classes=5, **kw)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = random_variables(model, x)
  run = jax.jit(lambda v, x, k, train: model.apply(v, x, train=train, mutable=["batch_stats"],
                                                   rngs={"dropout": k})[0], static_argnums=3)
  a, b = run(variables, x, jax.random.key(1), True), run(variables, x, jax.random.key(2), True)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(run(variables, x, jax.random.key(1), False),
                                run(variables, x, jax.random.key(2), False))


def test_network_head_on_backbone_features():
  net = create_network("resnet10t", num_outputs=4, pool="hybrid")
  x = jnp.ones((3, 64, 64, 3))
  variables = jax.jit(net.init)(jax.random.key(0), x)
  assert set(variables["params"]) == {"backbone", "head"}
  assert jax.jit(net.apply)(variables, x).shape == (3, 4)
  with pytest.raises(ValueError, match="unknown head"):
    create_network("resnet10t", head="mlp9")


# --- timm weight import ------------------------------------------------------------------------


def _random_state_dict(name, num_classes=1000, seed=0):
  """A state dict in timm's layout, made by cxflax (no torch needed): flax names → torch keys."""
  from flax import traverse_util
  model = create_model(name, num_classes=num_classes)
  variables = jax.jit(lambda: model.init(jax.random.key(seed), jnp.zeros((1, 64, 64, 3))))()
  sd = {}
  for col, tree in variables.items():
    for path, v in traverse_util.flatten_dict(dict(tree)).items():
      v = np.asarray(v)
      mods = ".".join(p.replace("_", ".") if p.split("_")[-1].isdigit() and p.startswith(("layer", "conv1_", "downsample_"))
                      else p for p in path[:-1])
      leaf = path[-1]
      if leaf == "kernel":
        v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        leaf = "weight"
      elif leaf == "scale":
        leaf = "weight"
      elif leaf == "mean":
        leaf = "running_mean"
      elif leaf == "var":
        leaf = "running_var"
      sd[f"{mods}.{leaf}"] = v
  return variables, sd


def test_state_dict_round_trip_and_fresh_classifier():
  variables, sd = _random_state_dict("resnet18")
  loaded = load_timm_weights("resnet18", sd)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  fresh = load_timm_weights("resnet18", sd, num_classes=3)
  assert fresh["params"]["fc"]["kernel"].shape == (512, 3)
  np.testing.assert_array_equal(fresh["params"]["layer4_1"]["conv2"]["kernel"],
                                variables["params"]["layer4_1"]["conv2"]["kernel"])
  model = create_model("resnet18", num_classes=3)
  assert jax.eval_shape(model.apply, fresh, jnp.ones((1, 32, 32, 3))).shape == (1, 3)


def test_bad_state_dicts_name_the_keys():
  _, sd = _random_state_dict("resnet18")
  broken = dict(sd)
  del broken["layer1.0.conv1.weight"]
  broken["layer9.extra.weight"] = np.zeros((3,), np.float32)
  broken["bn1.weight"] = np.zeros((7,), np.float32)
  with pytest.raises(CheckpointError) as e:
    load_timm_weights("resnet18", broken)
  msg = str(e.value)
  assert "missing params: layer1_0/conv1/kernel" in msg
  assert "unexpected params: layer9/extra/scale" in msg
  assert "bn1/scale: checkpoint (7,), model (64,)" in msg


def test_read_from_files(tmp_path):
  import torch
  from safetensors.numpy import save_file
  variables, sd = _random_state_dict("resnet10t")
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
  torch.save({"state_dict": {"module." + k: v for k, v in tensors.items()}}, str(tmp_path / "w.pth"))
  torch.save({"model": tensors, "epoch": 3}, str(tmp_path / "w.pt"))  # training scripts' checkpoints
  torch.save({"state_dict_ema": {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}},
             str(tmp_path / "ema.bin"))
  torch.save(tensors, str(tmp_path / "w.bin"))  # a bare state dict
  half = load_timm_weights("resnet10t", str(tmp_path / "ema.bin"))  # float16 weights, widened
  for a, b in zip(jax.tree.leaves(half), jax.tree.leaves(variables)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  for f in ("w.safetensors", "w.pth", "w.pt", "w.bin"):
    loaded = load_timm_weights("resnet10t", str(tmp_path / f))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(CheckpointError, match="does not exist"):
    load_timm_weights("resnet10t", str(tmp_path / "nothere.pth"))
  (tmp_path / "w.txt").write_text("x")
  with pytest.raises(CheckpointError, match="unknown format"):
    load_timm_weights("resnet10t", str(tmp_path / "w.txt"))


def test_convert_cli_and_init_from(tmp_path):
  from safetensors.numpy import save_file
  from cxflax.convert import load_converted
  variables, sd = _random_state_dict("resnet10t", seed=7)
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
  out = tmp_path / "converted"
  proc = subprocess.run([sys.executable, "-m", "cxflax.convert", "--model", "resnet10t", "--checkpoint",
                         str(tmp_path / "w.safetensors"), "--out", str(out)], cwd=REPO,
                        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((out / "cxflax_convert.json").read_text())["model"] == "resnet10t"
  backbone = load_converted(str(out), "resnet10t")
  net = create_network("resnet10t", num_outputs=1)
  fresh = jax.jit(net.init)(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
  merged = with_backbone(fresh, backbone)
  np.testing.assert_array_equal(merged["params"]["backbone"]["layer3_0"]["conv1"]["kernel"],
                                variables["params"]["layer3_0"]["conv1"]["kernel"])
  np.testing.assert_array_equal(merged["params"]["head"]["fc"]["kernel"], fresh["params"]["head"]["fc"]["kernel"])
  with pytest.raises(CheckpointError, match="holds weights of 'resnet10t'"):
    load_converted(str(out), "resnet50")
  with pytest.raises(CheckpointError, match="does not fit"):
    with_backbone(jax.jit(create_network("resnet18").init)(jax.random.key(0), jnp.ones((1, 32, 32, 3))), backbone)
  # --config.init_from=DIR: training starts from the converted backbone (and a fresh head).
  from flax import traverse_util
  from cxflax.config import finalize
  from cxflax.train import build
  from cxflax.train.tasks import TASKS
  from tests.conftest import TINY, TINY_RUN, load_config, run_main
  config = finalize(load_config("resnest.py:runlocal", *TINY, *TINY_RUN, f"--config.init_from={out}"))
  model = build.build_model(config, TASKS.get("regression"))
  start = build.initial_variables(config, model, (32, 32, 3), config.seed)
  for col in ("params", "batch_stats"):
    got, want = (traverse_util.flatten_dict(dict(t)) for t in (start[col]["backbone"], variables[col]))
    assert got.keys() <= want.keys() and len(got) > 20  # timm's classifier is left out
    for k in got:
      np.testing.assert_array_equal(got[k], want[k])
  run = run_main(str(tmp_path / "run"), *TINY_RUN, f"--config.init_from={out}")
  assert f"backbone initialised from {out}" in run.log


def _hub_cache(root, name: str, files: dict) -> None:
  """A Hugging Face cache under `root` holding `files` for repository `name`, laid out as
  huggingface_hub writes it (refs/main naming the snapshot)."""
  from safetensors.numpy import save_file
  repo = root / f"models--{name.replace('/', '--')}"
  snapshot = repo / "snapshots" / ("0" * 40)
  snapshot.mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0" * 40)
  for filename, sd in files.items():
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(snapshot / filename))


def test_init_from_a_timm_weights_name_reads_the_hugging_face_cache_offline(tmp_path, monkeypatch):
  from flax import traverse_util
  from huggingface_hub import constants
  from cxflax.config import finalize
  from cxflax.train import build
  from cxflax.train.tasks import TASKS
  from tests.conftest import TINY, TINY_RUN, load_config
  variables, sd = _random_state_dict("resnet10t", seed=3)
  _hub_cache(tmp_path / "hub", "timm/resnet10t.c3_in1k", {"model.safetensors": sd})
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network here: the cached copy is used

  def start(init_from, model="resnet10t"):
    config = finalize(load_config("resnest.py:runlocal", *TINY, *TINY_RUN, f"--config.model={model}",
                                  f"--config.init_from={init_from}"))
    return build.initial_variables(config, build.build_model(config, TASKS.get("regression")), (32, 32, 3), 0)

  got = start("timm/resnet10t.c3_in1k")
  for col in ("params", "batch_stats"):
    flat, want = (traverse_util.flatten_dict(dict(t)) for t in (got[col]["backbone"], variables[col]))
    assert flat.keys() <= want.keys() and len(flat) > 20
    for k in flat:
      np.testing.assert_array_equal(flat[k], want[k])
  with pytest.raises(CheckpointError, match=r"holds weights of 'resnet10t', but the config's model is 'resnet18'"):
    start("timm/resnet10t.c3_in1k", model="resnet18")
  # Not cached, and offline: the error says which file to place where.
  with pytest.raises(CheckpointError, match=r"'timm/resnet10t.a1_in1k': model.safetensors is not in the Hugging "
                     r"Face cache \(.*hub\) .*hf download timm/resnet10t.a1_in1k model.safetensors"):
    start("timm/resnet10t.a1_in1k")
  with pytest.raises(ConfigError, match="nor a timm weights name"):
    start("timm/resnet10t")
