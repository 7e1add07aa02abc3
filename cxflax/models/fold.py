"""BatchNorm folded into the convolution before it, for evaluation and prediction.

In evaluation mode a BatchNorm is an affine map per channel, y = x·m + (β − μ·m) with
m = γ / sqrt(σ² + ε). When x is a convolution's output and nothing else reads x, the
multiplication can move into the kernel (kernel·m, bias·m) and the BatchNorm reduces to adding
a bias: the same function, one elementwise multiply-add fewer per activation and a bias add
that XLA fuses with the activation after it.

Which convolutions feed which BatchNorm only is read from the traced computation, not assumed
from the architecture: a pair is folded only when the BatchNorm's input is the convolution's
output and the jaxpr uses that output exactly once (pre-activation networks such as DenseNet,
whose convolution outputs are also concatenated, keep those BatchNorms as they are).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.extend
from flax.core import unfreeze

from cxflax.models.layers import BatchNorm, Conv2d


def _path(module: nn.Module) -> tuple[str, ...]:
  return tuple(module.scope.path)


def foldable_pairs(model: nn.Module, variables: dict, image) -> list[tuple[tuple, tuple, float]]:
  """(conv path, BatchNorm path, BatchNorm epsilon) of every BatchNorm whose input is a
  convolution's output read by nothing else, from a trace of `model.apply(variables, image,
  train=False)` (abstract: no computation runs)."""
  convs: list[tuple] = []  # conv paths, in the order their outputs were marked
  marked: dict[int, tuple] = {}  # id(marked output) -> (index in convs, the output, kept alive)
  pairs: list[tuple[int, tuple, float]] = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, Conv2d):
      y = jax.lax.optimization_barrier(next_fun(*args, **kwargs))  # a marker in the jaxpr
      marked[id(y)] = (len(convs), y)
      convs.append(_path(module))
      return y
    if (context.method_name == "__call__" and isinstance(module, BatchNorm)
        and module.use_running_average and args and id(args[0]) in marked):
      pairs.append((marked[id(args[0])][0], _path(module), module.epsilon))
    return next_fun(*args, **kwargs)

  def traced(variables, image):
    with nn.intercept_methods(record):
      return model.apply(variables, image, train=False)

  jaxpr = jax.make_jaxpr(traced)(variables, image).jaxpr
  barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
  if len(barriers) != len(convs):  # a convolution inside a nested computation: fold nothing
    return []
  uses: dict[Any, int] = {}
  for v in [v for e in jaxpr.eqns for v in e.invars] + list(jaxpr.outvars):
    if not isinstance(v, jax.extend.core.Literal):
      uses[v] = uses.get(v, 0) + 1
  # A module may return several arrays (a barrier output each): every one must be read once.
  return [(convs[i], bn, eps) for i, bn, eps in pairs
          if all(uses.get(v) == 1 for v in barriers[i].outvars)]


def _get(tree: dict, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def fold_batchnorm(model: nn.Module, variables: dict, image) -> dict:
  """Variables in which every foldable BatchNorm (see foldable_pairs) has moved into its
  convolution, for `apply_folded`; such a BatchNorm keeps only its params/bias. `image` is an
  input batch (or its shape and dtype) to trace the model with."""
  out = unfreeze(variables)  # new containers, same arrays
  params, stats = out["params"], out.get("batch_stats", {})
  for conv, bn, epsilon in foldable_pairs(model, variables, image):
    p, s, c = _get(params, bn), _get(stats, bn), _get(params, conv)
    mul = p["scale"] * jax.lax.rsqrt(s["var"] + epsilon)
    c["kernel"] = c["kernel"] * mul
    if "bias" in c:
      c["bias"] = c["bias"] * mul
    _get(params, bn[:-1])[bn[-1]] = {"bias": p["bias"] - s["mean"] * mul}
    del _get(stats, bn[:-1])[bn[-1]]
  return out


def _folded_batchnorm(next_fun, args, kwargs, context):
  module = context.module
  if (context.method_name == "__call__" and isinstance(module, BatchNorm)
      and not module.has_variable("params", "scale")):
    return module.folded(*args)
  return next_fun(*args, **kwargs)


def apply_folded(model: nn.Module, folded_variables: dict, image):
  """`model.apply(..., train=False)` with variables from fold_batchnorm."""
  with nn.intercept_methods(_folded_batchnorm):
    return model.apply(folded_variables, image, train=False)
