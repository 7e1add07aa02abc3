"""Seed 000 (Anwar, SEnsembleNet): infection percentage regression with six timm backbones and a
squeeze-and-excitation ensemble of them.

Members (`--config=configs/sensemble.py:MODEL`, MODEL one of resnest50d, resnetrs50,
seresnext50_32x4d, ecaresnet50t, skresnext50_32x4d, seresnet50), as in Sec. 2.2–2.6 and the
authors' code: timm's network with its 1000-way ImageNet classifier kept, then 500 → 250 → 1
linear layers with ReLU; SmoothL1 (β = 1); AdamW, learning rate 1e-3 (torch's default weight
decay 0.01); cosine annealing (T_max = 10 epochs, η_min = 1e-6, stepped per epoch, so the rate
rises again after each 10 epochs), or warm restarts with `:MODEL,warm` (T_0 = 10); 50 epochs;
batch 72 (48 for skresnext50_32x4d) with gradients accumulated over 4 batches, each epoch ending
with an update of the batches left over as in the authors' Lightning loop (the schedule counts
updates, so its periods stay in epochs); resize to image size + 32 → centre crop (256 → 224 at
the paper's 224; `--config.data.image_size=128` gives 160 → 128), horizontal flip,
shift-scale-rotate (±6.25 %, ±10 %, ±30°, p = 0.5, borders reflected as albumentations' default);
5 folds of scikit-learn's GroupKFold by subject, unshuffled as in the authors' code (config.seed
does not change them).

Ensemble stage (`--mode=ensemble --config=configs/sensemble.py:ensemble` or `:ensemble,average`
with `--config.ensemble.members=(DIR1,DIR2,...)`, the members' workdirs of one fold): the members
are frozen, their 1000-d outputs stacked, weighted per member by the SE block (Linear 6→3 → ReLU →
Linear 3→6 → sigmoid) or not ('average'), averaged over members, and fed to a new 500 → 250 → 1
head trained like a member (batch 224).

Members start from timm's ImageNet weights as the authors' timm.create_model(pretrained=True)
does (config.init_from='timm/resnest50d.in1k' and the like, fetched into the Hugging Face cache on
first use); predict clips negative predictions at 0 as the authors' code does
(config.predict.clip_min=0).

Departs from the paper and the authors' code: `steps_per_epoch` — each epoch's last partial
batch is dropped (the authors' DataLoader keeps it, drop_last=False), so that every train step
has one shape; `data.eval_pp` — evaluation is the deterministic resize and centre crop (the authors'
validation and test loaders reuse the training augmentation); `dtype` — bfloat16 on GPUs ('auto')
rather than the authors' float16, float32 on CPU. Members also run in inference mode
inside the ensemble (the authors' frozen members kept updating their BatchNorm statistics, an
artefact of training them inside a module in training mode). In the epoch's last, shorter
accumulation the gradient is the mean over its batches, where Lightning divides their sum by 4.
`:runlocal` (with a member or `ensemble`) shrinks everything to 64-px phantom slices.
"""

from configs.common import depart, imagenet_weights, parse_arg
from cxflax.config import base_config

MEMBERS = ("resnest50d", "resnetrs50", "seresnext50_32x4d", "ecaresnet50t", "skresnext50_32x4d", "seresnet50")
# timm.create_model(name, pretrained=True) in early 2021: timm's default ImageNet weights then
# (seresnet50's were ra2; today's default is a1).
WEIGHT_TAGS = {"resnest50d": "in1k", "resnetrs50": "tf_in1k", "seresnext50_32x4d": "racm_in1k",
               "ecaresnet50t": "ra2_in1k", "skresnext50_32x4d": "ra_in1k", "seresnet50": "ra2_in1k"}


def get_config(arg: str | None = None):
  model, flags = parse_arg(arg, flags=("ensemble", "average", "warm", "runlocal"),
                           choices=MEMBERS + ("resnest14d", "resnet10t"), default="resnest50d")
  c = base_config()
  c.model = model
  c.init_from = imagenet_weights(model, WEIGHT_TAGS[model]) if model in WEIGHT_TAGS else ""
  c.backbone_classes = 1000
  c.head, c.head_kwargs.hidden = "mlp", (500, 250)
  c.loss.name, c.loss.beta = "smooth_l1", 1.0
  c.optim.name, c.optim.learning_rate, c.optim.weight_decay = "adamw", 1e-3, 0.01
  c.schedule.name, c.schedule.unit = "cosine", "epoch"
  c.schedule.period_epochs, c.schedule.min_learning_rate = 10, 1e-6
  if "warm" in flags:
    c.schedule.name = "cosine_restarts"
  c.num_epochs = 50
  c.batch_size = c.eval_batch_size = 48 if c.model == "skresnext50_32x4d" else 72
  c.optim.grad_accum_steps = 4
  c.num_folds, c.data.stratify = 5, "none"
  c.data.image_size = 224
  # The authors resize to image size + 32 before the centre crop (256 → 224), whatever the size.
  c.data.train_pp = ("to_rgb|resize({size+32})|center_crop({size})|flip_lr(0.5)|"
                     "shift_scale_rotate(0.0625, 0.1, 30, p=0.5)|normalize('imagenet')")
  c.data.eval_pp = "to_rgb|resize({size+32})|center_crop({size})|normalize('imagenet')"
  c.data.workers = 2
  c.predict.clip_min = 0.0  # the authors' train.py: pred = np.where(pred < 0, 0, pred)
  # Named by describe's steps_per_epoch (batches per epoch: floor here, ceil for the authors), not
  # by batch_size, whose value does follow the paper.
  depart(c, "steps_per_epoch", "each epoch's last partial batch is dropped (the authors' DataLoader "
         "keeps it, drop_last=False) so that every train step has one shape and splits over the devices")
  depart(c, "data.eval_pp", "evaluation is the deterministic resize and centre crop; the authors' "
         "validation and test loaders reuse the training augmentation (flip, shift-scale-rotate)")
  depart(c, "dtype", "'auto': bfloat16 on GPUs rather than the authors' float16 mixed precision "
         "(Lightning precision=16; bfloat16 needs no loss scaling), float32 on CPU")
  if "ensemble" in flags or "average" in flags:
    c.ensemble.kind = "average" if "average" in flags else "se"
    c.init_from = ""  # the members bring their trained weights
    c.ensemble.head_hidden = (500, 250)
    c.optim.freeze = ("^backbone/members_",)
    c.optim.train_frozen_bn = False
    c.batch_size = c.eval_batch_size = 224
  if "runlocal" in flags:
    c.model = c.model if c.model in ("resnest14d", "resnet10t") else "resnest14d"
    c.init_from = ""  # from scratch: no download, and phantom slices are no ImageNet
    c.data.image_size = 64
    c.data.workers = 0
    c.data.phantom.num_subjects = 100
    c.batch_size = c.eval_batch_size = 32
    c.optim.grad_accum_steps = 1
    c.num_epochs, c.schedule.period_epochs = 12, 12
    c.log_every_steps = 10
    c.keep_checkpoints = 2
  return c
