"""The defaults every recipe config starts from, and the checks run before any work starts.

Plain Python (no jax): what depends on the machine, such as batch sizes against the device
count, is checked when the run starts (cxflax.parallel.check_batch_sizes).

Recipe files in ``configs/`` call ``base_config()`` and change what their paper changes. Every
field can be overridden on the command line (``--config.optim.learning_rate=3e-4``); unknown fields are
refused by ml_collections.

ml_collections is imported where it is used, not with this module: `base_config(plain=True)`
builds the same defaults without it, for the benchmarks that run on machines which have jax but
not ml_collections (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import copy
import os
import re
from typing import TYPE_CHECKING

from cxflax.data.images import parse_window
from cxflax.errors import ConfigError

if TYPE_CHECKING:
  import ml_collections

DTYPES = ("auto", "float32", "bfloat16")
# timm's pretrained weights on the Hugging Face Hub (cxflax/models/timm_weights.py fetches them).
HUB_NAME = re.compile(r"timm/(?P<arch>[A-Za-z0-9_]+)\.(?P<tag>[A-Za-z0-9_]+)")
TARGETS = ("label", "lung_mask")


class Fields(dict):
  """A group of config fields as a plain dict read by attribute (config.optim.name), what
  base_config(plain=True) builds: no command-line overrides, locking or type checks."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None

  __setattr__ = dict.__setitem__


def base_config(plain: bool = False) -> ml_collections.ConfigDict:
  """The defaults, as ml_collections.ConfigDicts, or with `plain` as nested `Fields` (the same
  values; clip_min's typed None a plain None), which need no ml_collections."""
  if plain:
    group, clip_min = Fields, None
  else:
    import ml_collections
    group, clip_min = ml_collections.ConfigDict, ml_collections.FieldReference(None, field_type=float)
  c = group()
  # Model: a timm backbone (unpooled) and a head.
  c.model = "resnet50"
  c.head = "linear"              # linear | mlp | multitask | fastai | embedding | embedding_classifier
  c.head_kwargs = group()  # the head's own fields, e.g. hidden=(500, 250)
  c.pool = "avg"                 # avg | max | avgmax | catavgmax | hybrid (seed 001)
  c.head_dropout = 0.0            # dropout before the head's (last) linear layer
  # timm's drop_rate inside the backbone, where it has one before its pooled features: VGG's
  # pre-logits (fc1 → ReLU → dropout → fc2), so that drop_rate and head_dropout of 0.5 give
  # torchvision vgg19_bn's two classifier dropouts (seed 003). Other backbones drop out only
  # before timm's own classifier, i.e. with config.backbone_classes > 0.
  c.drop_rate = 0.0
  c.backbone_classes = 0         # >0 keeps timm's classifier under the head (seed 000: 1000)
  c.drop_path_rate = 0.0
  # Computation dtype; parameters, optimizer state, BatchNorm statistics and losses stay float32.
  # auto: bfloat16 where JAX's default backend is a GPU or TPU, float32 on CPU (resolve_dtype).
  c.dtype = "auto"
  # Kernels written for XLA's CPU backend (cxflax/models/xla_cpu.py: convolutions as matrix
  # products, closed-form BatchNorm backward, ...): auto (on where JAX's default backend is the
  # CPU) | on | off (plain flax/XLA). Same function and parameters either way; it holds for the
  # whole run (set when the run starts, not per stage).
  c.cpu_kernels = "auto"
  # Starting weights: timm's pretrained weights by name ('timm/resnest50d.in1k', fetched into the
  # Hugging Face cache), a weights file (.safetensors, .pth), a converted checkpoint (python -m
  # cxflax.convert) or a cxflax run's workdir; '' = from scratch.
  c.init_from = ""

  # Loss (config.loss.*): smooth_l1 | mse | multitask | multitask_kl (regression); cross_entropy |
  # focal | triplet (classes; triplet trains an embedding).
  c.loss = group()
  c.loss.name = "smooth_l1"
  c.loss.beta = 1.0              # smooth_l1 / multitask: SmoothL1's β
  c.loss.label_smoothing = 0.0
  c.loss.kl_weight = 1.0         # multitask_kl: weight of the KL term
  c.loss.gamma = 2.0             # focal: γ
  c.loss.alpha = ()              # focal: per-class α; () = inverse class frequency of the training split
  c.loss.margin = 1.0            # triplet: margin
  c.loss.mining = "batch_hard"   # triplet: batch_hard | batch_all

  # Optimisation (config.optim.*).
  c.optim = group()
  c.optim.name = "sgd"           # sgd | adam | adamw
  c.optim.learning_rate = 1e-3
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9               # adam / adamw
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = 0.0
  c.optim.grad_accum_steps = 1
  c.optim.sam_rho = 0.0          # > 0: SAM around the optimizer (seed 001: 0.05)
  c.optim.sam_per_device = False  # SAM's ascent per device (m-sharpness), as in the original SAM
  # Parameter groups: regexes on parameter paths ('backbone/layer1_0/conv1/kernel'); with
  # group_lr_range=(low, high) their rates are spread geometrically (seed 002).
  c.optim.param_groups = ()
  c.optim.group_lr_range = ()
  c.optim.freeze = ()            # regexes of parameters that get no updates
  c.optim.train_frozen_bn = True  # BatchNorm affine parameters stay trainable when frozen (fastai)

  # Learning-rate schedule (config.schedule.*), peaking at config.optim.learning_rate.
  c.schedule = group()
  # constant | cosine (torch CosineAnnealingLR, periodic) | warmup_cosine | cosine_restarts | step |
  # one_cycle (fastai v1's fit_one_cycle, seed 002)
  c.schedule.name = "warmup_cosine"
  c.schedule.unit = "step"       # step | epoch (the rate changes once per epoch)
  c.schedule.warmup_epochs = 1.0
  c.schedule.min_learning_rate = 0.0
  c.schedule.period_epochs = 0.0  # cosine / cosine_restarts: T_max / T_0 (0 = the whole run)
  c.schedule.restart_mult = 1
  c.schedule.step_decay_epochs = 0.0
  c.schedule.step_decay_factor = 0.5
  # one_cycle: warm-up fraction and the start / end rates as divisors (torch's OneCycleLR names;
  # fastai v1's defaults): from lr / div_factor up to lr, then down to lr / (div_factor ·
  # final_div_factor).
  c.schedule.pct_start = 0.3
  c.schedule.div_factor = 25.0
  c.schedule.final_div_factor = 1e4

  # Training stages run one after another (seed 002's progressive resizing): each a dict of
  # overrides keyed by field paths, e.g. {"image_size": 128, "num_epochs": 3,
  # "optim.freeze": ("^backbone/",)}; a bare key of config.data (image_size) means the data field.
  c.stages = ()
  c.num_epochs = 30
  c.batch_size = 32              # global, over all devices and processes
  c.eval_batch_size = 32

  # Cross-validation: subject-grouped folds; the held-out fold is the evaluation split.
  c.num_folds = 5
  c.fold = 0
  c.seed = 0

  # Bookkeeping.
  c.log_every_steps = 20
  c.eval_every_epochs = 1
  c.checkpoint_every_epochs = 1
  c.keep_checkpoints = 3
  # TensorBoard pictures while training: a grid of this many augmented inputs of each stage's first
  # batch, and at each evaluation one of this many evaluation examples with their Grad-CAM maps
  # (regression and classification); 0: neither.
  c.tensorboard_images = 4
  # A checkpoint made by another run (resume, eval, predict; checkpoint.RUN_FIELDS: model, head,
  # task, class names and their order, the stage's image size, number of stages, optimizer):
  # 'error' refuses it, listing every difference; 'accept' only logs them. Variables or an
  # optimizer state that do not fit cannot be restored either way.
  c.checkpoint_mismatch = "error"
  # Where the recipe knowingly differs from its paper: ((field path, reason), ...), e.g.
  # (("schedule.unit", "the report steps per iteration; ..."),). `--mode=describe` lists them and
  # tests/test_paper_settings.py accepts a difference from the paper only when listed here.
  c.departures = ()
  # A non-finite loss or gradient, or an update that would make the state non-finite: 'error'
  # stops the run naming the step (nothing non-finite is saved); 'skip' leaves that update out
  # and counts it (train/skipped_updates).
  c.on_nonfinite = "error"
  c.halt_after_steps = 0         # >0: checkpoint and stop once this step is reached (as if preempted)
  c.round_predictions = False    # regression: round to integers when evaluating (seed 001)

  # Patch classifier (seed 003, after Oh, Park & Ye): the backbone sees patches of `size` px
  # centred inside the lung mask, which the preprocessing appends as the last channel
  # (...|append_mask('lung_mask')): one random patch per image per training step; `num` patches
  # per image classified at once at evaluation, aggregated by mean probability or majority vote.
  c.patches = group()
  c.patches.num = 0              # > 0 turns the classifier into a patch classifier (K)
  c.patches.size = 224
  c.patches.aggregate = "mean"   # mean | vote
  # Patches per forward pass at evaluation (the B·K patches of a batch go through one compiled
  # network `chunk` at a time); 0 = automatic: a few patches (4 of 224 px) where the CPU kernels
  # are on (config.cpu_kernels) on one device, where XLA's CPU backend is faster on small
  # batches, else all at once. Same predictions whatever the chunk (float rounding apart).
  c.patches.chunk = 0

  # Learned ensembles of trained runs (--mode=ensemble): 'average' or 'se' (seed 000) over the
  # members' backbone outputs with a new head, or 'flannel' (seed 003) over their probabilities.
  c.ensemble = group()
  c.ensemble.kind = ""
  c.ensemble.members = ()        # workdirs of trained runs
  c.ensemble.activation = "tanh"  # flannel: tanh ('novel') or softmax
  c.ensemble.head_hidden = (500, 250)

  # --mode=predict: average the predictions of runs (folds) and of their last checkpoints.
  c.predict = group()
  c.predict.runs = ()            # workdirs (default: --workdir)
  c.predict.last_n = 1           # checkpoints per run (seed 001: the last 5 epochs)
  c.predict.split = "val"
  # Regression: round every checkpoint's values and their mean to integers (seed 001, Sec. 3.2).
  c.predict.round = False
  # Regression: every checkpoint's values clipped below at this value before averaging (seed 000's
  # authors set negative predictions to 0: clip_min=0.0); None: no clipping.
  c.predict.clip_min = clip_min
  c.predict.images = ""          # a folder of images to predict (segmentation: masks written as PNG)

  # --mode=eval's report (cxflax/train/report.py): predictions.csv, report/ and report.html.
  c.eval = group()
  c.eval.report = True
  c.eval.bootstrap_samples = 1000  # resamples of the examples for the 95 % intervals (0: none)
  c.eval.seed = 0                # the resamples' seed
  c.eval.worst = 8               # worst-predicted examples shown with their images

  # --mode=explain: Grad-CAM overlays (probabilistic Grad-CAM for a patch classifier, seed 003) of
  # the evaluation split's first `num` images, or of the images named, or of config.predict.images.
  c.explain = group()
  c.explain.num = 8
  c.explain.images = ()          # file names (as predictions list them) instead of the first num
  c.explain.target = "predicted"  # the class each map explains: predicted | a class index or name
  c.explain.layer = ""           # a module path ('backbone/layer3_0'); '' = the last feature map
  c.explain.alpha = 0.4          # opacity of the map's colours over the grayscale image

  # Pseudo-labelling (seed 001): examples of another split, labelled by trained runs, join the
  # training examples.
  c.pseudo_label = group()
  c.pseudo_label.runs = ()
  c.pseudo_label.split = "val"
  c.pseudo_label.last_n = 1
  c.pseudo_label.round = False

  # --mode=lr_find: fastai v1's range test, the learning rate swept exponentially from start
  # towards end, one step each; the suggestion skips the first skip_start and last skip_end steps.
  c.lr_find = group()
  c.lr_find.start = 1e-7
  c.lr_find.end = 10.0
  c.lr_find.steps = 100
  c.lr_find.skip_start = 10
  c.lr_find.skip_end = 5

  c.data = group()
  # phantom | per_covid19 | covidx | covid_ct | flannel | folder | csv | tfds (see data/sources/)
  c.data.source = "phantom"
  c.data.root = ""               # the dataset's folder (tfds: the TFDS data_dir)
  c.data.tfds_name = ""          # tfds: cxflax's builder name, e.g. 'per_covid19'
  c.data.train_file = ""         # covidx label files / csv tables, per split ("" = the layout's)
  c.data.val_file = ""
  c.data.test_file = ""
  c.data.class_names = ()        # folder/csv: class order (default: sorted names)
  c.data.window = ""             # DICOM only: CT window, 'lung' | 'mediastinum' | ... | '(centre, width)' in HU
  c.data.on_bad_data = "error"   # error | skip (bad entries left out and counted in the log)
  c.data.verify_images = False   # decode every image before training (always when skipping)
  # auto (severity for regression, class otherwise) | none (scikit-learn's GroupKFold by subject,
  # unshuffled, so config.seed leaves it alone: seed 000)
  c.data.stratify = "auto"
  c.data.target = "label"        # label | lung_mask (segmentation: the mask is the per-pixel target)
  c.data.mask_dir = ""           # files on disk: lung masks as <mask_dir>/<image name stem>.png
  c.data.image_size = 512
  c.data.eval_split = "fold"     # fold: the held-out fold; val / test: the source's own split
  c.data.workers = 0             # grain worker processes (0: read in the main process)
  c.data.stats_images = 256      # normalize('dataset'): training images the statistics use
  c.data.train_pp = "to_rgb|resize({size})|flip_lr(0.5)|normalize('imagenet')"
  c.data.eval_pp = "to_rgb|resize({size})|normalize('imagenet')"
  c.data.phantom = group()
  c.data.phantom.kind = "ct"     # ct (regression) | cxr (4 classes)
  c.data.phantom.num_subjects = 200
  c.data.phantom.slices_per_subject = (3, 6)
  c.data.phantom.seed = 0
  c.data.phantom.covid_labels = False  # ct: classes NonCOVID / COVID (any lesion) instead of the percentage
  c.data.phantom.covid_min_percentage = 0.0  # with covid_labels: COVID when lesions cover more than this % of the lung
  return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates and returns a copy in which '{size}' in the preprocessing specs is the image size
  and '{size+N}' / '{size-N}' that size plus or minus N pixels (seed 000 resizes to size + 32
  before its centre crop).

  The unresolved specs are kept in data.train_pp_template / data.eval_pp_template so that
  training stages of other image sizes can resolve them again. A plain config (base_config(plain=True))
  stays plain.
  """
  if isinstance(config, Fields):
    config = copy.deepcopy(config)
  else:
    import ml_collections
    config = ml_collections.ConfigDict(config.to_dict())
  if "train_pp_template" not in config.data:
    config.data.train_pp_template = config.data.train_pp
    config.data.eval_pp_template = config.data.eval_pp
  config.dtype = resolve_dtype(config.dtype)
  for key in ("train_pp", "eval_pp"):
    config.data[key] = resolve_pp(config.data[f"{key}_template"], config.data.image_size, f"config.data.{key}")
  validate(config)
  return config


def resolve_dtype(dtype: str) -> str:
  """config.dtype as the run computes: 'auto' is bfloat16 on GPUs and TPUs (their matrix units
  run it at twice float32's rate or more) and float32 on CPU; another value is itself."""
  if dtype != "auto":
    return dtype
  import jax
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


_SIZE_TERM = re.compile(r"size(?:([+-])(\d+))?")


def resolve_pp(template: str, size: int, name: str) -> str:
  """`template` with each '{size}', '{size+N}' or '{size-N}' replaced by its number of pixels;
  anything else in braces, or a brace left unmatched, is a ConfigError naming `name`."""
  def term(match):
    found = _SIZE_TERM.fullmatch(match.group(1).replace(" ", ""))
    if not found:
      raise ConfigError(f"{name}: cannot resolve '{match.group(0)}' in {template!r}; the "
                        "preprocessing templates take '{size}', '{size+N}' or '{size-N}'")
    sign, n = found.groups()
    return str(size + (int(n) if sign == "+" else -int(n) if sign == "-" else 0))
  out = re.sub(r"\{([^{}]*)\}", term, template)
  if "{" in out or "}" in out:
    raise ConfigError(f"{name}: unmatched brace in {template!r}; the preprocessing templates "
                      "take '{size}', '{size+N}' or '{size-N}'")
  return out


def stage_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """One finalized config per training stage: config.stages' overrides applied in turn. A key is
  a field path ('num_epochs', 'optim.learning_rate', 'data.image_size'); a bare key of
  config.data that is no top-level field (image_size) overrides the data field."""
  import ml_collections
  if not config.stages:
    return [config]
  out = []
  for i, stage in enumerate(config.stages):
    c = ml_collections.ConfigDict(config.to_dict())
    c.stages = ()
    for key, value in dict(stage).items():
      if key == "cpu_kernels":
        raise ConfigError(f"config.stages[{i}]: cpu_kernels holds for the whole run; set config.cpu_kernels")
      if "." not in key and key in c.data and key not in c:
        key = f"data.{key}"
      *parents, leaf = key.split(".")
      node = c
      for part in parents:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"config.stages[{i}]: unknown field {key!r}{_nested_hint(c, key)}")
      if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"config.stages[{i}]: {key!r} is a group of fields; set them one by one "
                          f"('{key}.{next(iter(node[leaf].keys()), '...')}')")
      node[leaf] = tuple(value) if isinstance(value, list) else value
    out.append(finalize(c))
  return out


def _nested_hint(config: ml_collections.ConfigDict, key: str) -> str:
  """' (did you mean 'optim.freeze'?)' where a bare key is a field of a nested group."""
  import ml_collections
  if "." in key:
    return ""
  paths = [f"{name}.{key}" for name, group in config.items()
           if isinstance(group, ml_collections.ConfigDict) and key in group]
  return f" (did you mean {' or '.join(map(repr, paths))}?)" if paths else ""


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad field."""
  def need(ok: bool, msg: str):
    if not ok:
      raise ConfigError(msg)

  need(config.dtype in DTYPES, f"config.dtype must be one of {DTYPES}, got {config.dtype!r}")
  need(config.num_epochs > 0, f"config.num_epochs must be positive, got {config.num_epochs}")
  o = config.optim
  need(o.learning_rate > 0, f"config.optim.learning_rate must be positive, got {o.learning_rate}")
  need(o.weight_decay >= 0, f"config.optim.weight_decay must be >= 0, got {o.weight_decay}")
  for key in ("head_dropout", "drop_rate", "drop_path_rate"):
    need(0 <= config[key] < 1, f"config.{key} must be in [0, 1), got {config[key]}")
  need(config.num_folds >= 2, f"config.num_folds must be at least 2, got {config.num_folds}")
  need(0 <= config.fold < config.num_folds,
       f"config.fold must be in 0..{config.num_folds - 1}, got {config.fold}")
  need(config.data.image_size >= 32, f"config.data.image_size must be at least 32, got "
       f"{config.data.image_size}")
  need(config.keep_checkpoints >= 1, f"config.keep_checkpoints must be >= 1, got {config.keep_checkpoints}")
  need(config.checkpoint_mismatch in ("error", "accept"),
       f"config.checkpoint_mismatch must be 'error' or 'accept', got {config.checkpoint_mismatch!r}")
  need(o.sam_rho >= 0, f"config.optim.sam_rho must be >= 0, got {o.sam_rho}")
  need(o.grad_accum_steps >= 1, f"config.optim.grad_accum_steps must be >= 1, got {o.grad_accum_steps}")
  need(config.on_nonfinite in ("error", "skip"),
       f"config.on_nonfinite must be 'error' or 'skip', got {config.on_nonfinite!r}")
  need(config.halt_after_steps >= 0, f"config.halt_after_steps must be >= 0, got {config.halt_after_steps}")
  need(config.log_every_steps >= 1, f"config.log_every_steps must be >= 1, got {config.log_every_steps}")
  need(config.data.target in TARGETS, f"config.data.target must be one of {TARGETS}, got {config.data.target!r}")
  try:
    parse_window(config.data.window)
  except ValueError as e:
    raise ConfigError(f"config.data.window: {e}") from None
  need(config.predict.last_n >= 1, f"config.predict.last_n must be >= 1, got {config.predict.last_n}")
  e = config.explain
  need(e.num >= 1, f"config.explain.num must be >= 1, got {e.num}")
  need(0 <= e.alpha <= 1, f"config.explain.alpha must be in [0, 1], got {e.alpha}")
  f = config.lr_find
  need(0 < f.start < f.end, f"config.lr_find.start and config.lr_find.end must satisfy 0 < start < end, got "
       f"{f.start} and {f.end}")
  need(f.steps >= 2, f"config.lr_find.steps must be at least 2, got {f.steps}")
  for key in ("skip_start", "skip_end"):
    need(f[key] >= 0, f"config.lr_find.{key} must be >= 0, got {f[key]}")
  for key in ("bootstrap_samples", "worst"):
    need(config.eval[key] >= 0, f"config.eval.{key} must be >= 0, got {config.eval[key]}")
  p = config.patches
  need(p.num >= 0, f"config.patches.num must be >= 0, got {p.num}")
  need(p.get("chunk", 0) >= 0, f"config.patches.chunk must be >= 0 (0 = automatic), got {p.get('chunk')}")
  need(p.aggregate in ("mean", "vote"), f"config.patches.aggregate must be 'mean' or 'vote', got {p.aggregate!r}")
  if p.num:
    need(32 <= p.size <= config.data.image_size, f"config.patches.size={p.size} must be between 32 "
         f"and config.data.image_size ({config.data.image_size})")
    need("append_mask" in config.data.train_pp and "append_mask" in config.data.eval_pp,
         "config.patches.num > 0: the patch classifier samples patches inside the lung mask, which "
         "both preprocessing specs must end with ('...|append_mask(\'lung_mask\')')")
  need(config.tensorboard_images >= 0, f"config.tensorboard_images must be >= 0, got {config.tensorboard_images}")
  for key in ("batch_size", "eval_batch_size"):
    need(config[key] > 0, f"config.{key} must be positive, got {config[key]}")
  if config.init_from and not os.path.exists(config.init_from):
    need(HUB_NAME.fullmatch(config.init_from) is not None,
         f"config.init_from={config.init_from!r}: no such file or folder, nor a timm weights name "
         "such as 'timm/resnest50d.in1k'")

