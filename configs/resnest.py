"""Seed 001 (Miron & Breaban): infection percentage regression from CT slices with ResNeSt-50.

Follows Sec. 3 ("first approach") and Sec. 3.1 of the paper: a linear layer → 1 output on the
backbone, SmoothL1 (β = 1), SGD momentum 0.9 with weight decay 5e-3 (the authors' code),
learning rate 1e-3 with linear warm-up then cosine annealing, 50 epochs, 512×512 input without
rescaling, 5 folds by subject, on the Per-COVID-19 challenge data (phantom data by default).

Start from ImageNet weights as the paper does: convert timm's resnest50d checkpoint with
`python -m cxflax.convert --model resnest50d --checkpoint resnest50d.pth --out DIR` and pass
`--config.init_from=DIR` (nothing is downloaded by cxflax).

Augmentation (Sec. 3.1): RandAugment over the paper's ten operations (rotation 0–30°, color,
contrast, brightness, sharpness, shear x/y, cutout, translate x/y) and horizontal and vertical
flips. The paper gives neither N nor M: we use RandAugment's common N=2, M=9. Folds are grouped
by subject and stratified by the severity categories of Per-COVID-19 (Sec. 4.1).

Departs from the paper, until the issues that bring them land:
  * optimizer: plain SGD, without SAM.

`:runlocal` trains the smallest ResNeSt (resnest14d) from scratch on 64-px phantom slices in a
few minutes on a 2-core CPU.
"""

from cxflax.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.model = "resnest50d"
  c.head = "linear"
  c.loss, c.loss_beta = "smooth_l1", 1.0
  c.optimizer, c.momentum, c.weight_decay = "sgd", 0.9, 5e-3
  c.learning_rate, c.schedule, c.warmup_epochs = 1e-3, "warmup_cosine", 1.0
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

  if arg == "runlocal":
    c.model = "resnest14d"
    c.data.image_size = 64
    c.data.workers = 0
    c.data.phantom.num_subjects = 100
    c.batch_size = c.eval_batch_size = 32
    c.optimizer, c.learning_rate, c.weight_decay = "adamw", 2e-3, 1e-4
    c.num_epochs, c.warmup_epochs = 12, 1.0
    c.log_every_steps = 10
    c.keep_checkpoints = 2
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use ':runlocal' or nothing")
  return c
