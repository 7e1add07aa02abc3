"""Seed 003 (Patched FLANNEL): FLANNEL's ensemble (configs/flannel.py) over patch-based base
learners (Sec. "Patch-based classifiers", after Oh, Park & Ye). Each learner sees the X-ray
resized to 1024×1024 and multiplied by its lung mask (from configs/lung_seg.py); it trains on
one random 224-px patch per image per step, centred inside the lungs, and at inference
classifies K = 100 such patches at once, the image's class scores being the fraction of patch
votes per class (majority vote). Adam at 1e-5 with weight decay, 200 epochs; ImageNet
backbones.

  base learner:    --config=configs/patched_flannel.py:MODEL   (densenet161, inception_v3,
                   resnet152, resnext101_32x8d, vgg19_bn)
  ensemble stage:  --mode=ensemble --config=configs/patched_flannel.py:ensemble
                   --config.ensemble.members=(DIR1,...,DIR5)  (focal loss, neural weights)

Real data: the flannel layout plus a folder of lung masks, one PNG per image
(`--config.data.mask_dir=LUNG_SEG_WORKDIR/masks`, written by lung_seg's --mode=predict).

Departs from the report: its L1 regularisation is left out (weight decay kept, 1e-4 as FLANNEL's
learners; the report gives neither value); it selects the best of 200 epochs by validation
(early stopping), cxflax keeps the last checkpoints. Patch votes are aggregated on the device in
one pass instead of one pass per patch. `:runlocal` uses resnet10t learners on 96-px phantom
X-rays (whose lung masks are known) with 48-px patches and K = 10.
"""

from configs import flannel
from configs.common import parse_arg

PP = "to_rgb|resize({size})|mask_image('lung_mask')|normalize('imagenet')|append_mask('lung_mask')"


def get_config(arg: str | None = None):
  c = flannel.get_config(arg)
  _, args = parse_arg(arg, flags=flannel.FLAGS, choices=flannel.MODELS)
  c.data.image_size = 1024
  c.data.train_pp = "flip_lr(0.5)|" + PP
  c.data.eval_pp = PP
  if "ensemble" not in args:
    c.patches.num, c.patches.size, c.patches.aggregate = 100, 224, "vote"
    c.optim.learning_rate, c.optim.weight_decay = 1e-5, 1e-4
    c.schedule.name, c.num_epochs = "constant", 200
  if "runlocal" in args:
    c.data.image_size = 96
    c.data.phantom.num_subjects = 240
    if "ensemble" not in args:
      c.patches.num, c.patches.size = 10, 48
      c.optim.learning_rate, c.num_epochs = 2e-3, 10
  return c
