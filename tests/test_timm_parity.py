"""Every backbone against timm's own model: same weights, same input, same outputs.

timm builds each model with random weights (and randomised BatchNorm statistics, so that eval
mode is not an identity); its state dict is converted by cxflax.models.timm_weights and both
networks run on the same random input. Checked: eval mode in float32 (relative error <= 1e-4),
and training mode — outputs and the updated running statistics — in float64 (<= 1e-6), where
rounding does not hide a structural difference. (In float32, training mode on a small batch
amplifies rounding through the BatchNorms of the attention modules, whose statistics come from a
handful of 1x1 values; a float32 training-mode check with a looser bound is included too.)
The float64 check runs one model of each family and block type by default; the deeper and wider
variants of those families (whose code is the same, and which take a minute each) run with
`-m slow`, and the float32 training-mode check the other way round. Their eval-mode check (5-20 s
each, most of it compiling the deep network) runs with `-m slow` too; by default each deep variant
is checked for timm's structure instead: every parameter and statistic of timm's model maps to one
of cxflax's, shape for shape, and cxflax's model has no other.

Models run with cxflax's kernels for XLA's CPU backend on (cxflax.models.xla_cpu, the default
here), and a few representative ones also with them off (plain flax/XLA), in a fresh jitted
function per mode (the mode is read when a function is traced).

PyTorch and timm are the test extra (pip install -e '.[test]'): without them this file fails to
import, and so the run fails, rather than skipping the comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cxflax.models import create_model, xla_cpu
from cxflax.models.timm_weights import _expected, _to_flax, flax_path, load_timm_weights

import timm
import torch

# Model → input size (inception_v3 needs at least 75 px).
MODELS = {
    "resnet10t": 64, "resnet18": 64, "resnet34": 64, "resnet50": 64, "resnet101": 64,
    "resnet152": 64, "resnext50_32x4d": 64, "resnext101_32x8d": 64, "seresnet50": 64,
    "seresnext50_32x4d": 64, "skresnext50_32x4d": 64, "resnest14d": 64, "resnest26d": 64,
    "resnest50d": 64, "resnest101e": 64, "resnest200e": 64, "ecaresnet50t": 64, "resnetrs50": 64,
    "densenet121": 64, "densenet161": 64, "densenet169": 64, "vgg19_bn": 64, "inception_v3": 96,
    "efficientnet_b0": 64, "efficientnet_b4": 64,
}
PARAMS = list(MODELS)
NUM_CLASSES = 10
# Deeper or wider members of a family whose smaller member's float64 check runs by default.
DEEP_VARIANTS = {"resnet34", "resnet101", "resnet152", "resnext101_32x8d", "resnest26d", "resnest50d",
                 "resnest101e", "resnest200e", "densenet161", "densenet169", "efficientnet_b4"}
# Checked with the CPU kernels off too: 1x1 convolutions, strided 1x1 shortcuts and max pooling
# (resnet50); split attention as one grouped convolution, and average pooling with and without
# counted padding (resnest14d: its avd pools and avg_down shortcuts), also in training mode.
# (DenseNet's transition pools are resnest14d's kind of pool; its check would add 20 s.)
PLAIN_EVAL = ["resnet50", "resnest14d"]
PLAIN_TRAIN = ["resnest14d"]


def _timm_model(name, dtype):
  """timm's model with random weights and random BatchNorm statistics and affine parameters.

  The last norm of each residual block (the one timm zero-initialises) gets a small random scale
  instead of one near 1: otherwise a 200-layer network's residual stream grows by orders of
  magnitude and its float32 output is rounding noise in timm itself.
  """
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
  with torch.no_grad():
    for m in model.modules():
      if hasattr(m, "zero_init_last"):
        m.zero_init_last()
    for m in model.modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        last = bool((m.weight == 0).all())
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.05, 0.2) if last else m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.3, 0.3)
  return model.to(dtype)


def _input(batch, size, dtype, seed=1):
  """The same images as an NCHW torch tensor and an NHWC numpy array."""
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(batch, 3, size, size, generator=g, dtype=dtype)
  return x, x.permute(0, 2, 3, 1).numpy()


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# Odd sizes exercise the ceil-mode average pooling of 'd' variants and strided padding.
ODD_SIZES = {"resnest14d": 45, "efficientnet_b0": 47, "densenet121": 33, "ecaresnet50t": 37, "inception_v3": 79}


@pytest.mark.parametrize("name,kernels", [pytest.param(n, "on", marks=pytest.mark.slow) if n in DEEP_VARIANTS
                                          else (n, "on") for n in PARAMS] + [(n, "off") for n in PLAIN_EVAL])
def test_eval_float32(name, kernels):
  """Eval mode at the model's test size, and for some models also at an odd size."""
  tm = _timm_model(name, torch.float32).eval()
  variables = load_timm_weights(name, tm.state_dict())
  model = create_model(name, num_classes=NUM_CLASSES)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  for size in (MODELS[name], ODD_SIZES.get(name)):
    if size is None:
      continue
    x_t, x_j = _input(2, size, torch.float32)
    with torch.no_grad():
      ref = tm(x_t).numpy()
    with xla_cpu.mode(kernels):  # traced (per input size) here
      out = apply(variables, x_j)
    assert out.shape == ref.shape
    assert _rel(out, ref) <= 1e-4, size


@pytest.mark.parametrize("name", sorted(DEEP_VARIANTS))
def test_deep_variant_has_timms_structure(name):
  """Every parameter and statistic of timm's model is one of cxflax's model, by name and shape
  (as load_timm_weights converts it), and cxflax's model has no other. Values are not needed:
  timm's model is built on the meta device, cxflax's traced for shapes only (timm_weights' own
  record of them)."""
  with torch.device("meta"):
    tm = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
  timms = {}
  for key, tensor in tm.state_dict().items():
    col, path = flax_path(key)
    if col:
      path, zeros = _to_flax(path, np.broadcast_to(np.float32(0), tensor.shape))
      timms[col, path] = zeros.shape
  ours = {(col, path): leaf.shape for col, leaves in _expected(name, NUM_CLASSES).items() for path, leaf in leaves.items()}
  assert timms == ours, (sorted(set(timms.items()) - set(ours.items()))[:5], sorted(set(ours.items()) - set(timms.items()))[:5])


def _float64_case(name: str, kernels: str):
  """The deep variants under -m slow. Compiled as the suite compiles (without XLA's expensive
  passes) except EfficientNet's, whose float64 network then runs longer than full optimisation
  takes to compile it (benchmarks/NOTES.md §16)."""
  marks = [pytest.mark.slow] if name in DEEP_VARIANTS else []
  if name.startswith("efficientnet"):
    marks.append(pytest.mark.optimized)
  return pytest.param(name, kernels, marks=marks)


@pytest.mark.parametrize("name,kernels", [_float64_case(n, "on") for n in PARAMS]
                         + [_float64_case(n, "off") for n in PLAIN_TRAIN])
def test_train_mode_float64(name, kernels):
  """Batch-statistics forward and the running averages it updates, in float64."""
  tm = _timm_model(name, torch.float64).train()
  x_t, x_j = _input(4, MODELS[name], torch.float64)
  state = {k: v.clone() for k, v in tm.state_dict().items()}
  with torch.no_grad():
    ref = tm(x_t).numpy()
  with jax.enable_x64(True), xla_cpu.mode(kernels):
    variables = load_timm_weights(name, state, dtype=jnp.float64)
    model = create_model(name, num_classes=NUM_CLASSES, dtype=jnp.float64)
    out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, jnp.asarray(x_j))
    assert _rel(out, ref) <= 1e-6
    stats = traverse_util.flatten_dict(dict(updates["batch_stats"]))
    for key, value in tm.state_dict().items():
      col, path = flax_path(key)
      if col == "batch_stats":
        assert _rel(stats[path], value.numpy()) <= 1e-6, key


@pytest.mark.parametrize("name", [n if n in DEEP_VARIANTS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ["resnet18", "resnet50", "seresnet50", "ecaresnet50t", "resnest50d",
                                            "skresnext50_32x4d", "densenet121", "inception_v3",
                                            "efficientnet_b4"]])
def test_train_mode_float32(name):
  """Training mode in float32, by default for the models whose float64 check is slow; the others'
  training mode is checked exactly in float64 by default, and their float32 arithmetic in eval."""
  tm = _timm_model(name, torch.float32).train()
  x_t, x_j = _input(8, MODELS[name], torch.float32)
  variables = load_timm_weights(name, tm.state_dict())
  with torch.no_grad():
    ref = tm(x_t).numpy()
  model = create_model(name, num_classes=NUM_CLASSES)
  out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x_j)
  assert _rel(out, ref) <= 1e-3
