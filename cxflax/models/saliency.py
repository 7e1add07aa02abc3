"""Grad-CAM saliency maps for every cxflax network, and seed 003's probabilistic Grad-CAM for patch
classifiers, each for a whole batch in one traceable call (jit it; no Python loop over images).

Grad-CAM (Selvaraju et al.): for a feature map A (h, w, C) of some layer and a score y,
  α_c = mean_ij ∂y/∂A_ijc,   cam = ReLU(Σ_c α_c A_c),
upsampled bilinearly to the input's size. The score y is the class's logit (before the softmax)
for a classifier — the predicted class or a chosen one — and, for a regression network, the
predicted value itself: the map shows where the features raise the prediction (e.g. the infection
percentage).

The layer is found without touching the models: flax's `nn.intercept_methods` sees every module
call, records the 4-D feature maps modules return (or are given), and adds a zero `delta` to the
chosen one; the gradient with respect to `delta` is the gradient with respect to that map. By
default the layer is the map timm's forward_features returns: the backbone's output (what the
head pools), or for VGG the map its pre-logits convolutions are given; where there is no backbone
output map (a backbone keeping timm's classifier, the ensembles) the last feature map any module
returns (an ensemble: its last member's). A module path ('backbone/layer3_0', or
'backbone/pre_logits:input' for what a module is given) names another layer.

Probabilistic Grad-CAM (Oh, Park & Ye, the patch classifier seed 003 builds on; seed 003 only
names it, so this follows Oh et al. as issue 20 summarises them): every patch k of an image gets the Grad-CAM map l_k of class c at its network's
last feature map, scaled to [0, 1] (so that patches are comparable) and weighted by the patch's
own probability r_k of class c; the weighted maps are added at their patch positions in the image
frame, divided by how many patches covered each pixel, and kept inside the lung mask only. The
class c is the image's (aggregated) prediction or a chosen one. Patches are those the classifier
itself draws at inference (keys from each image's own mask), so the map of an image does not
depend on the batch around it.
"""

from __future__ import annotations

from typing import Callable, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cxflax.errors import ConfigError
from cxflax.models.patches import PatchClassifier, aggregate, default_chunk, mask_key, patch_starts

# The class a map explains: None (the predicted one), an index, (N,) indices, or a function of the
# outputs giving the indices.
Target = Union[int, jax.Array, Callable, None]


def _path(context) -> str:
  return "/".join(context.module.path)


INPUT = ":input"  # a layer named 'path:input' is the feature map that module path is given


def feature_layers(model: nn.Module, variables, images) -> list[tuple[str, tuple[int, ...]]]:
  """(layer, shape) of every 4-D feature map a module call returns (layer: its module path) or is
  given (layer: 'path:input'), in the order the calls return (traced only: nothing computed)."""
  found = []

  def record(next_fun, args, kwargs, context):
    called = context.method_name == "__call__"
    given = args[0] if called and args and getattr(args[0], "ndim", 0) == 4 else None
    out = next_fun(*args, **kwargs)
    if given is not None:
      found.append((_path(context) + INPUT, tuple(given.shape)))
    if called and getattr(out, "ndim", 0) == 4:
      found.append((_path(context), tuple(out.shape)))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  return found


def resolve_layer(model: nn.Module, variables, images, layer: str = "") -> tuple[str, tuple[int, ...]]:
  """The feature map Grad-CAM differentiates: `layer` (a module path), or by default the
  backbone's output, else the last feature map returned (see the module docstring)."""
  found = feature_layers(model, variables, images)
  if not found:
    raise ConfigError(f"{type(model).__name__} has no module that returns a feature map: Grad-CAM "
                      "needs a convolutional layer")
  paths = [p for p, _ in found]
  if layer:
    layer = layer.strip("/")
    if layer not in paths:
      raise ConfigError(f"config.explain.layer={layer!r} is no module of the model that returns a "
                        f"feature map; the last ones are {paths[-6:]}")
    chosen = layer
  else:
    chosen = _default_layer(paths)
  if paths.count(chosen) > 1:
    raise ConfigError(f"layer {chosen!r} is called {paths.count(chosen)} times in one forward pass; "
                      "name a layer that runs once (config.explain.layer)")
  return chosen, dict(found)[chosen]


def _default_layer(paths: list[str]) -> str:
  """The feature map timm's forward_features ends with: the backbone's output, or where the
  backbone ends in timm's pre-logits (VGG's fully connected layers as convolutions, whose map is
  1x1 at the usual sizes) the map those are given; without a backbone (a bare model, the
  ensembles' members keeping their classifiers) the last one returned."""
  pre_logits = [p for p in paths if p.endswith("pre_logits" + INPUT)]
  if pre_logits:
    return pre_logits[-1]
  outputs = [p for p in paths if not p.endswith(INPUT)]
  return next((p for p in ("backbone", "network/backbone") if p in outputs), outputs[-1])


def class_scores(out, target: Target = None):
  """(score (N,), class (N,)) of network outputs: the logit of the target class (None: the
  predicted one; an int, an (N,) array, or a function of the outputs giving the classes), or for
  a single output (regression) the predicted value and class 0."""
  if isinstance(out, dict):  # the multi-task head: its prediction is the regressed value
    out = out["prediction"]
  out = jnp.asarray(out, jnp.float32)
  n = out.shape[0]
  if out.shape[-1] == 1:
    return out[:, 0], jnp.zeros((n,), jnp.int32)
  if target is None:
    cls = jnp.argmax(out, axis=-1)
  elif callable(target):
    cls = target(out)
  else:
    cls = jnp.broadcast_to(jnp.asarray(target), (n,))
  cls = lax.stop_gradient(cls).astype(jnp.int32)
  return jnp.take_along_axis(out, cls[:, None], axis=-1)[:, 0], cls


def grad_cam(model: nn.Module, variables, images, target: Target = None, layer: str = "") -> dict:
  """Grad-CAM of `images` (N, H, W, C) for `target` (see class_scores) at `layer`: {'map' (N, H, W)
  upsampled to the input, 'cam' (N, h, w) at the layer's resolution, 'class' (N,), 'score' (N,),
  'output' (the network's outputs)}. Images do not interact (inference mode), so the gradient of
  the summed scores gives every image's own gradient in one backward pass."""
  path, shape = resolve_layer(model, variables, images, layer)

  def scores(delta):
    kept = []

    def perturb(next_fun, args, kwargs, context):
      here = _path(context) if context.method_name == "__call__" else None
      if here is not None and here + INPUT == path:
        kept.append(args[0])
        args = (args[0] + delta.astype(args[0].dtype),) + tuple(args[1:])
      out = next_fun(*args, **kwargs)
      if here == path:
        kept.append(out)
        out = out + delta.astype(out.dtype)
      return out

    with nn.intercept_methods(perturb):
      out = model.apply(variables, images, train=False)
    score, cls = class_scores(out, target)
    return jnp.sum(score), (kept[0], score, cls, out)

  grads, (features, score, cls, out) = jax.grad(scores, has_aux=True)(jnp.zeros(shape, jnp.float32))
  alpha = jnp.mean(grads, axis=(1, 2))
  cam = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", features.astype(jnp.float32), alpha))
  full = jax.image.resize(cam, (cam.shape[0],) + tuple(images.shape[1:3]), "bilinear")
  return {"map": full, "cam": cam, "class": cls, "score": score, "output": out}


def place_patches(maps, starts, image_hw):
  """(sum, count) (H, W): patch maps (K, p, p) added at their top-left corners `starts` (K, 2) of
  an H×W frame, and how many patches covered each pixel."""
  p = maps.shape[-1]

  def add(carry, item):
    total, count = carry
    m, s = item
    total = lax.dynamic_update_slice(total, lax.dynamic_slice(total, (s[0], s[1]), (p, p)) + m, (s[0], s[1]))
    count = lax.dynamic_update_slice(count, lax.dynamic_slice(count, (s[0], s[1]), (p, p)) + 1, (s[0], s[1]))
    return (total, count), None

  zeros = jnp.zeros(image_hw, maps.dtype)
  (total, count), _ = lax.scan(add, (zeros, zeros), (maps, starts))
  return total, count


def probabilistic_grad_cam(model: PatchClassifier, variables, images, target: Target = None,
                           layer: str = "") -> dict:
  """Seed 003's probabilistic Grad-CAM (module docstring) of a patch classifier on `images`
  (B, H, W, C + 1), the lung mask last: its B·K patches `model.chunk` at a time, as inference
  runs them (all in one Grad-CAM call where that is 0 and default_chunk says so). {'map' (B, H, W),
  'class' (B,), 'probability' (B,) the image's probability of that class, 'output' (B, classes)
  the classifier's log-probabilities, 'coverage' (B, H, W) patches per pixel}. `layer` is a path
  inside the patch network ('backbone/layer4_0')."""
  b, (h, w) = images.shape[0], images.shape[1:3]
  k, p = model.num_patches, model.patch_size
  mask = images[..., -1]
  keys = jax.vmap(mask_key, (None, 0))(jax.random.key(model.seed), mask)
  patches, centers = model.apply({}, images, k, keys, method=PatchClassifier.patches)
  flat = patches.reshape((b * k,) + patches.shape[2:])

  def image_class(logits):  # every patch explains its image's class
    if target is not None:
      return jnp.repeat(jnp.broadcast_to(jnp.asarray(target), (b,)), k)
    return jnp.repeat(jnp.argmax(aggregate(logits.reshape(b, k, -1), model.aggregate), -1), k)

  network_vars = {col: tree["network"] for col, tree in variables.items() if "network" in tree}
  chunk = model.chunk if model.chunk > 0 else default_chunk(p)
  if not chunk or chunk >= b * k:
    patch = grad_cam(model.network, network_vars, flat, image_class, layer)
  else:  # as inference runs (PatchClassifier.classify): `chunk` patches per pass, so that the
    # backward pass holds the activations of a chunk, not of all B·K patches. The image classes
    # come first, from a chunked forward pass.
    classes = image_class(model.apply(variables, flat, method=PatchClassifier.classify))

    def one(item):
      x, c = item
      return jax.tree.map(lambda v: v[0], grad_cam(model.network, network_vars, x[None], c[None], layer))
    patch = lax.map(one, (flat, classes), batch_size=chunk)
  logits = patch["output"].reshape(b, k, -1)
  cls = patch["class"].reshape(b, k)[:, 0]
  r = jnp.take_along_axis(jax.nn.softmax(logits, -1), cls[:, None, None], -1)[..., 0]  # (B, K)
  maps = patch["map"] / jnp.maximum(jnp.max(patch["map"], axis=(1, 2), keepdims=True), 1e-12)
  maps = maps.reshape(b, k, p, p) * r[:, :, None, None]
  starts = jax.vmap(patch_starts, (0, None, None))(centers, p, (h, w))
  total, count = jax.vmap(place_patches, (0, 0, None))(maps, starts, (h, w))
  heat = jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0) * (mask > 0)
  out = aggregate(logits, model.aggregate)
  prob = jnp.take_along_axis(jnp.exp(out), cls[:, None], -1)[:, 0]
  return {"map": heat, "class": cls, "probability": prob, "output": out, "coverage": count}


def saliency(model: nn.Module, variables, images, target: Target = None, layer: str = "") -> dict:
  """The map of any cxflax network: probabilistic Grad-CAM for a patch classifier, Grad-CAM
  otherwise."""
  if isinstance(model, PatchClassifier):
    return probabilistic_grad_cam(model, variables, images, target, layer)
  return grad_cam(model, variables, images, target, layer)
