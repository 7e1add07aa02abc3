"""Seed 001 (Miron & Breaban): infection percentage regression from CT slices with ResNeSt-50.

Follows Sec. 3 and 3.1 of the paper: SAM (ρ = 0.05) over SGD (momentum 0.9, weight decay 5e-3,
the authors' code), learning rate 1e-3 with linear warm-up (1 epoch) then cosine annealing, 50
epochs, batch 16, 512×512 input without rescaling (`resize(512)` leaves the challenge's 512-px
slices as they are), 5 folds by subject stratified by severity, on the Per-COVID-19 challenge
data (phantom data by default). The head is chosen by the config argument:

  (default)   approach 1: a linear layer → 1, SmoothL1 (β = 1);
  multitask   approach 2: 101-way softmax whose expectation and a 101 → 1 regressor are both
              fitted with SmoothL1, with hybrid pooling (max 2x2, then average);
  kl          approach 3: approach 2 plus the KL divergence to the label distribution of Eq. 3
              around the rounded target p (0.6 at p, 0.15 at p ± 1, 0.05 at p ± 2). At the ends
              of the range the bins outside 0..100 are dropped and the rest renormalised to sum
              to 1: p = 0 gives 0.75, 0.1875, 0.0625 at 0, 1, 2 (p = 100 mirrored), p = 1 gives
              0.15/0.95, 0.6/0.95, ... (the paper does not say what it does there).

Inference (Sec. 3.2) rounds "the output ... to the closest integer": --mode=predict rounds every
checkpoint's prediction and their mean (config.predict.round=True), and averages the checkpoints
of the last 5 epochs (config.predict.last_n=5, keep_checkpoints=5) of each run in
config.predict.runs (one workdir per fold, default --workdir); evaluation during training rounds
too (config.round_predictions). Pseudo-labelling is config.pseudo_label.runs (the trained runs
that label the Val split).

Starts from ImageNet weights as the paper does: config.init_from='timm/resnest50d.in1k', timm's
weights fetched into the Hugging Face cache on first use (offline: the cached copy; or a
converted checkpoint, `python -m cxflax.convert`, as --config.init_from=DIR).

Augmentation (Sec. 3.1): RandAugment over the paper's ten operations (rotation 0–30°, color,
contrast, brightness, sharpness, shear x/y, cutout, translate x/y) and horizontal and vertical
flips, with the ranges of ildoonet/pytorch-randaugment's augment_list: rotation 0–30°, shear
0–0.3, color / contrast / brightness / sharpness factors 0.1–1.9, and translation (TranslateXabs /
TranslateYabs) 0–100 px and cutout (CutoutAbs, grey (125, 123, 114)) 0–40 px in absolute pixels,
level m/30 of each range. The paper gives neither N nor M: we use RandAugment's common N=2, M=9
(rotation 9°, translation 30 px, cutout 12 px at 512 px: a 13-px square, as PIL draws it). Folds
are grouped by subject and stratified by the severity categories of Per-COVID-19 (Sec. 4.1).

Departs from the paper (config.departures records none): the paper does not say how the 101 → 1
regressor of approach 2 is fed; cxflax feeds it the softmax probabilities (the paper's "output of
the previous step"; `head='multitask'`).

`:runlocal` (combinable: `:multitask,runlocal`) trains the smallest ResNeSt (resnest14d) from
scratch on 64-px phantom slices in a few minutes on a 2-core CPU, with AdamW instead of SAM+SGD
(which needs ImageNet weights and many epochs to get anywhere); RandAugment's translation and
cutout are scaled from 512 px (rand_augment(..., ref_size=512)) so that they move a 64-px slice
as much, relatively, as the paper's; predict averages its 2 kept checkpoints and does not round.
"""

from configs.common import imagenet_weights, parse_arg
from cxflax.config import base_config


def get_config(arg: str | None = None):
  _, args = parse_arg(arg, flags=("runlocal", "multitask", "kl"))
  c = base_config()
  c.model = "resnest50d"
  c.init_from = imagenet_weights("resnest50d", "in1k")
  c.head = "linear"
  c.loss.name, c.loss.beta = "smooth_l1", 1.0
  c.optim.name, c.optim.momentum, c.optim.weight_decay, c.optim.sam_rho = "sgd", 0.9, 5e-3, 0.05
  c.optim.learning_rate, c.schedule.name, c.schedule.warmup_epochs = 1e-3, "warmup_cosine", 1.0
  c.num_epochs = 50
  c.batch_size = c.eval_batch_size = 16
  c.num_folds, c.fold = 5, 0
  c.data.image_size = 512
  c.data.train_pp = ("to_rgb|resize({size})|rand_augment(2, 9)|flip_lr(0.5)|flip_ud(0.5)|"
                     "normalize('imagenet')")
  c.data.eval_pp = "to_rgb|resize({size})|normalize('imagenet')"
  c.data.stratify = "auto"  # severity categories
  c.data.workers = 2
  c.data.phantom.num_subjects = 200
  c.round_predictions = True
  c.keep_checkpoints = 5
  c.predict.round, c.predict.last_n = True, 5  # Sec. 3.2: rounded; checkpoints of the last 5 epochs
  if "multitask" in args or "kl" in args:
    c.head, c.pool, c.loss.name = "multitask", "hybrid", "multitask"
  if "kl" in args:
    c.loss.name = "multitask_kl"

  if "runlocal" in args:
    c.model = "resnest14d"
    c.init_from = ""  # from scratch: no download, and phantom slices are no ImageNet
    c.data.image_size = 64
    c.data.workers = 0
    c.data.phantom.num_subjects = 100
    c.batch_size = c.eval_batch_size = 32
    c.optim.name, c.optim.learning_rate, c.optim.weight_decay, c.optim.sam_rho = "adamw", 2e-3, 1e-4, 0.0
    c.num_epochs, c.schedule.warmup_epochs = 12, 1.0
    c.log_every_steps = 10
    c.keep_checkpoints = 2
    c.round_predictions = False  # MAE at 64 px is a few points: rounding would only add noise
    c.predict.round, c.predict.last_n = False, c.keep_checkpoints
    c.data.train_pp = c.data.train_pp.replace("rand_augment(2, 9)", "rand_augment(2, 9, ref_size=512)")
  return c
