"""Seed 003 (FLANNEL: focal-loss neural-network ensemble): 4-class chest X-ray classification
(COVID-19, viral, bacterial, normal) on covid-chestxray-dataset + Kaggle chest_xray.

Base learners (`--config=configs/flannel.py:MODEL`, MODEL one of densenet161, inception_v3,
resnet152, resnext101_32x8d, vgg19_bn), as in the authors' ensemble_step1.py: ImageNet backbone
with a new 4-way classifier, cross-entropy, Adam (learning rate 1e-3, weight decay 1e-4), batch
10, 200 epochs with the rate divided by 10 at epoch 150 (its schedule [150, 225]); 5
subject-grouped folds stratified by class. Preprocessing as the authors' data/base_dataset.py
get_transform on X-rays read as grey ('L'): resized to 336×336 (bicubic), a random 224 crop and a horizontal flip (p 0.5) for
training, the central 224 crop for evaluation, then Normalize(0.5, 0.5) — mean 0.5 / std 0.5,
which is also what (timm's port of) the Inception-v3 weights expect. The learners keep
torchvision's classifier dropouts that the authors' new last layer sits behind: vgg19_bn's two
Dropout(0.5) (`drop_rate` in VGG's pre-logits and `head_dropout`), inception_v3's one
(`head_dropout`).

Ensemble stage (`--mode=ensemble --config=configs/flannel.py:ensemble` with
`--config.ensemble.members=(DIR1,...,DIR5)`), as in the authors'
ensemble_step2_ensemble_learning.py: the five learners frozen, their class probabilities (B, 20)
turned into weights by the neural weight module (outer product → Linear 400 → 5 → tanh), Σ w_i p_i
trained with focal loss (γ = 10 as in the reference, α = inverse class frequency: `loss.alpha`
empty); Adam at 1e-5 with weight decay 1e-4, batch 20, 40 epochs at a constant rate (its
schedule [50, 225] is never reached in 40 epochs).

Departs from the paper: the authors' milestones [150, 225]
become a step schedule dividing the rate by 10 every 150 epochs (`schedule.step_decay_epochs`),
the same single drop within 200 epochs; focal loss is averaged over the batch (`loss.name`; the reference
sums it, which only rescales the rate).
`:runlocal` uses resnet10t learners on 64-px phantom X-rays (`:runlocal` or `:ensemble,runlocal`),
resized to 72 before the 64-px crop.
"""

from configs.common import depart, imagenet_weights, parse_arg
from cxflax.config import base_config

LEARNERS = ("densenet161", "inception_v3", "resnet152", "resnext101_32x8d", "vgg19_bn")
MODELS = LEARNERS + ("resnet10t", "resnet18")  # the small ones for :runlocal and tests
FLAGS = ("ensemble", "softmax", "runlocal")


def get_config(arg: str | None = None):
  model, flags = parse_arg(arg, flags=FLAGS, choices=MODELS, default="densenet161")
  c = base_config()
  c.model = model
  c.init_from = imagenet_weights(model, "tv_in1k") if model in LEARNERS else ""  # the authors' torchvision models
  c.head = "linear"
  c.loss.name = "cross_entropy"
  c.optim.name, c.optim.learning_rate, c.optim.weight_decay = "adam", 1e-3, 1e-4
  c.schedule.name, c.schedule.unit = "step", "epoch"
  c.schedule.step_decay_epochs, c.schedule.step_decay_factor = 150, 0.1
  c.num_epochs = 200
  c.batch_size = c.eval_batch_size = 10
  c.num_folds = 5
  c.data.source = "flannel"
  c.data.image_size = 224
  # grey ('L') as the authors read every X-ray, three equal channels only for the backbone
  c.data.train_pp = ("to_gray|resize(336, interpolation='bicubic')|random_crop({size})|flip_lr(0.5)|"
                     "to_rgb|normalize('inception')")
  c.data.eval_pp = "to_gray|resize(336, interpolation='bicubic')|center_crop({size})|to_rgb|normalize('inception')"
  c.data.phantom.kind = "cxr"
  c.data.workers = 2
  if "ensemble" in flags:
    c.ensemble.kind, c.ensemble.activation = "flannel", "softmax" if "softmax" in flags else "tanh"
    c.init_from = ""  # the members bring their trained weights
    c.loss.name, c.loss.gamma = "focal", 10.0
    depart(c, "loss.name", "focal loss averaged over the batch; the reference sums it, which only "
           "rescales the rate")
    c.optim.freeze, c.optim.train_frozen_bn = ("^members_",), False
    c.optim.learning_rate = 1e-5  # weight decay 1e-4, as the learners'
    c.schedule.name, c.num_epochs = "constant", 40
    c.batch_size = c.eval_batch_size = 20
  if "runlocal" in flags:
    c.model = c.model if c.model in ("resnet10t", "resnet18") else "resnet10t"
    c.init_from = ""  # from scratch: no download, and phantom X-rays are no ImageNet
    c.data.source, c.data.image_size = "phantom", 64
    c.data.phantom.num_subjects, c.data.phantom.slices_per_subject = 240, (1, 1)
    c.data.train_pp = ("to_gray|resize(72, interpolation='bicubic')|random_crop({size})|flip_lr(0.5)|"
                       "to_rgb|normalize('inception')")
    c.data.eval_pp = "to_gray|resize(72, interpolation='bicubic')|center_crop({size})|to_rgb|normalize('inception')"
    c.data.workers = 0
    c.batch_size = c.eval_batch_size = 32
    # 12 epochs (÷10 after 9): with the authors' crop and normalisation, 8 ended at chance
    c.num_epochs, c.schedule.step_decay_epochs = 12, 9
    c.log_every_steps = 10
    c.keep_checkpoints = 2
    if "ensemble" in flags:
      c.num_epochs, c.optim.learning_rate = 4, 1e-2
  # after :runlocal's substitution, so that resnet10t standing in for vgg19_bn gets none
  if c.model == "vgg19_bn":  # classifier: fc → ReLU → Dropout(0.5) → fc → ReLU → Dropout(0.5) → new fc
    c.drop_rate, c.head_dropout = 0.5, 0.5
  elif c.model == "inception_v3":  # torchvision's Inception3: Dropout(0.5) before its fc
    c.head_dropout = 0.5
  return c
