"""Model registry, parameter counts, outputs, dtypes and the task network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxflax.models import create_model, list_models
from cxflax.models.heads import create_network

# timm.create_model(name) parameter counts with 1000 classes (../shared/DESIGN.md).
TIMM_PARAMS = {
    "resnet18": 11_689_512, "resnet50": 25_557_032, "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904, "resnext101_32x8d": 88_791_336, "seresnet50": 28_088_024,
    "seresnext50_32x4d": 27_559_896, "ecaresnet50t": 25_573_814, "resnetrs50": 35_691_912,
}


def _count(name, **kw):
  model = create_model(name, **kw)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_parameter_count_equals_timm(name):
  assert _count(name) == TIMM_PARAMS[name]


def test_unknown_model_lists_known_ones():
  with pytest.raises(ValueError, match="unknown model 'resnet9000'.*resnet50"):
    create_model("resnet9000")
  assert "resnet50" in list_models()


def test_outputs_logits_embedding_and_feature_map():
  x = jnp.ones((2, 64, 64, 3))
  for kw, shape in [({"num_classes": 7}, (2, 7)), ({"num_classes": 0}, (2, 512)),
                    ({"num_classes": 0, "global_pool": ""}, (2, 2, 2, 512))]:
    model = create_model("resnet10t", **kw)
    variables = model.init(jax.random.key(0), x)
    assert model.apply(variables, x, train=False).shape == shape


def test_train_mode_updates_batch_stats():
  model = create_model("resnet10t", num_classes=3)
  x = jax.random.normal(jax.random.key(1), (4, 48, 48, 3))
  variables = model.init(jax.random.key(0), x)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_bfloat16_compute_keeps_float32_params():
  net = create_network("resnet10t", num_outputs=1, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  variables = net.init(jax.random.key(0), x)
  assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype("float32")}
  out32 = create_network("resnet10t", num_outputs=1).apply(variables, x)
  out16 = net.apply(variables, x)
  assert out16.dtype == jnp.float32  # the network returns float32 for the loss
  np.testing.assert_allclose(out16, out32, rtol=0.1, atol=0.1)
  hlo = jax.jit(lambda v, x: net.apply(v, x)).lower(variables, x).as_text()
  assert "bf16" in hlo


def test_network_head_on_backbone_features():
  net = create_network("resnet10t", num_outputs=4, pool="hybrid")
  x = jnp.ones((3, 64, 64, 3))
  variables = net.init(jax.random.key(0), x)
  assert set(variables["params"]) == {"backbone", "head"}
  assert net.apply(variables, x).shape == (3, 4)
  with pytest.raises(ValueError, match="unknown head"):
    create_network("resnet10t", head="mlp9")
