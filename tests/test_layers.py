"""The layers with cxflax's kernels for XLA's CPU backend (cxflax.models.xla_cpu) and without:
the kernels, whose gradients cxflax writes itself, give the values and gradients of the plain
form; the layers keep torch's semantics in both modes; and the switch selects the program."""

import contextlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxflax.models import layers, xla_cpu

MODES = ["on", "off"]

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
  pads = tuple(layers._pool_pads(n, k, s, p, ceil) for n in shape[1:3])
  plain = lambda x: nn.max_pool(x, (k, k), (s, s), padding=pads)
  ours = lambda x: xla_cpu.max_pool(x, k, s, pads)
  np.testing.assert_array_equal(ours(x), plain(x))
  np.testing.assert_allclose(_grad(ours, x), _grad(plain, x), atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda x: _grad(ours, x))(x), _grad(plain, x), atol=1e-6)


@pytest.mark.parametrize("shape,k,s,p,ceil,count_include_pad",
                         [(*pool, count) for pool in POOLS for count in (True, False)
                          if not (pool[4] and pool[3] and count)])  # rejected (tested below)
def test_avg_pool_gradient(shape, k, s, p, ceil, count_include_pad):
  x = jnp.asarray(np.random.default_rng(2).normal(size=shape).astype(np.float32))
  pads = tuple(layers._pool_pads(n, k, s, p, ceil) for n in shape[1:3])
  plain = lambda x: nn.avg_pool(x, (k, k), (s, s), padding=pads,
                                count_include_pad=count_include_pad and not ceil)
  ours = lambda x: xla_cpu.avg_pool(x, k, s, pads, count_include_pad and not ceil)
  np.testing.assert_allclose(_grad(ours, x), _grad(plain, x), atol=1e-6)
  with xla_cpu.mode("on"):  # what layers.avg_pool runs then
    np.testing.assert_allclose(_grad(lambda x: layers.avg_pool(x, k, s, padding=p, ceil_mode=ceil,
                                                               count_include_pad=count_include_pad), x),
                               _grad(plain, x), atol=1e-6)


@pytest.mark.parametrize("kernels", MODES)
def test_pool_gradients_match_torch(kernels):
  """The tie rule is torch's too, with the CPU kernels and without: MaxPool2d's gradient, and
  AvgPool2d's in ceil mode."""
  import torch
  x = _ties((2, 13, 13, 4), 3)
  xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
  for ours, theirs in [(lambda x: layers.max_pool(x, 3, 2, padding=1), torch.nn.MaxPool2d(3, 2, 1)),
                       (lambda x: layers.avg_pool(x, 2, 2, ceil_mode=True, count_include_pad=False),
                        torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False))]:
    xt.grad = None
    with xla_cpu.mode(kernels):
      w = np.random.default_rng(4).normal(size=ours(x).shape).astype(np.float32)
      got = jax.grad(lambda x: jnp.sum(ours(x) * w))(x)
    (theirs(xt) * torch.tensor(w.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_allclose(got, xt.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)


@pytest.mark.parametrize("kernels", MODES)
def test_max_pool_passes_nan_as_torch_does(kernels):
  x = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(jnp.nan)
  with xla_cpu.mode(kernels):
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
  plain = lambda x, w: xla_cpu._xla_conv(x, w, s, pads)
  ours = lambda x, w: xla_cpu.conv_image_by_image_kernel_gradient(x, w, s, pads)
  y = plain(x, kernel)
  np.testing.assert_allclose(ours(x, kernel), y, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
  expected = jax.grad(lambda x, w: jnp.sum(plain(x, w) * g), argnums=(0, 1))(x, kernel)
  got = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) * g), argnums=(0, 1)))(x, kernel)
  for a, e in zip(got, expected):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


def test_large_convolutions_take_the_image_by_image_path():
  """With the CPU kernels on, conv2d routes a single-device convolution with a large output
  there (not inside xla_kernel_gradients(), nor with the kernels off), and gets the same kernel
  gradient; in bfloat16 the gradient keeps the compute dtype."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 30, 30, 3)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)).astype(np.float32))

  def jaxpr():  # a fresh trace
    return str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(layers.conv2d(x, w, 1, 1))))(kernel))
  with xla_cpu.mode("on"):
    assert "scan" in jaxpr()  # the suite runs on one device, where the path applies
    with xla_cpu.xla_kernel_gradients():
      assert "scan" not in jaxpr()
  with xla_cpu.mode("off"):
    assert "scan" not in jaxpr()
  grad = jax.grad(lambda w, x: jnp.sum(layers.conv2d(x, w, 1, 1) ** 2))
  plain = jax.grad(lambda w, x: jnp.sum(xla_cpu._xla_conv(x, w, 1, ((1, 1), (1, 1))) ** 2))
  np.testing.assert_allclose(grad(kernel, x), plain(kernel, x), rtol=1e-4)
  half = grad(kernel.astype(jnp.bfloat16), x.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(np.float32), plain(kernel, x), rtol=0.05, atol=0.5)


# Outputs of at most 2 px: ResNet's last stages at 32-64 px (3x3, stride 1 and 2, 1- and 2-px
# outputs), a non-square input, a dilated kernel, a 5x5 kernel on a 1-px map (most taps padding).
SMALL_OUTPUTS = [((2, 2, 2, 5), 3, 1, 1, 1), ((2, 4, 4, 5), 3, 2, 1, 1), ((3, 1, 1, 4), 3, 1, 1, 1),
                 ((2, 3, 2, 4), 3, 2, 1, 1), ((2, 4, 4, 3), 3, 1, 1, 2), ((1, 1, 1, 6), 5, 1, 2, 1)]


@pytest.mark.parametrize("shape,k,s,p,d", SMALL_OUTPUTS)
def test_small_outputs_are_one_product_over_the_taps(shape, k, s, p, d):
  """With the CPU kernels on, a convolution whose output is at most 2 px on a side is one matrix
  product (no convolution, no per-tap products to sum) whose output and both gradients equal
  XLA's convolution's."""
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(k, k, shape[-1], 7)).astype(np.float32))
  plain = lambda x, w: xla_cpu._xla_conv(x, w, s, ((p, p), (p, p)), d)
  y = plain(x, kernel)
  assert max(y.shape[1:3]) <= 2
  g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
  expected = jax.grad(lambda x, w: jnp.sum(plain(x, w) * g), argnums=(0, 1))(x, kernel)
  with xla_cpu.mode("on"):  # fresh functions, traced inside
    ours = lambda x, w: layers.conv2d(x, w, s, p, d)
    both_gradients = jax.grad(lambda x, w: jnp.sum(ours(x, w) * g), argnums=(0, 1))
    text = _lowered(both_gradients, x, kernel)
    np.testing.assert_allclose(ours(x, kernel), y, rtol=1e-5, atol=1e-5)
    got = both_gradients(x, kernel)
  assert "stablehlo.convolution" not in text
  assert text.count("stablehlo.dot_general") == 2, text  # the input's and the kernel's gradients
  for a, e in zip(got, expected):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("relu", [xla_cpu.relu, layers.relu], ids=["xla_cpu", "layers"])
@pytest.mark.parametrize("kernels", MODES)
def test_relu_matches_jax_relu_in_value_and_derivative(relu, kernels):
  x = jnp.array([-jnp.inf, -2.0, -0.0, 0.0, 1e-30, 3.0, jnp.inf, jnp.nan] +
                list(np.random.default_rng(0).normal(size=24)), jnp.float32)
  with xla_cpu.mode(kernels):
    np.testing.assert_array_equal(relu(x), jax.nn.relu(x))  # NaN propagates, -inf → 0
    assert np.isnan(relu(x)[7])
    t = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    _, tangent = jax.jvp(relu, (x,), (t,))
    _, expected = jax.jvp(jax.nn.relu, (x,), (t,))
    np.testing.assert_array_equal(tangent, expected)
    assert tangent[2] == 0 and tangent[3] == 0  # relu'(0) = 0, as torch
    grad = jax.grad(lambda x: jnp.sum(relu(x) * t))(x)
    np.testing.assert_array_equal(grad, jax.grad(lambda x: jnp.sum(jax.nn.relu(x) * t))(x))


def _plain_batch_norm(x, scale, bias, ra_mean, ra_var, momentum=0.1, eps=1e-5):
  """torch's BatchNorm2d in training mode, written out for autodiff."""
  mean = jnp.mean(x, (0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
  n = x.size // x.shape[-1]
  y = (x - mean) / jnp.sqrt(var + eps) * scale + bias
  return y, (1 - momentum) * ra_mean + momentum * mean, (1 - momentum) * ra_var + momentum * var * n / (n - 1)


@pytest.mark.parametrize("kernels", MODES)
def test_batch_norm_training_gradient_is_autodiffs(kernels):
  """BatchNorm in training mode (with the CPU kernels: its closed-form backward) against autodiff
  of the plain form written out here, with a loss that also reads the updated running statistics
  (their cotangents must count)."""
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
    with xla_cpu.mode(kernels):
      (value, (y, new)), grads = jax.value_and_grad(ours, (0, 1, 2), has_aux=True)(x, scale, bias, with_stats)
    (value_p, (y_p, new_p)), grads_p = jax.value_and_grad(plain, (0, 1, 2), has_aux=True)(x, scale, bias, with_stats)
    np.testing.assert_allclose(value, value_p, rtol=1e-5)
    np.testing.assert_allclose(y, y_p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["mean"], new_p["mean"], rtol=1e-6)
    np.testing.assert_allclose(new["var"], new_p["var"], rtol=1e-5)
    for g, g_p in zip(grads, grads_p):
      np.testing.assert_allclose(g, g_p, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernels", MODES)
def test_batch_norm_training_matches_torch(kernels):
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
  with xla_cpu.mode(kernels):
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




def test_mode_switch():
  """auto: on where JAX's default backend is the CPU; a bad mode is refused, naming the modes;
  mode() restores the previous setting, also after an error."""
  assert xla_cpu.get_mode() == "auto"
  assert xla_cpu.enabled() == (jax.default_backend() == "cpu")
  with xla_cpu.mode("off"):
    assert not xla_cpu.enabled()
    with xla_cpu.mode("on"):
      assert xla_cpu.enabled() and xla_cpu.get_mode() == "on"
    assert xla_cpu.get_mode() == "off"
  with pytest.raises(ZeroDivisionError), xla_cpu.mode("off"):
    1 / 0
  assert xla_cpu.get_mode() == "auto"
  with pytest.raises(ValueError, match="one of auto, on, off; got 'fast'"):
    xla_cpu.set_mode("fast")
  assert xla_cpu.get_mode() == "auto"


def _lowered(f, *args) -> str:
  return jax.jit(f).lower(*args).as_text()


def test_the_switch_selects_the_program():
  """Traced with the CPU kernels on, a 1x1 convolution is a matrix product, a 2-group
  convolution two convolutions, ReLU a select; off, XLA's convolution (one, grouped) and max."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 8)), jnp.float32)
  w1 = jnp.asarray(rng.normal(size=(1, 1, 8, 4)), jnp.float32)
  w3 = jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)
  texts, values = {}, {}
  for kernels in MODES:
    with xla_cpu.mode(kernels):  # fresh functions: the mode is read when they are traced
      one_by_one = lambda x, w: layers.conv2d(x, w)
      grouped = lambda x, w: layers.conv2d(x, w, padding=1, groups=2)
      relu = lambda x: layers.relu(x)  # (jax.jit(layers.relu) would reuse the other mode's trace)
      texts[kernels] = [_lowered(one_by_one, x, w1), _lowered(grouped, x, w3), _lowered(relu, x)]
      values[kernels] = [one_by_one(x, w1), grouped(x, w3), relu(x)]
  (on_1x1, on_grouped, on_relu), (off_1x1, off_grouped, off_relu) = texts["on"], texts["off"]
  assert "stablehlo.dot_general" in on_1x1 and "stablehlo.convolution" not in on_1x1
  assert "stablehlo.convolution" in off_1x1 and "stablehlo.dot_general" not in off_1x1
  assert on_grouped.count("stablehlo.convolution") == 2 and "feature_group_count = 2" not in on_grouped
  assert off_grouped.count("stablehlo.convolution") == 1 and "feature_group_count = 2" in off_grouped
  assert "stablehlo.select" in on_relu and "stablehlo.maximum" not in on_relu
  assert "stablehlo.maximum" in off_relu and "stablehlo.select" not in off_relu
  for on, off in zip(values["on"], values["off"]):
    np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-5)


def test_steps_compile_with_the_cpu_options_where_the_kernels_are_on():
  """A run's eval step carries xla_cpu.compiler_options to XLA: resnet10t's convolutions, which
  XLA's defaults hand to YNNPACK (7 of 7 here), stay XLA's own, but for one that a reduction alone
  reads (the last, under the pooling mean: YNNPACK's reduction fusion takes it in); and it
  predicts what the step compiled with XLA's defaults (xla_default_options) predicts. With the
  kernels off: no options."""
  from cxflax import parallel
  from cxflax.models.heads import create_network
  from cxflax.train.steps import init_variables, make_eval_step
  from cxflax.train.tasks import TASKS

  def convolutions_in_ynn(text: str) -> int:
    fused = {m.group(1) for m in re.finditer(r"calls=%?([\w.-]+)[^\n]*__ynn_fusion", text)}
    return sum(b.count(" convolution(") for b in re.split(r"\n(?=\S)", text) if b.split(" ")[0].lstrip("%") in fused)

  if jax.default_backend() != "cpu":
    pytest.fail("this test reads XLA's CPU programs")
  mesh, model = parallel.make_mesh(jax.devices()[:1]), create_network("resnet10t", "linear", 3)
  variables = init_variables(model, (32, 32, 3), 0)
  images = np.random.default_rng(3).normal(size=(4, 32, 32, 3)).astype(np.float32)
  batch = parallel.shard_batch({"image": images, "label": np.zeros(4, np.int32), "index": np.arange(4),
                                "valid": np.ones(4, np.float32)}, mesh)
  counts, predictions = {}, {}
  for variant in ("options", "defaults"):
    with xla_cpu.mode("on"), xla_cpu.xla_default_options() if variant == "defaults" else contextlib.nullcontext():
      step = make_eval_step(model, TASKS.get("classification"), mesh, fold_bn=False)
    text = step._step.lower(variables, batch).compile().as_text()
    counts[variant] = (convolutions_in_ynn(text), text.count(" convolution("))
    predictions[variant] = np.asarray(step(variables, batch)["pred"])
  assert counts == {"defaults": (7, 7), "options": (1, 7)}
  np.testing.assert_allclose(predictions["options"], predictions["defaults"], rtol=1e-5, atol=1e-6)
  with xla_cpu.mode("off"):
    assert xla_cpu.compiler_options() is None


def _equations(jaxpr):
  """The equations of a jaxpr and of the jaxprs nested in them."""
  for e in jaxpr.eqns:
    yield e
    for value in e.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


@pytest.mark.parametrize("train", [True, False])
def test_split_attention_is_one_function_in_both_modes(train):
  """ResNeSt's split attention keeps its radix splits apart with the CPU kernels on (private
  channel parts) and is a plain grouped convolution off: same variables, outputs, running
  statistics and gradients."""
  from cxflax.models.attention import SplitAttention
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(3, 9, 9, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 9, 9, 8)), jnp.float32)
  module = SplitAttention(8, radix=2)
  results = {}
  for kernels in MODES:
    with xla_cpu.mode(kernels):
      variables = module.init(jax.random.key(0), x, train=train)

      def loss(params, x):
        y, new = module.apply({**variables, "params": params}, x, train=train, mutable=["batch_stats"])
        return jnp.sum(y * w) + jnp.sum(jnp.sin(new["batch_stats"]["bn0"]["mean"])), (y, new)
      (_, (y, new)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(variables["params"], x)
      convs = [e for e in _equations(jax.make_jaxpr(lambda p: module.apply({**variables, "params": p}, x,
                                                                            train=train, mutable=["batch_stats"]))(
                   variables["params"]).jaxpr) if e.primitive.name == "conv_general_dilated"]
      results[kernels] = variables, y, new, grads, [e.params["feature_group_count"] for e in convs]
  (v_on, y_on, new_on, g_on, groups_on), (v_off, y_off, new_off, g_off, groups_off) = results["on"], results["off"]
  assert jax.tree.structure(v_on) == jax.tree.structure(v_off)
  for a, b in zip(jax.tree.leaves(v_on), jax.tree.leaves(v_off)):
    np.testing.assert_array_equal(a, b)
  assert groups_on == [1, 1] and 2 in groups_off  # the splits' convolutions, or one grouped
  np.testing.assert_allclose(y_on, y_off, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(new_on), jax.tree.leaves(new_off)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Within float32 rounding of the largest gradient (the bias before bn1 has a gradient of 0, in
  # rounding noise).
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g_off))
  for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_of_splits_is_batch_norm_of_their_concatenation(train):
  """Split attention's BatchNorm of channel parts: outputs, updated running statistics and
  gradients (through the statistics too) agree with layers.BatchNorm's of the concatenation."""
  from cxflax.models.attention import _SplitsBatchNorm
  rng = np.random.default_rng(3)
  parts = tuple(jnp.asarray(rng.normal(1.0 + i, 2.0, size=(3, 4, 5, c)), jnp.float32)
                for i, c in enumerate((4, 4, 6)))
  variables = {"params": {"scale": jnp.asarray(rng.normal(size=14), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=14), jnp.float32)},
               "batch_stats": {"mean": jnp.asarray(rng.normal(size=14), jnp.float32),
                               "var": jnp.asarray(rng.uniform(0.5, 2, size=14), jnp.float32)}}
  w = jnp.asarray(rng.normal(size=(3, 4, 5, 14)), jnp.float32)

  def loss(params, parts, as_parts):
    bn = (_SplitsBatchNorm if as_parts else layers.BatchNorm)(use_running_average=not train)
    y, new = bn.apply({**variables, "params": params}, parts if as_parts else jnp.concatenate(parts, -1),
                      mutable=["batch_stats"])
    if as_parts:
      assert isinstance(y, tuple) and [p.shape for p in y] == [p.shape for p in parts]
      y = jnp.concatenate(y, -1)
    stats = new["batch_stats"]
    return jnp.sum(y * w) + jnp.sum(jnp.sin(stats["mean"]) + stats["var"]), (y, stats)

  with xla_cpu.mode("on"):
    (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables["params"], parts, True)
    (_, (y_c, stats_c)), grads_c = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables["params"], parts, False)
  np.testing.assert_allclose(y, y_c, rtol=1e-5, atol=1e-5)
  for key in ("mean", "var"):
    np.testing.assert_allclose(stats[key], stats_c[key], rtol=1e-6)
  for g, g_c in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
    np.testing.assert_allclose(g, g_c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernels", MODES)
def test_bfloat16_stays_bfloat16(kernels):
  """Pooling (average pooling without counted padding divides by a float32 count in flax),
  BatchNorm and ReLU keep bfloat16 activations and their cotangents in bfloat16."""
  x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 7, 7, 3)), jnp.bfloat16)
  bn = layers.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  variables = bn.init(jax.random.key(0), x)
  layer_fns = {"avg_pool": lambda x: layers.avg_pool(x, 2, 2, ceil_mode=True, count_include_pad=False),
               "max_pool": lambda x: layers.max_pool(x, 3, 2, padding=1),
               "batch_norm": lambda x: bn.apply(variables, x, mutable=["batch_stats"])[0],
               "relu": lambda x: layers.relu(x)}
  with xla_cpu.mode(kernels):
    for name, f in layer_fns.items():
      y, vjp = jax.vjp(f, x)
      assert y.dtype == jnp.bfloat16, name
      assert vjp(jnp.ones_like(y))[0].dtype == jnp.bfloat16, name
