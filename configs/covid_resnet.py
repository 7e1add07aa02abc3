"""Seed 002 (Farooq & Hafeez, COVID-ResNet): 4-class chest X-ray classification (normal,
bacterial, viral, COVID-19) on COVIDx with ResNet-50, progressive resizing and discriminative
learning rates, as in Sec. II-C/D of the paper and fastai v1's defaults the authors used.

Head: fastai's (concatenated average and max pooling → BatchNorm → dropout 0.25 → linear 512 →
ReLU → BatchNorm → dropout 0.5 → linear). Adam, batch 32, cross-entropy, ImageNet normalisation,
flips, rotation up to 15° and lighting changes (fastai's get_transforms). The network is split
into fastai's three layer groups for ResNets (stem to layer2, layer3 and layer4, head);
discriminative rates are spread geometrically over them (fastai's slice(lo, hi)). Stages:

  I    128 px: head only at 1e-3 for 3 epochs; whole network at 1e-6…1e-4 for 5 epochs
  II   224 px: head only at 1e-4 for 3 epochs; whole network at 1e-6…1e-4 for 5 epochs
  III  229 px: whole network at 1e-6…1e-4 for 25 epochs

each with fastai's one-cycle-like rate (25 % warm-up, cosine decay). Frozen stages keep
BatchNorm trainable, as fastai does. The LR range finder of the paper is --mode=lr_find.

Departs from the paper: the paper gives no rates for the whole-network steps of stages I and II
("discriminative learning rate ... as before"); we use stage III's 1e-6…1e-4.
`:runlocal` runs the same five stages on 48/56/64-px phantom X-rays (480 subjects) with
resnet10t, 2/6/1/4/6 epochs, and, as it trains from scratch, rates 5e-4…2e-3 for the whole
network.
"""

from configs.common import parse_arg
from cxflax.config import base_config

HEAD_ONLY = ("^backbone/",)
FASTAI_RESNET_GROUPS = ("^backbone/(conv1|bn1|layer1|layer2)", "^backbone/(layer3|layer4)", "^head/")


def _stage(size, epochs, lr=None, lr_range=None, freeze=()):
  """A config.stages entry: field paths → values for one stage."""
  s = {"data.image_size": size, "num_epochs": epochs, "schedule.warmup_epochs": 0.25 * epochs,
       "optim.freeze": freeze}
  if lr_range:
    s["optim.group_lr_range"] = lr_range
  else:
    s["optim.learning_rate"], s["optim.group_lr_range"] = lr, (lr, lr)
  return s


def get_config(arg: str | None = None):
  _, args = parse_arg(arg, flags=("runlocal",))
  c = base_config()
  c.model = "resnet50"
  c.head, c.head_kwargs.hidden, c.head_kwargs.ps = "fastai", 512, 0.5
  c.loss.name = "cross_entropy"
  c.optim.name, c.optim.weight_decay = "adam", 0.0
  c.schedule.name = "warmup_cosine"
  c.optim.param_groups = FASTAI_RESNET_GROUPS
  c.batch_size = c.eval_batch_size = 32
  c.data.source, c.data.eval_split = "covidx", "test"
  c.data.train_pp = ("to_rgb|resize({size})|flip_lr(0.5)|rotate(15, p=0.75)|lighting(0.2, p=0.75)|"
                     "normalize('imagenet')")
  c.data.eval_pp = "to_rgb|resize({size})|normalize('imagenet')"
  c.data.workers = 2
  c.data.phantom.kind = "cxr"
  sizes, epochs = (128, 224, 229), (3, 5, 3, 5, 25)
  if arg == "runlocal":
    c.model = "resnet10t"
    c.data.source, c.data.eval_split = "phantom", "fold"
    c.data.phantom.num_subjects, c.data.phantom.slices_per_subject = 480, (1, 1)
    c.data.workers = 0
    sizes, epochs = (48, 56, 64), (2, 6, 1, 4, 6)
    c.log_every_steps = 10
    c.keep_checkpoints = 2
    lr_range = (5e-4, 2e-3)  # from scratch, higher rates than fine-tuning needs
    head_lrs = (1e-2, 1e-3)
  else:
    lr_range = (1e-6, 1e-4)
    head_lrs = (1e-3, 1e-4)
  c.stages = (
      _stage(sizes[0], epochs[0], lr=head_lrs[0], freeze=HEAD_ONLY),
      _stage(sizes[0], epochs[1], lr_range=lr_range),
      _stage(sizes[1], epochs[2], lr=head_lrs[1], freeze=HEAD_ONLY),
      _stage(sizes[1], epochs[3], lr_range=lr_range),
      _stage(sizes[2], epochs[4], lr_range=lr_range),
  )
  c.data.image_size = sizes[0]
  c.num_epochs = epochs[0]
  return c
