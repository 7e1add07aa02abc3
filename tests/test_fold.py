"""BatchNorm folded into convolutions for evaluation: same outputs, and only where exact."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cxflax.models import create_model, xla_cpu
from cxflax.models.fold import apply_folded, fold_batchnorm, foldable_pairs
from cxflax.models.heads import create_network
from cxflax.models.layers import BatchNorm, Conv2d
from tests.conftest import random_variables


def _check(model, size, min_pairs):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, size, size, 3)), jnp.float32)
  variables = random_variables(model, x, train=False)
  pairs = foldable_pairs(model, variables, x)
  assert len(pairs) >= min_pairs
  want = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  folded = jax.jit(lambda v: fold_batchnorm(model, v, x))(variables)
  got = jax.jit(lambda v: apply_folded(model, v, x))(folded)
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * scale, rtol=0)
  return pairs, folded


def _bn_count(variables):
  return sum(1 for k in traverse_util.flatten_dict(variables["batch_stats"]) if k[-1] == "mean")


# With cxflax's CPU kernels (the default on this backend), and ResNeSt (whose split attention
# keeps its splits apart only with them) also without.
@pytest.mark.parametrize("name,size,kernels", [("resnet10t", 32, "on"), ("resnest14d", 32, "on"),
                                               ("resnest14d", 32, "off"), ("resnet18", 32, "on"),
                                               ("skresnext50_32x4d", 32, "on"), ("efficientnet_b0", 32, "on"),
                                               ("vgg19_bn", 32, "on"), ("inception_v3", 80, "on")])
def test_every_batchnorm_after_a_convolution_folds_exactly(name, size, kernels):
  model = create_model(name, num_classes=5)
  x = jnp.zeros((1, size, size, 3))
  n_bn = _bn_count(jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False)))
  with xla_cpu.mode(kernels):
    pairs, folded = _check(model, size, min_pairs=1)
  if name.startswith(("resnet", "resnest", "vgg", "inception")):  # conv → BN everywhere in these
    assert len(pairs) == n_bn  # ResNeSt's bn0 included, also where it takes the groups apart
  assert _bn_count(folded) == n_bn - len(pairs)


def test_pre_activation_networks_fold_only_the_pairs_that_are_exact():
  # DenseNet (densenet121's modules, two blocks of two layers): conv1 → norm2 inside each layer
  # folds; the concatenated conv2 outputs do not.
  from cxflax.models.densenet import DenseNet
  pairs, _ = _check(DenseNet(growth_rate=8, block_config=(2, 2), num_classes=3), 32, min_pairs=1)
  folded = {bn[-1] for _, bn, _ in pairs}
  assert folded == {"norm0", "norm2"}
  # FC-DenseNet's first convolution feeds a BatchNorm and a concatenation: not folded.
  pairs, _ = _check(create_model("fc_densenet_tiny", num_classes=2), 32, min_pairs=0)
  assert all(conv[-1] != "first_conv" for conv, _, _ in pairs)


def test_a_convolution_read_twice_is_not_folded():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      y = Conv2d(4, 3, name="conv")(x)
      z = BatchNorm(use_running_average=not train, name="bn")(y)
      return z + y  # y read again: folding conv would change this term
  model = Twice()
  x = jnp.ones((1, 8, 8, 3))
  variables = random_variables(model, x)
  assert foldable_pairs(model, variables, x) == []
  np.testing.assert_allclose(apply_folded(model, fold_batchnorm(model, variables, x), x),
                             model.apply(variables, x), rtol=1e-6)


def test_task_network_with_fastai_head_folds_its_backbone_only():
  model = create_network("resnet10t", "fastai", 4, head_kwargs={"hidden": 16})
  pairs, folded = _check(model, 32, min_pairs=1)
  assert all(bn[0] == "backbone" for _, bn, _ in pairs)
  assert "scale" in folded["params"]["head"]["bn1"] and "scale" in folded["params"]["head"]["bn2"]


@pytest.mark.parametrize("task,head,outputs", [("classification", "linear", 3), ("regression", "mlp", 1)])
def test_eval_step_folds_once_with_the_same_predictions(task, head, outputs):
  from cxflax import parallel
  from cxflax.train.steps import make_eval_step
  from cxflax.train.tasks import TASKS
  task = TASKS.get(task)
  model = create_network("resnet10t", head, outputs)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
           "label": np.zeros(4, np.int32 if outputs > 1 else np.float32),
           "index": np.arange(4), "valid": np.ones(4, np.float32)}
  variables = random_variables(model, batch["image"], train=False)
  mesh = parallel.make_mesh(jax.devices()[:1])
  sharded = parallel.shard_batch(batch, mesh)
  step = make_eval_step(model, task, mesh)
  prepared = step.prepare(variables, (32, 32, 3))
  assert "scale" not in prepared["params"]["backbone"]["bn1"]  # the stem's BatchNorm is folded
  folded = step(prepared, sharded)["pred"]
  plain_step = make_eval_step(model, task, mesh, fold_bn=False)
  plain = plain_step(plain_step.prepare(variables, (32, 32, 3)), sharded)["pred"]
  np.testing.assert_allclose(np.asarray(folded), np.asarray(plain), rtol=1e-4, atol=1e-5)
