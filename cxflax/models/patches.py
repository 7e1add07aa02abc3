"""Patch-based classification (Oh, Park & Ye; seed 003's patch learners), every patch at once.

The input is the masked image with its lung mask as the last channel (preprocessing
`...|mask_image('lung_mask')|...|append_mask('lung_mask')`). Patch centres are drawn uniformly
among the mask's pixels; a patch whose centre lies near the border is shifted inside the image
(clipped), never padded. Training classifies one fresh random patch per image per step.
Inference crops K patches per image on the device — `jax.vmap` over `lax.dynamic_slice` — and
classifies all B·K of them in one compiled pass, `chunk` patches at a time (`lax.map`: one
compiled network, looped over on the device); the K answers are aggregated by mean probability
or by majority vote. On XLA's CPU backend a pass over all B·K patches at once is slower than
passes over a few (benchmarks/NOTES.md, §4), so there the chunk is chosen small by default.

Inference patches are drawn from a key derived from the image's own mask, so an image gets the
same patches whichever batch it is in and however large the batch is.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cxflax.models import xla_cpu

AGGREGATES = ("mean", "vote")

# Patch pixels per chunk where the CPU kernels are on (xla_cpu.enabled()): CHUNK_PIXELS / size²
# patches per pass (4 of 224 px). A pass's activations grow with chunk · size² (resnet18's stem
# output alone is 3.2 MB per 224-px patch); on the 2-core development CPU, resnet18 on 224-px
# patches ran 14% faster in chunks of 4 than in one pass over 100 or 200 patches, chunks of 16
# and 32 no faster than one pass (benchmarks/NOTES.md, §4). Elsewhere (GPUs) all go in one pass.
CHUNK_PIXELS = 4 * 224 * 224


def default_chunk(patch_size: int) -> int:
  """Patches per forward pass when config.patches.chunk is 0: a few where XLA's CPU kernels are
  on and there is one device, else 0 (all at once: GPUs want large batches, and a loop over
  chunks of a batch sharded over devices would make the SPMD partitioner gather it)."""
  if not xla_cpu.enabled() or jax.device_count() > 1:
    return 0
  return max(1, CHUNK_PIXELS // (patch_size * patch_size))


def sample_centers(key, mask, num: int):
  """`num` (row, col) centres drawn uniformly among the pixels where mask > 0 (anywhere, if the
  mask is empty), by inverse-CDF sampling: memory O(H·W), not O(num·H·W)."""
  h, w = mask.shape
  inside = (mask.reshape(-1) > 0).astype(jnp.int32)
  inside = jnp.where(jnp.any(inside > 0), inside, jnp.ones_like(inside))
  cdf = jnp.cumsum(inside)
  u = jax.random.randint(key, (num,), 0, cdf[-1])  # the u-th pixel inside, 0-based
  flat = jnp.searchsorted(cdf, u, side="right")
  return jnp.stack([flat // w, flat % w], axis=-1).astype(jnp.int32)


def patch_starts(centers, size: int, image_hw):
  """(K, 2) top-left corners of the `size` patches centred at `centers` (K, 2) in an image of
  `image_hw`, shifted inside it where they would cross the border (crop_patches' placement,
  which the saliency maps put back)."""
  h, w = image_hw
  return jnp.clip(centers - size // 2, 0, jnp.array([h - size, w - size]))


def crop_patches(image, centers, size: int):
  """(K, size, size, C) patches of `image` (H, W, C) centred at `centers` (K, 2), each shifted
  inside the image where it would cross the border."""
  c = image.shape[-1]
  starts = patch_starts(centers, size, image.shape[:2])
  return jax.vmap(lambda s: lax.dynamic_slice(image, (s[0], s[1], 0), (size, size, c)))(starts)


def mask_key(key, mask):
  """A key that depends only on the mask's content: an image's inference patches do not depend
  on the batch around it."""
  flat = (mask.reshape(-1) > 0).astype(jnp.uint32)
  weights = jnp.arange(flat.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jax.random.fold_in(key, jnp.sum(flat * weights, dtype=jnp.uint32))


def aggregate(logits, how: str):
  """(B, K, C) patch logits → (B, C) log-probabilities of the image: log of the mean patch
  probability, or log of the fraction of patch votes per class (majority vote = argmax; ties go
  to the lower class index). Read as logits, softmax gives back the probabilities/fractions."""
  if how == "mean":
    return jnp.log(jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1))
  if how == "vote":
    votes = jnp.mean(jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1]), axis=1)
    return jnp.log(jnp.maximum(votes, 1e-6))
  raise ValueError(f"unknown patch aggregation {how!r}; use one of {AGGREGATES}")


class PatchClassifier(nn.Module):
  """A classification network applied to patches inside the lungs (see the module docstring).
  Parameters: {'network': the wrapped network's}."""
  network: nn.Module
  patch_size: int = 224
  num_patches: int = 100
  aggregate: str = "mean"
  seed: int = 0
  chunk: int = 0  # patches per forward pass at inference; 0 = default_chunk(patch_size)

  def patches(self, x, num: int, key):
    """(B, num, p, p, C) patches of images x (B, H, W, C + 1) (mask last), and their centres."""
    image, mask = x[..., :-1], x[..., -1]
    if min(image.shape[1:3]) < self.patch_size:
      raise ValueError(f"patch size {self.patch_size} exceeds the image {image.shape[1:3]}")
    keys = key if key.ndim else jax.random.split(key, x.shape[0])
    centers = jax.vmap(sample_centers, (0, 0, None))(keys, mask, num)
    return jax.vmap(crop_patches, (0, 0, None))(image, centers, self.patch_size), centers

  @nn.compact
  def __call__(self, x, train: bool = False):
    b = x.shape[0]
    if train:  # one fresh random patch per image
      patches, _ = self.patches(x, 1, self.make_rng("patches"))
      return self.network(patches[:, 0], train=True)
    keys = jax.vmap(mask_key, (None, 0))(jax.random.key(self.seed), x[..., -1])
    patches, _ = self.patches(x, self.num_patches, keys)
    logits = self.classify(patches.reshape((b * self.num_patches,) + patches.shape[2:]))
    return aggregate(logits.reshape(b, self.num_patches, -1), self.aggregate)

  def classify(self, patches):
    """Eval-mode logits (N, classes) of patches (N, p, p, C), `chunk` patches per pass: one
    compiled network that `lax.map` loops over on the device, the last N mod chunk patches in a
    pass of their own (no padding). Same logits as one pass over all N, float rounding apart."""
    chunk = self.chunk if self.chunk > 0 else default_chunk(self.patch_size)
    if self.is_initializing() or not chunk or chunk >= patches.shape[0]:
      return self.network(patches, train=False)
    network, variables = self.network.unbind()
    one = lambda p: network.apply(variables, p[None], train=False)[0]
    return lax.map(one, patches, batch_size=chunk)
