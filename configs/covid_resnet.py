"""Seed 002 (Farooq & Hafeez, COVID-ResNet): 4-class chest X-ray classification (normal,
bacterial, viral, COVID-19) on COVIDx with ResNet-50, progressive resizing and discriminative
learning rates, as in Sec. II-C/D of the paper and fastai v1's defaults the authors used ("The
entire data preprocessing, data augmentation and training performed use the fastai framework").

Head: fastai's (`head='fastai'`, which pools by itself whatever `pool` shows: concatenated
average and max pooling → BatchNorm → dropout 0.25 → linear 512 → ReLU → BatchNorm → dropout
0.5 → linear). Batch 32, cross-entropy, ImageNet normalisation.
Optimizer: fastai v1's Learner default, Adam with β = (0.9, 0.99) and decoupled weight decay
1e-2 (true_wd: AdamW semantics), on every group including BatchNorm. Schedule: fastai v1's
fit_one_cycle per stage (config.schedule.name='one_cycle': 30 % of the steps rising from lr/25 to
lr by a cosine, the rest falling by a cosine to lr/(25·1e4)). The network is split into fastai's
three layer groups for ResNets (stem to layer2, layer3 and layer4, head); discriminative rates
are spread geometrically over them (fastai's slice(lo, hi)). Stages:

  I    128 px: head only at 1e-3 for 3 epochs; whole network at 1e-6…1e-4 for 5 epochs
  II   224 px: head only at 1e-4 for 3 epochs; whole network at 1e-6…1e-4 for 5 epochs
  III  229 px: whole network at 1e-6…1e-4 for 25 epochs

Frozen stages keep BatchNorm trainable, as fastai does. The LR range finder of the paper is
--mode=lr_find (fastai v1's: 1e-7 → 10 over 100 steps, suggestion at the steepest descent of the
smoothed loss).

Augmentation (Sec. II-B: "vertical flips ..., random rotation (maximum rotation angle was 15
degree), and lighting"), as fastai v1's get_transforms(flip_vert=True, max_rotate=15) gives it:
dihedral flips (flip_vert=True turns fastai's horizontal flip into the 8 symmetries of the
square), rotation up to 15° (p = 0.75), zoom up to 1.1 about a random point (p = 0.75) and
lighting 0.2 (brightness and contrast in logit space, p = 0.75 each).

Starts from torchvision's ImageNet weights, as fastai v1's resnet50 does
(config.init_from='timm/resnet50.tv_in1k', fetched into the Hugging Face cache on first use).

Departs from the paper: `optim.group_lr_range`: the paper gives no rates for the whole-network
steps of stages I and II ("discriminative learning rate ... as before"); we use stage III's
1e-6…1e-4.
`optim.b1`: fit_one_cycle also cycles Adam's β1 (0.95 → 0.85 → 0.95, against the rate); cxflax's
optimizers take a constant β1, so it stays at fastai's default 0.9.
`data.train_pp`: get_transforms' symmetric (perspective) warp of up to 0.2 is left out (no op for
it), the affine ops resample one after another instead of as one composed warp, and pixels moved
in from outside are black rather than fastai's reflection padding.
`:runlocal` runs the same five stages on 48/56/64-px phantom X-rays (480 subjects) with
resnet10t, 2/6/1/4/6 epochs, and, as it trains from scratch, rates 5e-4…2e-3 for the whole
network.
"""

from configs.common import depart, imagenet_weights, parse_arg
from cxflax.config import base_config

HEAD_ONLY = ("^backbone/",)
FASTAI_RESNET_GROUPS = ("^backbone/(conv1|bn1|layer1|layer2)", "^backbone/(layer3|layer4)", "^head/")


def _stage(size, epochs, lr=None, lr_range=None, freeze=()):
  """A config.stages entry: field paths → values for one stage."""
  s = {"data.image_size": size, "num_epochs": epochs, "optim.freeze": freeze}
  if lr_range:
    s["optim.group_lr_range"] = lr_range
  else:
    s["optim.learning_rate"], s["optim.group_lr_range"] = lr, (lr, lr)
  return s


def get_config(arg: str | None = None):
  _, args = parse_arg(arg, flags=("runlocal",))
  c = base_config()
  c.model = "resnet50"
  c.init_from = imagenet_weights("resnet50", "tv_in1k")  # fastai v1's resnet50 is torchvision's
  c.head, c.head_kwargs.hidden, c.head_kwargs.ps = "fastai", 512, 0.5
  c.loss.name = "cross_entropy"
  # fastai v1's Learner: opt_func=partial(Adam, betas=(0.9, 0.99)), wd=1e-2, true_wd=True
  c.optim.name, c.optim.b1, c.optim.b2, c.optim.weight_decay = "adamw", 0.9, 0.99, 1e-2
  c.schedule.name = "one_cycle"  # fit_one_cycle's defaults: pct_start 0.3, div 25, final_div 1e4
  c.optim.param_groups = FASTAI_RESNET_GROUPS
  c.batch_size = c.eval_batch_size = 32
  c.data.source, c.data.eval_split = "covidx", "test"
  # get_transforms(flip_vert=True, max_rotate=15): dihedral, rotate, zoom (p_affine 0.75), lighting
  c.data.train_pp = ("to_rgb|resize({size})|dihedral()|rotate(15, p=0.75)|zoom(1.1, p=0.75)|"
                     "lighting(0.2, p=0.75)|normalize('imagenet')")
  c.data.eval_pp = "to_rgb|resize({size})|normalize('imagenet')"
  c.data.workers = 2
  c.data.phantom.kind = "cxr"
  depart(c, "optim.group_lr_range", "stages 2 and 4 (whole network at 128 / 224 px): the paper gives "
         "no rates ('as before'); stage 5's 1e-6...1e-4 is used")
  depart(c, "optim.b1", "fit_one_cycle cycles Adam's beta1 0.95 -> 0.85 -> 0.95; cxflax's optimizers "
         "take a constant beta1, kept at fastai's default 0.9")
  depart(c, "data.train_pp", "get_transforms' symmetric_warp(0.2) has no op and is left out; the affine "
         "ops resample one after another, with black rather than reflection padding")
  sizes, epochs = (128, 224, 229), (3, 5, 3, 5, 25)
  if arg == "runlocal":
    c.model = "resnet10t"
    c.init_from = ""  # from scratch: no download, and phantom X-rays are no ImageNet
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
