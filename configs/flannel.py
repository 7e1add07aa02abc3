"""Seed 003 (FLANNEL: focal-loss neural-network ensemble): 4-class chest X-ray classification
(COVID-19, viral, bacterial, normal) on covid-chestxray-dataset + Kaggle chest_xray.

Base learners (`--config=configs/flannel.py:MODEL`, MODEL one of densenet161, inception_v3,
resnet152, resnext101_32x8d, vgg19_bn), as in the authors' ensemble_step1.py: ImageNet backbone
with a new 4-way classifier, cross-entropy, Adam (learning rate 1e-3, weight decay 1e-4), batch
10, 200 epochs with the rate divided by 10 at epoch 150, images resized to 336 then randomly
cropped to 224 with horizontal flips; 5 subject-grouped folds stratified by class.

Ensemble stage (`--mode=ensemble --config=configs/flannel.py:ensemble` with
`--config.ensemble.members=(DIR1,...,DIR5)`): the five learners frozen, their class
probabilities (B, 20) turned into weights by the neural weight module (outer product → Linear
400 → 5 → tanh), Σ w_i p_i trained with focal loss (γ = 10 as in the reference, α = inverse class
frequency).

Departs from the paper: the learning-rate drop is expressed as a step schedule at 150 epochs;
focal loss is averaged over the batch (the reference sums it, which only rescales the rate).
`:runlocal` uses resnet10t learners on 64-px phantom X-rays (`:runlocal` or `:ensemble,runlocal`).
"""

from configs.common import parse_arg
from cxflax.config import base_config

LEARNERS = ("densenet161", "inception_v3", "resnet152", "resnext101_32x8d", "vgg19_bn")
MODELS = LEARNERS + ("resnet10t", "resnet18")  # the small ones for :runlocal and tests
FLAGS = ("ensemble", "softmax", "runlocal")


def get_config(arg: str | None = None):
  model, flags = parse_arg(arg, flags=FLAGS, choices=MODELS, default="densenet161")
  c = base_config()
  c.model = model
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
  c.data.train_pp = "to_rgb|resize(336)|random_resized_crop({size}, scale=(0.44, 0.44), ratio=(1, 1))|flip_lr(0.5)|normalize('imagenet')"
  c.data.eval_pp = "to_rgb|resize(336)|center_crop({size})|normalize('imagenet')"
  c.data.phantom.kind = "cxr"
  c.data.workers = 2
  if "ensemble" in flags:
    c.ensemble.kind, c.ensemble.activation = "flannel", "softmax" if "softmax" in flags else "tanh"
    c.loss.name, c.loss.gamma = "focal", 10.0
    c.optim.freeze, c.optim.train_frozen_bn = ("^members_",), False
    c.schedule.name, c.num_epochs = "constant", 30
  if "runlocal" in flags:
    c.model = c.model if c.model in ("resnet10t", "resnet18") else "resnet10t"
    c.data.source, c.data.image_size = "phantom", 64
    c.data.phantom.num_subjects, c.data.phantom.slices_per_subject = 240, (1, 1)
    c.data.train_pp = "to_rgb|resize(72)|random_resized_crop({size}, scale=(0.8, 0.8), ratio=(1, 1))|flip_lr(0.5)|normalize('imagenet')"
    c.data.eval_pp = "to_rgb|resize(72)|center_crop({size})|normalize('imagenet')"
    c.data.workers = 0
    c.batch_size = c.eval_batch_size = 32
    c.num_epochs, c.schedule.step_decay_epochs = 8, 6
    c.log_every_steps = 10
    c.keep_checkpoints = 2
    if "ensemble" in flags:
      c.num_epochs, c.optim.learning_rate = 4, 1e-2
  return c
