"""Grad-CAM and probabilistic Grad-CAM (cxflax/models/saliency.py) against independent
computations: a tiny network whose map is worked out by hand in numpy, timm's resnet10t under
torch autograd on the same converted weights, and the patch maps put together again in numpy."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from cxflax.errors import ConfigError
from cxflax.models import create_model, list_models, saliency
from cxflax.models.heads import LinearHead, Network, create_network
from cxflax.models.patches import PatchClassifier, patch_starts
from cxflax.models.timm_weights import load_timm_weights
from tests.conftest import random_variables


class _Tiny(nn.Module):
  """A 1x1 convolution, ReLU and a 2x2 average pool: feature map A = pool(ReLU(x·K + b))."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jax.nn.relu(nn.Conv(4, (1, 1), name="conv")(x))
    return nn.avg_pool(x, (2, 2), (2, 2))


def _tiny(num_outputs=3):
  return Network(backbone=_Tiny(), head=LinearHead(num_outputs))


def _by_hand(v, x, target=None):
  """Grad-CAM of the tiny network in numpy: the head is mean-pool then linear, so
  ∂y_c/∂A_ijk = W_kc / (h·w) and α_k = W_kc / (h·w)."""
  conv = v["params"]["backbone"]["conv"]
  k, b = np.asarray(conv["kernel"])[0, 0], np.asarray(conv["bias"])
  a = np.maximum(x @ k + b, 0)
  n, hh, ww, c = a.shape
  a = a.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
  w, bias = np.asarray(v["params"]["head"]["fc"]["kernel"]), np.asarray(v["params"]["head"]["fc"]["bias"])
  logits = a.mean(axis=(1, 2)) @ w + bias
  cls = np.argmax(logits, -1) if target is None else np.full(n, target)
  alpha = w[:, cls].T / (a.shape[1] * a.shape[2])
  return np.maximum(np.einsum("nhwk,nk->nhw", a, alpha), 0), cls


def test_grad_cam_equals_hand_computation_and_per_image_calls():
  x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
  net = _tiny()
  v = random_variables(net, x)
  predicted = jax.jit(lambda v, x: saliency.grad_cam(net, v, x))
  chosen = jax.jit(lambda v, x, t: saliency.grad_cam(net, v, x, t))
  for target in (None, 2):
    want, cls = _by_hand(v, x, target)
    got = predicted(v, x) if target is None else chosen(v, x, target)
    assert np.array_equal(np.asarray(got["class"]), cls)
    np.testing.assert_allclose(got["cam"], want, rtol=1e-5, atol=1e-6)
    assert got["map"].shape == (3, 8, 8) and np.asarray(got["map"]).max() > 0
  batch = predicted(v, x)
  for i in range(3):
    one = predicted(v, x[i:i + 1])
    np.testing.assert_allclose(one["map"][0], batch["map"][i], rtol=1e-5, atol=1e-6)


def test_grad_cam_of_regression_is_the_predicted_values_gradient():
  """One output: the score is the predicted value; with W of one column, α_k = W_k / (h·w)."""
  x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
  net = _tiny(num_outputs=1)
  v = random_variables(net, x)
  got = jax.jit(lambda v, x: saliency.grad_cam(net, v, x))(v, x)
  want, _ = _by_hand(v, x, target=0)
  np.testing.assert_allclose(got["cam"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["score"], np.asarray(net.apply(v, x))[:, 0], rtol=1e-5)


def test_grad_cam_equals_timm_under_torch_autograd():
  """resnet10t with timm's classifier: cxflax's default layer is layer4 (its last feature map);
  the map and its bilinear upsampling equal torch autograd's on timm's model."""
  import timm
  import torch
  torch.manual_seed(0)
  tm = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
  with torch.no_grad():
    for m in tm.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
  x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
  kept = {}
  tm.layer4.register_forward_hook(lambda mod, i, out: kept.update(a=out))
  logits = tm(x)
  kept["a"].retain_grad()
  cls = logits.argmax(-1)
  logits.gather(1, cls[:, None]).sum().backward()
  a, g = kept["a"].detach(), kept["a"].grad
  cam = torch.relu((a * g.mean(dim=(2, 3), keepdim=True)).sum(1))
  full = torch.nn.functional.interpolate(cam[:, None], size=(96, 96), mode="bilinear",
                                         align_corners=False)[:, 0]

  model = create_model("resnet10t", num_classes=3)
  v = load_timm_weights("resnet10t", tm.state_dict())
  got = jax.jit(lambda v, x: saliency.grad_cam(model, v, x))(v, x.permute(0, 2, 3, 1).numpy())
  assert np.array_equal(np.asarray(got["class"]), cls.numpy())
  scale = float(cam.abs().max())
  assert scale > 0
  np.testing.assert_allclose(got["cam"], cam.numpy(), atol=1e-4 * scale)
  np.testing.assert_allclose(got["map"], full.numpy(), atol=1e-4 * scale)


# Grad-CAM's default layer and its gradient for every backbone, by the class activation map they
# must equal. The families whose last feature map ends differently (DenseNet's final norm,
# EfficientNet's head convolution, Inception's concatenation) in the default run (resnet10t is
# the torch comparison above); every other classification backbone under -m slow (the FC-DenseNets
# segment: explain refuses segmentation runs). VGG ends in pre-logits convolutions, so its
# gradient is not linear in its map: its default layer is checked below.
CAM_DEFAULT = ["densenet121", "efficientnet_b0", "inception_v3"]
CAM_SLOW = sorted(n for n in list_models()
                  if n not in CAM_DEFAULT + ["resnet10t"] and not n.startswith(("vgg", "fc_densenet")))


@pytest.mark.parametrize("name", CAM_DEFAULT + [pytest.param(n, marks=pytest.mark.slow) for n in CAM_SLOW])
def test_grad_cam_of_every_backbone_is_its_class_activation_map(name):
  """Behind an average pool and a linear layer, ∂y_c/∂A_hwk = W_kc/(h·w): Grad-CAM equals
  ReLU(A·W_c)/(h·w) (Zhou et al.'s CAM), computed here from the backbone's output without any
  gradient. The map's layer is the backbone's last feature map, for two images in one call."""
  size = 80 if name == "inception_v3" else 64
  net = create_network(name, "linear", 3)
  x = np.random.default_rng(4).normal(size=(2, size, size, 3)).astype(np.float32)
  v = random_variables(net, x, seed=1)
  got = jax.jit(lambda v, x: saliency.grad_cam(net, v, x))(v, x)
  features = jax.jit(lambda v, x: net.apply(v, x, method=lambda m, x: m.backbone(x)))(v, x)
  a = np.asarray(features, np.float64)
  w = np.asarray(v["params"]["head"]["fc"]["kernel"], np.float64)
  logits = a.mean(axis=(1, 2)) @ w + np.asarray(v["params"]["head"]["fc"]["bias"], np.float64)
  cls = logits.argmax(-1)
  assert np.array_equal(np.asarray(got["class"]), cls)
  want = np.maximum(np.einsum("nhwk,kn->nhw", a, w[:, cls]) / (a.shape[1] * a.shape[2]), 0)
  scale = want.max()
  assert scale > 0
  np.testing.assert_allclose(got["cam"], want, atol=1e-4 * scale)
  assert got["map"].shape == (2, size, size)


def test_named_layers_module_inputs_and_defaults():
  """A module path names a layer's output, 'path:input' what the module is given (layer4_0 is
  given layer3_0's output: the same map and gradient); VGG's default is the map its pre-logits
  convolutions are given (timm's forward_features), not their 1x1 output."""
  model = create_network("resnet10t", "linear", 2)
  x = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)
  v = random_variables(model, x, seed=1)  # (seed 2's maps are all 0: every α·A is negative)
  out = jax.jit(lambda v, x: saliency.grad_cam(model, v, x, layer="backbone/layer3_0"))(v, x)
  given = jax.jit(lambda v, x: saliency.grad_cam(model, v, x, layer="backbone/layer4_0:input"))(v, x)
  assert out["cam"].shape == (2, 4, 4) and out["map"].shape == (2, 64, 64)
  assert np.asarray(out["cam"]).max() > 0
  np.testing.assert_allclose(given["cam"], out["cam"], rtol=1e-5, atol=1e-7)
  with pytest.raises(ConfigError, match="config.explain.layer='layer9'"):
    saliency.grad_cam(model, v, x, layer="layer9")
  vgg = create_network("vgg19_bn", "linear", 2)
  shapes = jax.eval_shape(lambda: vgg.init(jax.random.key(0), x))
  assert saliency.resolve_layer(vgg, shapes, x) == ("backbone/pre_logits:input", (2, 2, 2, 512))


def _patch_setup(batch, chunk=0):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(batch, 24, 24, 3)).astype(np.float32)
  mask = np.zeros((batch, 24, 24, 1), np.float32)
  for i in range(batch):
    mask[i, 2 + i:20, 1:14 + i] = 1
  pc = PatchClassifier(network=_tiny(), patch_size=8, num_patches=5, chunk=chunk)
  images = np.concatenate([x, mask], -1)
  return pc, images, random_variables(pc, images)


@pytest.mark.parametrize("target,chunk", [(None, 0), (1, 0), (None, 3)])
def test_probabilistic_grad_cam_puts_weighted_patch_maps_together(target, chunk):
  """In numpy: each patch's Grad-CAM (of the image's aggregated class, or a chosen one) scaled to
  [0, 1], weighted by the patch's probability of that class, added at its position, divided by
  the coverage, zero outside the lung mask. The same maps with the ten patches three at a time
  (the last one alone), as inference chunks them."""
  pc, images, v = _patch_setup(2, chunk)
  got = jax.jit(lambda v, x: saliency.probabilistic_grad_cam(pc, v, x, target))(v, images)
  keys = jax.vmap(lambda m: saliency.mask_key(jax.random.key(pc.seed), m))(images[..., -1])
  patches, centers = pc.apply({}, images, 5, keys, method=PatchClassifier.patches)
  net_vars = {col: t["network"] for col, t in v.items()}
  grad_cam = jax.jit(lambda v, x, c: saliency.grad_cam(pc.network, v, x, c))
  image_logp = np.asarray(pc.apply(v, images))
  for i in range(2):
    cls = int(np.argmax(image_logp[i])) if target is None else target
    maps = np.asarray(grad_cam(net_vars, patches[i], cls)["map"])
    logits = np.asarray(pc.network.apply(net_vars, patches[i]))
    r = np.exp(logits[:, cls]) / np.exp(logits).sum(-1)
    total, count = np.zeros((24, 24)), np.zeros((24, 24))
    for m, (r0, c0), rk in zip(maps, np.asarray(patch_starts(centers[i], 8, (24, 24))), r):
      total[r0:r0 + 8, c0:c0 + 8] += rk * m / max(m.max(), 1e-12)  # a patch whose map is 0 adds 0
      count[r0:r0 + 8, c0:c0 + 8] += 1
    want = np.where(count > 0, total / np.maximum(count, 1), 0) * images[i, ..., -1]
    assert int(got["class"][i]) == cls
    np.testing.assert_allclose(got["map"][i], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["coverage"][i], count)
    np.testing.assert_allclose(got["probability"][i], np.exp(image_logp[i, cls]), rtol=1e-5)
    assert np.all(np.asarray(got["map"][i])[images[i, ..., -1] == 0] == 0) and want.max() > 0


def test_probabilistic_grad_cam_does_not_depend_on_the_batch():
  pc, images, v = _patch_setup(3)
  run = jax.jit(lambda v, x: saliency.probabilistic_grad_cam(pc, v, x))
  whole = run(v, images)
  pair = run(v, images[1:])
  for i in range(3):
    one = run(v, images[i:i + 1])
    np.testing.assert_allclose(one["map"][0], whole["map"][i], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pair["map"], whole["map"][1:], rtol=1e-5, atol=1e-6)
  assert not np.allclose(whole["map"][0], whole["map"][1])  # different images, different maps
