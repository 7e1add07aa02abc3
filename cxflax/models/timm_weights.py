"""Import of timm (PyTorch) state dicts into cxflax's flax variables.

cxflax's modules are named after timm's state-dict keys, with one rule: a numeric segment (a
Sequential or ModuleList index) is joined to the name before it, so 'layer1.0.conv1.weight' is
params/layer1_0/conv1/kernel. Tensors are transposed to flax's layouts (OIHW → HWIO,
(out, in) → (in, out), conv1d OIK → KIO); BatchNorm's running statistics go to 'batch_stats'.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cxflax import trees
from cxflax.config import HUB_NAME
from cxflax.errors import CheckpointError
from cxflax.models.registry import create_model

_STAT_LEAF = {"running_mean": "mean", "running_var": "var"}
_SKIP = ("num_batches_tracked",)


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A timm state dict as numpy arrays, from a mapping or a .pth/.pt/.bin/.safetensors file."""
  if isinstance(source, Mapping):
    sd = dict(source)
  else:
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise CheckpointError(f"timm checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file
      sd = load_file(path)
    elif path.endswith((".pth", ".pt", ".bin")):
      try:
        import torch
      except ImportError as e:
        raise CheckpointError(f"reading {path!r} needs PyTorch (pip install torch), or convert it "
                              "to .safetensors first") from e
      sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
      raise CheckpointError(f"timm checkpoint {path!r}: unknown format; use .pth, .pt, .bin or "
                            ".safetensors")
    for wrapper in ("state_dict", "model", "state_dict_ema"):
      if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
        sd = sd[wrapper]
        break
  out = {}
  for key, value in sd.items():
    key = key[len("module."):] if key.startswith("module.") else key
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so widen half types
      value = value.detach().cpu()
      value = (value.float() if value.is_floating_point() and value.element_size() < 4 else value).numpy()
    out[key] = np.asarray(value)
  return out


def flax_path(key: str) -> tuple[str, tuple[str, ...]]:
  """('params' | 'batch_stats', path) of a timm state-dict key, or ('', ()) for keys to skip."""
  parts = key.split(".")
  leaf, modules = parts[-1], []
  for p in parts[:-1]:
    if p.isdigit() and modules:
      modules[-1] = f"{modules[-1]}_{p}"
    else:
      modules.append(p)
  if leaf in _SKIP:
    return "", ()
  if leaf in _STAT_LEAF:
    return "batch_stats", tuple(modules) + (_STAT_LEAF[leaf],)
  return "params", tuple(modules) + (leaf,)  # 'weight' is renamed by _to_flax, by its rank


def _to_flax(path: tuple[str, ...], value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  leaf = path[-1]
  if leaf != "weight":
    return path, value
  if value.ndim == 1:  # norm layers
    return path[:-1] + ("scale",), value
  if value.ndim == 2:  # Linear (out, in)
    return path[:-1] + ("kernel",), value.T
  if value.ndim == 3:  # Conv1d (out, in, k)
    return path[:-1] + ("kernel",), value.transpose(2, 1, 0)
  if value.ndim == 4:  # Conv2d (out, in, kh, kw)
    return path[:-1] + ("kernel",), value.transpose(2, 3, 1, 0)
  raise CheckpointError(f"weight {'.'.join(path)} has unsupported rank {value.ndim}")


def _expected(name: str, num_classes: int, **kwargs) -> dict[str, dict[tuple, Any]]:
  """Shapes of every variable of create_model(name, num_classes), by collection and path (not
  to be modified: shared between calls)."""
  return _traced_shapes(name, num_classes, tuple(sorted(kwargs.items())))


@functools.lru_cache(maxsize=64)
def _traced_shapes(name: str, num_classes: int, kwargs: tuple) -> dict[str, dict[tuple, Any]]:
  """_expected, traced once per process and model: tracing a deep network's init takes seconds,
  and loading checkpoints of one model again (or its headless and classifier variants) needs
  the same shapes."""
  model = create_model(name, num_classes=num_classes, **dict(kwargs))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                             train=False))
  return {col: traverse_util.flatten_dict(dict(tree)) for col, tree in shapes.items()}


def load_timm_weights(name: str, state_dict, num_classes: int | None = None, dtype=np.float32,
                      **model_kwargs) -> dict[str, Any]:
  """Flax variables {'params', 'batch_stats'} for create_model(name, num_classes, **model_kwargs).

  state_dict: a timm state dict (numpy arrays or torch tensors) or a path to .pth, .pt, .bin or
  .safetensors. With num_classes different from the checkpoint's, the classifier is freshly
  initialised and everything else is loaded. Missing, unexpected or wrongly shaped keys raise a
  CheckpointError that names them. dtype: of the returned arrays (float32; float64 for exact
  comparisons).
  """
  sd = read_state_dict(state_dict)
  converted: dict[str, dict[tuple, np.ndarray]] = {"params": {}, "batch_stats": {}}
  for key, value in sd.items():
    col, path = flax_path(key)
    if col:
      path, value = _to_flax(path, value)
      converted[col][path] = value

  # The classifier: variables the model has with classes and lacks without.
  headless = _expected(name, 0, **model_kwargs)
  head_keys = {p for p in converted["params"] if p not in headless.get("params", {})}
  ckpt_classes = None
  for p in head_keys:
    if p[-1] == "bias":
      ckpt_classes = converted["params"][p].shape[0]
  if num_classes is None:
    num_classes = ckpt_classes if ckpt_classes is not None else 0
  expected = _expected(name, num_classes, **model_kwargs)
  fresh_head = num_classes != ckpt_classes
  if fresh_head:
    for p in head_keys:
      del converted["params"][p]

  problems = []
  for col in ("params", "batch_stats"):
    m = trees.Match(traverse_util.unflatten_dict(expected.get(col, {})),
                    traverse_util.unflatten_dict(converted[col]))
    head = {"/".join(p) for p in expected.get(col, {}) if p not in headless.get(col, {})}
    missing = [p for p in m.missing if not (fresh_head and p in head)]  # a fresh head is initialised
    wrong = [f"{p}: checkpoint {m.shapes(p)[0]}, model {m.shapes(p)[1]}" for p in m.wrong_shape]
    if missing:
      problems.append(f"missing {col}: " + ", ".join(missing))
    if m.unexpected:
      problems.append(f"unexpected {col}: " + ", ".join(m.unexpected))
    if wrong:
      problems.append(f"wrongly shaped {col}: " + "; ".join(wrong))
  if problems:
    raise CheckpointError(f"timm state dict does not fit {name!r}:\n  " + "\n  ".join(problems))

  variables = {col: {p: np.asarray(v, dtype) for p, v in converted[col].items()}
               for col in ("params", "batch_stats")}
  if fresh_head:
    model = create_model(name, num_classes=num_classes, **model_kwargs)
    init = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 96, 96, 3)),
                                      train=False))()
    flat_init = traverse_util.flatten_dict(dict(init["params"]))
    for p in expected["params"]:
      if p not in variables["params"]:
        variables["params"][p] = np.asarray(flat_init[p], dtype)
  return {col: traverse_util.unflatten_dict(v) for col, v in variables.items() if v}


HUB_FILE = "model.safetensors"


def is_hub_name(name: str) -> bool:
  return bool(HUB_NAME.fullmatch(name))


def hub_weights_file(name: str, model: str) -> str:
  """The local path of the pretrained weights `name` ('timm/resnest50d.in1k') for the config's
  `model`: fetched through huggingface_hub into its cache (HF_HUB_CACHE, by default
  ~/.cache/huggingface/hub) the first time, the cached copy afterwards and offline
  (HF_HUB_OFFLINE=1). Safetensors, so no PyTorch is needed to read it."""
  match = HUB_NAME.fullmatch(name)
  if not match:
    raise CheckpointError(f"config.init_from={name!r} is not a timm weights name such as "
                          "'timm/resnest50d.in1k'")
  if match["arch"] != model:
    raise CheckpointError(f"config.init_from={name!r} holds weights of {match['arch']!r}, but the "
                          f"config's model is {model!r}")
  import huggingface_hub
  from huggingface_hub import constants
  try:
    return huggingface_hub.hf_hub_download(name, HUB_FILE)
  except Exception as e:  # offline, unreachable, or no such repository
    cached = huggingface_hub.try_to_load_from_cache(name, HUB_FILE)
    if isinstance(cached, str):
      return cached
    raise CheckpointError(
        f"config.init_from={name!r}: {HUB_FILE} is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and could not be fetched ({type(e).__name__}). Where there is "
        f"a network, run `hf download {name} {HUB_FILE}` (it fills that cache), or download "
        f"https://huggingface.co/{name}/resolve/main/{HUB_FILE} and set "
        f"--config.init_from=/path/to/{HUB_FILE}") from None
