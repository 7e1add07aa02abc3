"""Seed 004 (Diko, COVID-CT): COVID / non-COVID CT slices (UCSD-AI4H COVID-CT) with DenseNet-169,
trained in three phases (Sec. 8 of the report), each a run started from the previous one with
--config.init_from=PREVIOUS_WORKDIR; SGD and cross-entropy unless said otherwise:

  `:finetune`   DenseNet-169 with a 2-way classifier; only denseblock3 onwards (denseblock3,
                transition3, denseblock4, norm5) and the classifier train; learning rate 0.007
                halved every 400 epochs, 3000 epochs, batch 128.
  `:triplet`    the fine-tuned network without its classifier, three linear layers to an
                L2-normalised 512-d embedding, triplet loss with margin 0.5 over the batch's
                triplets; denseblock4, norm5 and the embedding layers train (the report's batch
                of 64 allowed no more); learning rate 0.0005 for 300 epochs.
  `:classify`   one linear layer added on the embedding network ("i added another linear layer
                to the previously trained network"); learning rate 0.0003 for 220 epochs.

The report gives no decay for the last two phases: their rate is constant. Augmentation: random
resized crop to 224, horizontal and vertical flips with p = 0.7, rotation (torchvision's
RandomRotation: nearest neighbour, zero fill) and colour jitter (brightness, contrast);
normalisation by the training split's statistics (the report found them better than ImageNet's).
Evaluated on the official test split: accuracy, F1, AUC.

Departs from the report (config.departures): it names SGD without a momentum; cxflax uses 0.9
(`optim.momentum`). Its triplets are random (or an augmented anchor as positive); we mine them
within each batch, batch-hard (`loss.mining`), which needs no extra pass over the data. It does
not give the widths of its embedding layers: we use 1024, 1024, 512 (`head_kwargs`: hidden, in
the classify phase embedding_hidden). Its
rotation and jitter ranges are not given: we use 15° and 0.2 (`data.train_pp`). In the classify
phase it fine-tunes "some of the bottom layers" (its word, in phase 1, for the layers nearest the
output) besides the new one without naming them: cxflax trains the embedding's linear layers and
the new layer, the backbone frozen (`optim.freeze`), with the triplet phase's batch of 64, the
report giving none (`batch_size`).

`:PHASE,runlocal` shrinks each phase to minutes on 64-px phantom CT slices with densenet121, SGD
at 0.02 for 12 epochs (finetune halves it after 9); its finetune phase trains every layer, as
there are no ImageNet weights to keep. A phantom slice is COVID when lesions cover more than 1%
of its lung (as COVID-CT's COVID slices show visible findings; lesions of a few tenths of a
percent vanish at 64 px), and its random crops keep at least 85% of the slice so that they seldom
cut a lesion away.
"""

from configs.common import depart, imagenet_weights, parse_arg
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
  c.optim.name, c.optim.momentum = "sgd", 0.9
  depart(c, "optim.momentum", "the report names SGD without a momentum (torch's default has none)")
  c.schedule.unit = "epoch"
  c.optim.train_frozen_bn = False
  if phase == "finetune":
    c.head, c.loss.name = "linear", "cross_entropy"
    c.init_from = imagenet_weights("densenet169", "tv_in1k")  # torchvision's, as the report's
    c.optim.learning_rate, c.num_epochs = 0.007, 3000
    c.schedule.name = "step"
    c.schedule.step_decay_epochs, c.schedule.step_decay_factor = 400, 0.5
    c.batch_size = c.eval_batch_size = 128
    c.optim.freeze = ("^backbone/features/(conv0|norm0|denseblock1|transition1|denseblock2|transition2)",)
  elif phase == "triplet":
    # no decay is reported for this phase or the next: a constant rate
    c.optim.learning_rate, c.num_epochs, c.schedule.name = 5e-4, 300, "constant"
    c.head, c.loss.name, c.loss.margin = "embedding", "triplet", 0.5
    c.head_kwargs.hidden, c.head_kwargs.dim = (1024, 1024), 512
    c.batch_size = c.eval_batch_size = 64
    c.optim.freeze = ("^backbone/features/(conv0|norm0|denseblock[123]|transition[123])",)
    depart(c, "loss.mining", "the report's triplets are random (or an augmented anchor as the "
           "positive); cxflax mines them within each batch, which needs no extra pass over the data")
    depart(c, "head_kwargs", "the report does not give the widths of its three embedding layers "
           "(hidden): 1024, 1024, then the 512-d embedding it states")
  else:
    c.optim.learning_rate, c.num_epochs, c.schedule.name = 3e-4, 220, "constant"
    # the embedding network of the triplet phase (same parameter names) and one new linear
    # layer on its 512-d embedding, as the report adds "another linear layer"
    c.head, c.loss.name = "embedding_classifier", "cross_entropy"
    c.head_kwargs.embedding_hidden, c.head_kwargs.embedding_dim = (1024, 1024), 512
    c.head_kwargs.hidden = ()
    depart(c, "head_kwargs", "embedding_hidden: the triplet phase's embedding widths (which the "
           "report does not give), so that its layers load")
    c.batch_size = c.eval_batch_size = 64
    c.optim.freeze = ("^backbone/",)
    depart(c, "optim.freeze", "the report trains the new layer and 'fine tuned some of the bottom "
           "layers' (its word, in phase 1, for the layers nearest the output) without naming them: "
           "cxflax trains the embedding's linear layers with the new one, the backbone frozen")
    depart(c, "batch_size", "the report gives no batch size for this phase: 64, as the triplet phase")
  depart(c, "data.train_pp", "the report names its augmentations but not their ranges: rotation "
         "within 15°, brightness and contrast jitter 0.2")
  if "runlocal" in args:
    c.model = "densenet121"
    c.init_from = ""  # from scratch (the later phases: --config.init_from=PREVIOUS_WORKDIR)
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
