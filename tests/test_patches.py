"""Patch sampling and cropping, the patch classifier (one batched pass against a patch-by-patch
loop, chunked passes against one pass, independence from batch composition), FC-DenseNet and the
segmentation metrics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxflax import config as config_lib
from cxflax.errors import ConfigError
from cxflax.models import create_model, xla_cpu
from cxflax.models.fc_densenet import FCDenseNet
from cxflax.models.heads import create_network
from cxflax.models.patches import (PatchClassifier, aggregate, crop_patches, default_chunk, mask_key,
                                   sample_centers)
from cxflax.train import metrics as metrics_lib
from cxflax.train.tasks import segmentation_counts
from tests.conftest import load_config, random_variables


def _blob_mask(h, w, rows, cols):
  m = np.zeros((h, w), np.float32)
  m[rows[0]:rows[1], cols[0]:cols[1]] = 1
  return m


def test_centres_fall_inside_the_mask_and_cover_it():
  mask = _blob_mask(40, 50, (5, 15), (30, 45))
  centers = np.asarray(sample_centers(jax.random.key(0), jnp.asarray(mask), 4000))
  assert mask[centers[:, 0], centers[:, 1]].all()
  counts = np.zeros_like(mask)
  np.add.at(counts, (centers[:, 0], centers[:, 1]), 1)
  inside = counts[mask > 0]
  assert (inside > 0).mean() > 0.99  # 150 pixels, 4000 draws: every pixel is hit
  assert inside.std() / inside.mean() < 0.35  # uniform (Poisson noise at ~27 per pixel is ~0.19)
  anywhere = np.asarray(sample_centers(jax.random.key(1), jnp.zeros((8, 8)), 500))
  assert anywhere.min() >= 0 and anywhere[:, 0].max() == 7 and anywhere[:, 1].max() == 7  # empty mask


def test_patches_are_clipped_at_the_borders():
  img = np.arange(20 * 30 * 2, dtype=np.float32).reshape(20, 30, 2)
  centers = jnp.array([[0, 0], [19, 29], [10, 15], [3, 28]])
  p = np.asarray(crop_patches(jnp.asarray(img), centers, 8))
  np.testing.assert_array_equal(p[0], img[0:8, 0:8])
  np.testing.assert_array_equal(p[1], img[12:20, 22:30])
  np.testing.assert_array_equal(p[2], img[6:14, 11:19])
  np.testing.assert_array_equal(p[3], img[0:8, 22:30])


def test_aggregation_by_mean_probability_and_majority_vote():
  logits = jnp.log(jnp.array([[[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]]]))
  mean = np.asarray(jax.nn.softmax(aggregate(logits, "mean")))
  np.testing.assert_allclose(mean[0], [0.4, 0.5, 0.1], rtol=1e-5)
  votes = np.asarray(jax.nn.softmax(aggregate(logits, "vote")))
  np.testing.assert_allclose(votes[0], [2 / 3, 1 / 3, 0], atol=1e-5)  # two of three patches vote 0
  assert votes[0].argmax() == 0 and mean[0].argmax() == 1  # the two rules can disagree


def _patch_model(num=12, size=32):
  net = create_network("resnet10t", "linear", 3)
  return PatchClassifier(network=net, patch_size=size, num_patches=num, aggregate="vote", seed=3)


def _inputs(n, size=64, seed=0):
  rng = np.random.default_rng(seed)
  img = rng.normal(size=(n, size, size, 3)).astype(np.float32)
  masks = np.stack([_blob_mask(size, size, (8 + i, 40 + i), (4 + 2 * i, 30 + 3 * i)) for i in range(n)])
  return np.concatenate([img * masks[..., None], masks[..., None]], -1)


@pytest.fixture(scope="module")
def patch_model():
  model = _patch_model()
  return model, random_variables(model, _inputs(1), train=False)  # eval-mode BatchNorm is no identity


def test_results_do_not_depend_on_the_batch(patch_model):
  model, variables = patch_model
  x = jnp.asarray(_inputs(5))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  together = np.asarray(apply(variables, x))
  alone = np.concatenate([np.asarray(apply(variables, x[i:i + 1])) for i in range(5)])
  pairs = np.concatenate([np.asarray(apply(variables, x[i:i + 2])) for i in (0, 2)] +
                         [np.asarray(apply(variables, x[4:5]))])
  np.testing.assert_allclose(alone, together, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(pairs, together, rtol=1e-4, atol=1e-5)


def test_batched_patches_give_the_votes_of_a_patch_by_patch_loop(patch_model):
  model, variables = patch_model
  x = jnp.asarray(_inputs(3))
  batched = np.asarray(jax.nn.softmax(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)))
  net_vars = {col: tree["network"] for col, tree in variables.items()}
  single = jax.jit(lambda v, p: model.network.apply(v, p[None], train=False)[0])
  for i in range(3):  # the same patches, one forward pass each
    key = mask_key(jax.random.key(model.seed), x[i, ..., -1])
    centers = sample_centers(key, x[i, ..., -1], model.num_patches)
    patches = crop_patches(x[i, ..., :-1], centers, model.patch_size)
    votes = np.bincount([int(np.argmax(single(net_vars, p))) for p in patches], minlength=3)
    np.testing.assert_allclose(batched[i], votes / votes.sum(), atol=1e-5)


def _passes(model, variables, x):
  """The lengths of the loops over chunks of patches (scans running the network) in model's
  inference, traced only; [] when all patches go through one pass."""
  lengths = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "scan" and "conv_general_dilated" in str(eqn.params["jaxpr"]):
        lengths.append(eqn.params["length"])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
            walk(getattr(sub, "jaxpr", sub))

  walk(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x).jaxpr)
  return lengths


def test_chunked_passes_give_the_results_of_one_pass(patch_model):
  model, variables = patch_model
  patches = jnp.asarray(np.random.default_rng(1).normal(size=(11, 32, 32, 3)).astype(np.float32))

  classify = {chunk: jax.jit(lambda v, p, m=dataclasses.replace(model, chunk=chunk):
                             m.apply(v, p, method=PatchClassifier.classify)[None])
              for chunk in (11, 4)}  # 11 patches: one pass, or 2 chunks of 4 and a pass over the last 3
  # The random head's bias outweighs what the patches change: centre it so that they disagree.
  head = variables["params"]["network"]["head"]["fc"]
  bias = head["bias"] - jnp.mean(classify[11](variables, patches)[0], axis=0)
  variables = {**variables, "params": {"network": {**variables["params"]["network"],
                                                   "head": {"fc": {**head, "bias": bias}}}}}
  one_pass, chunked = classify[11](variables, patches), classify[4](variables, patches)
  assert len(set(np.argmax(np.asarray(one_pass[0]), -1))) == 3  # votes for every class
  np.testing.assert_array_equal(np.asarray(aggregate(chunked, "vote")),
                                np.asarray(aggregate(one_pass, "vote")))
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(aggregate(chunked, "mean"))),
                             np.asarray(jax.nn.softmax(aggregate(one_pass, "mean"))), rtol=1e-5, atol=1e-6)
  x = jnp.asarray(_inputs(3))  # 36 patches in the model: 7 chunks of 5 and a pass over the last one
  assert _passes(dataclasses.replace(model, chunk=5), variables, x) == [7]
  assert _passes(dataclasses.replace(model, chunk=36), variables, x) == []


def test_the_automatic_chunk_is_small_on_the_cpu_kernels_only(patch_model, monkeypatch):
  model, variables = patch_model
  x = jnp.asarray(_inputs(2))
  with xla_cpu.mode("on"):  # a few patches per pass, fewer the larger they are, at least one
    assert 1 <= default_chunk(224) <= 8 and default_chunk(112) == 4 * default_chunk(224)
    assert default_chunk(2048) == 1
    per_image = dataclasses.replace(model, num_patches=default_chunk(model.patch_size))
    assert _passes(per_image, variables, x) == [2]  # traced only: two chunks of one image's patches
  with xla_cpu.mode("off"):  # GPUs: all patches in one pass
    assert default_chunk(224) == 0 and _passes(per_image, variables, x) == []
  with xla_cpu.mode("on"):  # a batch sharded over devices is not looped over
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    assert default_chunk(224) == 0
  config = load_config("patched_flannel.py:resnet10t,runlocal", "--config.patches.chunk=-1")
  with pytest.raises(ConfigError, match="config.patches.chunk"):
    config_lib.validate(config)


def test_training_draws_fresh_patches_inside_the_mask(patch_model):
  model, variables = patch_model
  x = jnp.asarray(_inputs(2))
  keys = [jax.random.key(s) for s in (1, 2)]
  patches = jax.jit(lambda v, x, k: model.apply(v, x, 1, k, method=PatchClassifier.patches))
  _, c1 = patches(variables, x, keys[0])
  _, c2 = patches(variables, x, keys[1])
  assert not np.array_equal(np.asarray(c1), np.asarray(c2))
  for c in (np.asarray(c1), np.asarray(c2)):
    for i in range(2):
      assert np.asarray(x)[i, c[i, 0, 0], c[i, 0, 1], -1] == 1
  out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                             rngs={"patches": keys[0], "dropout": keys[1]}))(variables, x)
  assert out.shape == (2, 3)


def test_fc_densenet_shapes_and_paper_sizes():
  model = FCDenseNet(num_classes=3, down_blocks=(2, 2), bottleneck_layers=2, growth_rate=4, first_features=8)
  for h, w in ((16, 16), (21, 35)):  # any size, not only multiples of 4
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, h, w, 1)))
    assert jax.eval_shape(model.apply, v, jnp.ones((2, h, w, 1))).shape == (2, h, w, 3)
  with pytest.raises(ValueError, match="at least 4 px"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 3, 8, 1))))
  # The Tiramisu paper's sizes (Table 2: 1.5M, 3.5M, 9.4M for 11 CamVid classes), to ±10%.
  for name, millions in (("fc_densenet56", 1.5), ("fc_densenet67", 3.5), ("fc_densenet103", 9.4)):
    m = create_model(name, num_classes=11)
    shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    n = sum(np.prod(s.shape) for s in jax.tree.leaves(shapes["params"]))
    assert abs(n / 1e6 - millions) < 0.1 * millions, (name, n)


def test_segmentation_metrics_against_hand_counts():
  pred = np.zeros((2, 4, 4), np.int64)
  true = np.zeros((2, 4, 4), np.int64)
  pred[0, :2, :] = 1   # 8 predicted
  true[0, 1:3, :] = 1  # 8 true, 4 shared: Jaccard 4/12, Dice 8/16
  # image 1: nothing to find and nothing found: a perfect empty mask
  logits = jax.nn.one_hot(pred, 2) * 5.0
  counts = np.asarray(segmentation_counts(logits, jnp.asarray(true)))
  np.testing.assert_array_equal(counts[0, 1], [4, 8, 8])
  m = metrics_lib.segmentation_metrics(counts, ("background", "lung"))
  assert m["jaccard"] == pytest.approx((4 / 12 + 1.0) / 2)
  assert m["dice"] == pytest.approx((0.5 + 1.0) / 2)
  assert m["pixel_accuracy"] == pytest.approx((8 / 16 + 1.0) / 2)  # 4 lung + 4 background right
  base = metrics_lib.segmentation_baseline(counts[..., 2], ("background", "lung"))
  assert base["jaccard"] == pytest.approx((8 / 16 + 0.0) / 2)  # all-lung on an empty image scores 0
