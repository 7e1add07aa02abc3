"""Layers whose gradients cxflax writes itself (for speed) give the gradients of the plain form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxflax.models import layers

# (shape, kernel, stride, padding, ceil_mode): ResNet's stem pool, VGG's 2x2, Inception's
# unpadded 3x3/2 on odd sizes, stride 1, ceil mode with a partial last window.
POOLS = [((2, 12, 12, 3), 3, 2, 1, False), ((2, 8, 8, 3), 2, 2, 0, False),
         ((2, 11, 9, 3), 3, 2, 0, False), ((2, 7, 7, 3), 3, 1, 1, False),
         ((2, 9, 7, 3), 2, 2, 0, True), ((1, 10, 10, 2), 3, 3, 1, False)]


def _ties(shape, seed):
  """ReLU'd small integers: most windows hold their maximum more than once."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.maximum(rng.integers(-3, 3, shape), 0).astype(np.float32))


def _grad(pool, x):
  """The gradient of a random weighting of the pooled output."""
  w = jnp.asarray(np.random.default_rng(1).normal(size=pool(x).shape).astype(np.float32))
  return jax.grad(lambda x: jnp.sum(pool(x) * w))(x)


@pytest.mark.parametrize("shape,k,s,p,ceil", POOLS)
def test_max_pool_gradient_goes_to_the_first_maximum(shape, k, s, p, ceil):
  """Same values and gradients as reduce_window's select-and-scatter, ties included."""
  x = _ties(shape, 0)
  pads = [layers._pool_pads(n, k, s, p, ceil) for n in shape[1:3]]
  plain = lambda x: nn.max_pool(x, (k, k), (s, s), padding=pads)
  ours = lambda x: layers.max_pool(x, k, s, padding=p, ceil_mode=ceil)
  np.testing.assert_array_equal(ours(x), plain(x))
  np.testing.assert_allclose(_grad(ours, x), _grad(plain, x), atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda x: _grad(ours, x))(x), _grad(plain, x), atol=1e-6)


@pytest.mark.parametrize("shape,k,s,p,ceil,count_include_pad",
                         [(*pool, count) for pool in POOLS for count in (True, False)
                          if not (pool[4] and pool[3] and count)])  # rejected (tested below)
def test_avg_pool_gradient(shape, k, s, p, ceil, count_include_pad):
  x = jnp.asarray(np.random.default_rng(2).normal(size=shape).astype(np.float32))
  pads = [layers._pool_pads(n, k, s, p, ceil) for n in shape[1:3]]
  plain = lambda x: nn.avg_pool(x, (k, k), (s, s), padding=pads,
                                count_include_pad=count_include_pad and not ceil)
  ours = lambda x: layers.avg_pool(x, k, s, padding=p, ceil_mode=ceil, count_include_pad=count_include_pad)
  np.testing.assert_allclose(_grad(ours, x), _grad(plain, x), atol=1e-6)


def test_pool_gradients_match_torch():
  """The tie rule is torch's too: MaxPool2d's gradient, and AvgPool2d's in ceil mode."""
  import torch
  x = _ties((2, 13, 13, 4), 3)
  xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
  for ours, theirs in [(lambda x: layers.max_pool(x, 3, 2, padding=1), torch.nn.MaxPool2d(3, 2, 1)),
                       (lambda x: layers.avg_pool(x, 2, 2, ceil_mode=True, count_include_pad=False),
                        torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False))]:
    w = np.random.default_rng(4).normal(size=ours(x).shape).astype(np.float32)
    xt.grad = None
    (theirs(xt) * torch.tensor(w.transpose(0, 3, 1, 2))).sum().backward()
    expected = xt.grad.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(ours(x) * w))(x), expected, atol=1e-6)


def test_max_pool_passes_nan_as_torch_does():
  x = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(jnp.nan)
  y, grad = jax.value_and_grad(lambda x: jnp.sum(layers.max_pool(x, 2, 2)))(x)
  assert np.isnan(y)
  assert grad[0, 1, 1, 0] == 1 and float(jnp.sum(grad)) == 4  # one pixel per window


def test_avg_pool_rejects_ceil_mode_with_counted_padding():
  with pytest.raises(ValueError, match="ceil_mode"):
    layers.avg_pool(jnp.zeros((1, 5, 5, 1)), 3, 2, padding=1, ceil_mode=True)


# (input shape, output channels, kernel, stride, padding): stride 1 and 2, odd sizes, ResNet's
# 7x7 stem, an unpadded convolution, and a padding larger than the kernel needs.
CONVS = [((2, 9, 9, 3), 4, 3, 1, 1), ((2, 11, 8, 3), 5, 3, 2, 1), ((2, 13, 13, 2), 4, 7, 2, 3),
         ((1, 10, 7, 2), 3, 3, 1, 0), ((1, 8, 8, 2), 3, 3, 2, 3), ((2, 9, 10, 3), 2, 5, 3, 2)]


@pytest.mark.parametrize("shape,features,k,s,p", CONVS)
def test_image_by_image_kernel_gradient(shape, features, k, s, p):
  """Output and both gradients equal those of XLA's own convolution."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(k, k, shape[-1], features)).astype(np.float32))
  pads = ((p, p), (p, p))
  plain = lambda x, w: layers._xla_conv(x, w, s, pads)
  ours = lambda x, w: layers._conv_image_by_image_kernel_gradient(x, w, s, pads)
  y = plain(x, kernel)
  np.testing.assert_allclose(ours(x, kernel), y, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
  expected = jax.grad(lambda x, w: jnp.sum(plain(x, w) * g), argnums=(0, 1))(x, kernel)
  got = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) * g), argnums=(0, 1)))(x, kernel)
  for a, e in zip(got, expected):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


def test_large_convolutions_take_the_image_by_image_path():
  """conv2d routes a single-device CPU convolution with a large output there, and gets the
  same kernel gradient; in bfloat16 the gradient keeps the compute dtype."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 30, 30, 3)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)).astype(np.float32))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(layers.conv2d(x, w, 1, 1))))(kernel))
  assert "scan" in jaxpr  # the suite runs on one CPU device, where the path applies
  with layers.xla_kernel_gradients():
    assert "scan" not in str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(layers.conv2d(x, w, 1, 1))))(kernel))
  grad = jax.grad(lambda w, x: jnp.sum(layers.conv2d(x, w, 1, 1) ** 2))
  plain = jax.grad(lambda w, x: jnp.sum(layers._xla_conv(x, w, 1, ((1, 1), (1, 1))) ** 2))
  np.testing.assert_allclose(grad(kernel, x), plain(kernel, x), rtol=1e-4)
  half = grad(kernel.astype(jnp.bfloat16), x.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(np.float32), plain(kernel, x), rtol=0.05, atol=0.5)


def test_relu_matches_jax_relu_in_value_and_derivative():
  x = jnp.array([-jnp.inf, -2.0, -0.0, 0.0, 1e-30, 3.0, jnp.inf, jnp.nan] +
                list(np.random.default_rng(0).normal(size=24)), jnp.float32)
  np.testing.assert_array_equal(layers.relu(x), jax.nn.relu(x))  # NaN propagates, -inf → 0
  assert np.isnan(layers.relu(x)[7])
  t = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
  _, tangent = jax.jvp(layers.relu, (x,), (t,))
  _, expected = jax.jvp(jax.nn.relu, (x,), (t,))
  np.testing.assert_array_equal(tangent, expected)
  assert tangent[2] == 0 and tangent[3] == 0  # relu'(0) = 0, as torch
  grad = jax.grad(lambda x: jnp.sum(layers.relu(x) * t))(x)
  np.testing.assert_array_equal(grad, jax.grad(lambda x: jnp.sum(jax.nn.relu(x) * t))(x))


def _plain_batch_norm(x, scale, bias, ra_mean, ra_var, momentum=0.1, eps=1e-5):
  """torch's BatchNorm2d in training mode, written out for autodiff."""
  mean = jnp.mean(x, (0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
  n = x.size // x.shape[-1]
  y = (x - mean) / jnp.sqrt(var + eps) * scale + bias
  return y, (1 - momentum) * ra_mean + momentum * mean, (1 - momentum) * ra_var + momentum * var * n / (n - 1)


def test_batch_norm_training_gradient_is_autodiffs():
  """The closed-form backward of BatchNorm in training mode against autodiff of the plain form,
  with a loss that also reads the updated running statistics (their cotangents must count)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(3.0, 2.0, size=(3, 5, 4, 6)), jnp.float32)
  scale, bias = (jnp.asarray(rng.normal(size=6), jnp.float32) for _ in range(2))
  stats = {"mean": jnp.asarray(rng.normal(size=6), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.5, 2, size=6), jnp.float32)}
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  bn = layers.BatchNorm(use_running_average=False)

  def ours(x, scale, bias, with_stats):
    y, new = bn.apply({"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x,
                      mutable=["batch_stats"])
    new = new["batch_stats"]
    return jnp.sum(y * w) + with_stats * (jnp.sum(jnp.sin(new["mean"])) + jnp.sum(new["var"] * scale)), (y, new)

  def plain(x, scale, bias, with_stats):
    y, mean, var = _plain_batch_norm(x, scale, bias, stats["mean"], stats["var"])
    return jnp.sum(y * w) + with_stats * (jnp.sum(jnp.sin(mean)) + jnp.sum(var * scale)), (y, {"mean": mean, "var": var})

  for with_stats in (0.0, 1.0):
    (value, (y, new)), grads = jax.value_and_grad(ours, (0, 1, 2), has_aux=True)(x, scale, bias, with_stats)
    (value_p, (y_p, new_p)), grads_p = jax.value_and_grad(plain, (0, 1, 2), has_aux=True)(x, scale, bias, with_stats)
    np.testing.assert_allclose(value, value_p, rtol=1e-5)
    np.testing.assert_allclose(y, y_p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["mean"], new_p["mean"], rtol=1e-6)
    np.testing.assert_allclose(new["var"], new_p["var"], rtol=1e-5)
    for g, g_p in zip(grads, grads_p):
      np.testing.assert_allclose(g, g_p, rtol=1e-4, atol=1e-5)


def test_batch_norm_training_matches_torch():
  import torch
  rng = np.random.default_rng(1)
  x = rng.normal(-1.0, 4.0, size=(4, 3, 3, 5)).astype(np.float32)
  w = rng.normal(size=x.shape).astype(np.float32)
  scale, bias = (rng.normal(size=5).astype(np.float32) for _ in range(2))
  bn = layers.BatchNorm(use_running_average=False)
  variables = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
               "batch_stats": {"mean": jnp.zeros(5), "var": jnp.ones(5)}}

  def loss(params, x):
    y, new = bn.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return jnp.sum(y * w), new["batch_stats"]
  (_, new), (g_params, g_x) = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables["params"], jnp.asarray(x))

  theirs = torch.nn.BatchNorm2d(5)
  with torch.no_grad():
    theirs.weight.copy_(torch.tensor(scale))
    theirs.bias.copy_(torch.tensor(bias))
  xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  (theirs(xt) * torch.tensor(w.transpose(0, 3, 1, 2))).sum().backward()
  np.testing.assert_allclose(g_x, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g_params["scale"], theirs.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g_params["bias"], theirs.bias.grad.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new["mean"], theirs.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], theirs.running_var.numpy(), rtol=1e-5)


@pytest.mark.parametrize("groups", [2, 4, 16])  # 16 of 32 channels: XLA's grouped convolution
def test_grouped_convolution_split_output_is_its_groups(groups):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 32)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 32 // groups, 48)), jnp.float32)
  whole = layers.conv2d(x, k, 2, 1, groups=groups)
  parts = layers.conv2d(x, k, 2, 1, groups=groups, split_output=True)
  assert isinstance(parts, tuple) and len(parts) == groups
  np.testing.assert_allclose(jnp.concatenate(parts, -1), whole, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="grouped"):
    layers.conv2d(x, k[:, :, :1].repeat(32, 2), split_output=True)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_of_channel_parts_is_batch_norm_of_their_concatenation(train):
  """Outputs, updated running statistics and gradients (through the statistics too) agree."""
  rng = np.random.default_rng(3)
  parts = tuple(jnp.asarray(rng.normal(1.0 + i, 2.0, size=(3, 4, 5, c)), jnp.float32)
                for i, c in enumerate((4, 4, 6)))
  bn = layers.BatchNorm(use_running_average=not train)
  variables = {"params": {"scale": jnp.asarray(rng.normal(size=14), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=14), jnp.float32)},
               "batch_stats": {"mean": jnp.asarray(rng.normal(size=14), jnp.float32),
                               "var": jnp.asarray(rng.uniform(0.5, 2, size=14), jnp.float32)}}
  w = jnp.asarray(rng.normal(size=(3, 4, 5, 14)), jnp.float32)

  def loss(params, parts, as_parts):
    y, new = bn.apply({**variables, "params": params}, parts if as_parts else jnp.concatenate(parts, -1),
                      mutable=["batch_stats"])
    if as_parts:
      assert isinstance(y, tuple) and [p.shape for p in y] == [p.shape for p in parts]
      y = jnp.concatenate(y, -1)
    stats = new["batch_stats"]
    return jnp.sum(y * w) + jnp.sum(jnp.sin(stats["mean"]) + stats["var"]), (y, stats)

  (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables["params"], parts, True)
  (_, (y_c, stats_c)), grads_c = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables["params"], parts, False)
  np.testing.assert_allclose(y, y_c, rtol=1e-5, atol=1e-5)
  for key in ("mean", "var"):
    np.testing.assert_allclose(stats[key], stats_c[key], rtol=1e-6)
  for g, g_c in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
    np.testing.assert_allclose(g, g_c, rtol=1e-4, atol=1e-5)
