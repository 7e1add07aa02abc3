"""Seed 004 (Diko, COVID-CT): COVID / non-COVID CT slices (UCSD-AI4H COVID-CT) with DenseNet-169,
trained in three phases (Sec. 8 of the report), each a run started from the previous one with
--config.init_from=PREVIOUS_WORKDIR:

  `:finetune`   DenseNet-169 with a 2-way classifier; only denseblock3, denseblock4 and the
                classifier train; SGD (momentum 0.9) at 0.007 halved every 400 epochs, 3000
                epochs, batch 128, cross-entropy.
  `:triplet`    the fine-tuned network without its classifier, three linear layers to an
                L2-normalised 512-d embedding, triplet loss (margin 1) over the batch's
                triplets; denseblock4 and the embedding layers train; batch 64.
  `:classify`   classification layers on the frozen embedding network.

Augmentation: random resized crop to 224, horizontal and vertical flips with p = 0.7, rotation
(torchvision's RandomRotation: nearest neighbour, zero fill) and colour jitter (brightness,
contrast); normalisation by the training split's statistics (the report found them better than
ImageNet's). Evaluated on the official test split: accuracy, F1, AUC.

Departs from the report: its triplets are random (or an augmented anchor as positive); we mine
them within each batch (batch-hard), which needs no extra pass over the data. The report does
not give the widths of its embedding layers: we use 1024, 1024, 512. Its rotation range is not
given: we use 15°. `:PHASE,runlocal` shrinks each phase to minutes on 64-px phantom CT slices
with densenet121, SGD at 0.02 halved after 9 of 12 epochs; its finetune phase trains every layer,
as there are no ImageNet weights to keep. A phantom slice is COVID when lesions cover more than
1% of its lung (as COVID-CT's COVID slices show visible findings; lesions of a few tenths of a
percent vanish at 64 px), and its random crops keep at least 85% of the slice so that they seldom
cut a lesion away.
"""

from configs.common import parse_arg
from cxflax.config import base_config

PHASES = ("finetune", "triplet", "classify")


def get_config(arg: str | None = None):
  phase, args = parse_arg(arg, flags=("runlocal",), choices=PHASES, default="finetune")
  c = base_config()
  c.model = "densenet169"
  c.data.source, c.data.eval_split = "covid_ct", "test"
  c.data.image_size = 224
  c.data.train_pp = ("to_rgb|random_resized_crop({size})|flip_lr(0.7)|flip_ud(0.7)|"
                     "rotate(15, interpolation='nearest')|color_jitter(0.2, 0.2, 0.0)|normalize('dataset')")
  c.data.eval_pp = "to_rgb|resize(256)|center_crop({size})|normalize('dataset')"
  c.data.workers = 2
  c.optim.name, c.optim.momentum, c.optim.learning_rate = "sgd", 0.9, 0.007
  c.schedule.name, c.schedule.unit = "step", "epoch"
  c.schedule.step_decay_epochs, c.schedule.step_decay_factor = 400, 0.5
  c.num_epochs = 3000
  c.optim.train_frozen_bn = False
  if phase == "finetune":
    c.head, c.loss.name = "linear", "cross_entropy"
    c.batch_size = c.eval_batch_size = 128
    c.optim.freeze = ("^backbone/features/(conv0|norm0|denseblock1|transition1|denseblock2|transition2)",)
  elif phase == "triplet":
    c.head, c.loss.name, c.loss.margin = "embedding", "triplet", 1.0
    c.head_kwargs.hidden, c.head_kwargs.dim = (1024, 1024), 512
    c.batch_size = c.eval_batch_size = 64
    c.optim.freeze = ("^backbone/features/(conv0|norm0|denseblock[123]|transition[123])",)
  else:
    c.head, c.loss.name = "embedding_classifier", "cross_entropy"
    c.head_kwargs.embedding_hidden, c.head_kwargs.embedding_dim = (1024, 1024), 512
    c.head_kwargs.hidden = (256,)
    c.batch_size = c.eval_batch_size = 64
    c.optim.freeze = ("^backbone/", "^head/fc")
  if "runlocal" in args:
    c.model = "densenet121"
    c.data.source, c.data.eval_split = "phantom", "fold"
    c.data.phantom.kind, c.data.phantom.num_subjects, c.data.phantom.covid_labels = "ct", 150, True
    c.data.phantom.covid_min_percentage = 1.0
    c.data.image_size = 64
    c.data.train_pp = ("to_rgb|random_resized_crop({size}, scale=(0.85, 1.0))|flip_lr(0.7)|flip_ud(0.7)|"
                       "rotate(15, interpolation='nearest')|color_jitter(0.2, 0.2, 0.0)|normalize('dataset')")
    c.data.eval_pp = "to_rgb|resize({size})|normalize('dataset')"
    c.data.workers = 0
    c.data.stats_images = 64
    c.batch_size = c.eval_batch_size = 32
    c.num_epochs, c.schedule.step_decay_epochs = 12, 9
    c.optim.learning_rate = 0.02
    if phase == "finetune":  # no ImageNet weights here: the early blocks must learn too
      c.optim.freeze = ()
    c.log_every_steps = 10
    c.keep_checkpoints = 2
  return c
