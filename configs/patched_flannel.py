"""Seed 003 (Patched FLANNEL): FLANNEL's ensemble (configs/flannel.py) over patch-based base
learners (Sec. "Patch-based classifiers", after Oh, Park & Ye). Each learner sees the X-ray
resized to 1024×1024 and multiplied by its lung mask (from configs/lung_seg.py); it trains on
one random 224-px patch per image per step, centred inside the lungs, and at inference
classifies K = 100 such patches at once, the image's class scores being the fraction of patch
votes per class (majority vote). Adam at 1e-5 with weight decay 1e-4, batch 10, 200 epochs at a
constant rate; ImageNet backbones. The ensemble stage is FLANNEL's (Adam 1e-5, weight decay
1e-4, batch 20, 40 epochs), as in the authors' copy of ensemble_step2_ensemble_learning.py,
with FLANNEL's departure (`loss.name`: focal loss averaged over the batch, not summed).

  base learner:    --config=configs/patched_flannel.py:MODEL   (densenet161, inception_v3,
                   resnet152, resnext101_32x8d, vgg19_bn)
  ensemble stage:  --mode=ensemble --config=configs/patched_flannel.py:ensemble
                   --config.ensemble.members=(DIR1,...,DIR5)  (focal loss, neural weights)

Real data: the flannel layout plus a folder of lung masks, one PNG per image
(`--config.data.mask_dir=LUNG_SEG_WORKDIR/masks`, written by lung_seg's --mode=predict).

Departs from the report (config.departures): it uses weight decay and L1 regularisation without
giving values — the authors' classification/train.py has Adam's weight_decay=0.1 and a
1e-5·Σ|w| term — cxflax keeps FLANNEL's 1e-4 and no L1 term (`optim.weight_decay`). The
authors' loader feeds each patch unnormalised in [0, 1], flipped and rotated by up to 5°;
cxflax normalises by ImageNet's statistics, flips the whole image and does not rotate
(`data.train_pp`). The report selects the best of 200 epochs by validation (early stopping),
cxflax keeps the last 3 checkpoints (`keep_checkpoints`). Patch votes are aggregated on the device
in one pass instead of one pass per patch (`patches.aggregate`). `:runlocal` uses resnet10t learners on 96-px phantom X-rays (whose lung
masks are known) with 48-px patches and K = 10.
"""

from configs import flannel
from configs.common import depart, parse_arg

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
    depart(c, "optim.weight_decay", "the report gives no value; the authors' train.py: Adam "
           "weight_decay=0.1 plus an L1 term 1e-5·Σ|w|, which cxflax has no loss for: FLANNEL's 1e-4")
    depart(c, "data.train_pp", "the authors' loader feeds patches unnormalised and rotates them by "
           "up to 5°: cxflax normalises by ImageNet's statistics and does not rotate")
  if "runlocal" in args:
    c.data.image_size = 96
    c.data.phantom.num_subjects = 240
    if "ensemble" not in args:
      c.patches.num, c.patches.size = 10, 48
      c.optim.learning_rate, c.num_epochs = 2e-3, 10
  return c
