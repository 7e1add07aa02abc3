"""Seed 004 (Diko, COVID-CT report; seeds/004_*.txt): the settings the report states, per phase of
configs/densenet_ct.py, as the finalized config holds them when the recipe follows the report.
No code of the author's is public; where the report is silent (momentum, augmentation ranges,
the classify phase's batch and trained layers) nothing is listed here and the recipe names its
choice in config.departures; the embedding widths, which it does not give either, sit inside
head_kwargs with the 512-d embedding it does give."""

_SEC8 = "Sec. 8 Training"
_MODEL = ("densenet169", "Sec. 6 'in the end the chosen architecture was DenseNet169'")
_SGD = ("sgd", f"{_SEC8}: 'The optimizer i used was Stochastic Gradient Descent (SGD)'; phase 2 'SGD as "
               "optimizer'; phase 3 'The optimizer again was SGD'")

SETTINGS = {
    "densenet_ct.py:finetune": {
        "model": _MODEL,
        "init_from": ("timm/densenet169.tv_in1k", f"{_SEC8}: DenseNet169 pretrained on ImageNet (torchvision's)"),
        "head": ("linear", f"{_SEC8}, first subphase: DenseNet169 fine-tuned with its (linear) classifier"),
        "optim.name": _SGD,
        "optim.learning_rate": (0.007, f"{_SEC8}, first subphase: 'The starting learning rate was 0.007'"),
        "schedule.name": ("step", f"{_SEC8}, first subphase: 'multiplied by 0.5 every 400 epochs'"),
        "schedule.unit": ("epoch", f"{_SEC8}, first subphase: 'every 400 epochs'"),
        "schedule.step_decay_epochs": (400, f"{_SEC8}, first subphase: 'every 400 epochs'"),
        "schedule.step_decay_factor": (0.5, f"{_SEC8}, first subphase: 'multiplied by 0.5'"),
        "num_epochs": (3000, f"{_SEC8}, first subphase: 'The total number of epochs were 3000'"),
        "batch_size": (128, f"{_SEC8}, first subphase: 'with a batch size of 128'"),
        "loss.name": ("cross_entropy", f"{_SEC8}, first subphase: 'The loss function was CrossEntropy'"),
        "optim.freeze": (("^backbone/features/(conv0|norm0|denseblock1|transition1|denseblock2|transition2)",),
                         f"{_SEC8}, first subphase: 'in total i fine tuned the classifier part, denseblock4 "
                         "and denseblock3'"),
    },
    "densenet_ct.py:triplet": {
        "model": _MODEL,
        "head": ("embedding", f"{_SEC8}, second phase: 'removed the classifier ... added 3 linear layers ... "
                              "embeddings (l2 normalized) of length 512'"),
        "head_kwargs": ({"hidden": (1024, 1024), "dim": 512},
                        f"{_SEC8}, second phase: '3 linear layers ... embeddings (l2 normalized) of length "
                        "512'; the widths before the 512 are not given (a listed departure)"),
        "optim.name": _SGD,
        "optim.learning_rate": (5e-4, f"{_SEC8}, second phase: 'trained for 300 epoch with learning rate 0.0005'"),
        "schedule.name": ("constant", f"{_SEC8}, second phase: one learning rate, no decay given"),
        "num_epochs": (300, f"{_SEC8}, second phase: 'trained for 300 epoch'"),
        "batch_size": (64, f"{_SEC8}, second phase: 'only with denseblock4 i could go up to 64 images per batch'"),
        "loss.name": ("triplet", f"{_SEC8}, second phase: 'The loss function used was triplet loss'"),
        "loss.margin": (0.5, f"{_SEC8}, second phase: 'The used margin for the triplet loss was 0.5'"),
        "optim.freeze": (("^backbone/features/(conv0|norm0|denseblock[123]|transition[123])",),
                         f"{_SEC8}, second phase: batch 64 'only with denseblock4' fine-tuned (besides the "
                         "new embedding layers)"),
    },
    "densenet_ct.py:classify": {
        "model": _MODEL,
        "head": ("embedding_classifier", f"{_SEC8}, third phase: 'i added another linear layer to the previously "
                                         "trained network'"),
        "head_kwargs": ({"hidden": (), "embedding_hidden": (1024, 1024), "embedding_dim": 512},
                        f"{_SEC8}, third phase: one linear layer (hidden=()) on the second phase's 512-d "
                        "embedding, whose widths are the recipe's (a listed departure)"),
        "optim.name": _SGD,
        "optim.learning_rate": (3e-4, f"{_SEC8}, third phase: '220 epochs and learning rate of 0.0003'"),
        "schedule.name": ("constant", f"{_SEC8}, third phase: one learning rate, no decay given"),
        "num_epochs": (220, f"{_SEC8}, third phase: '220 epochs'"),
        "loss.name": ("cross_entropy", f"{_SEC8}, third phase: 'CrossEntropy as a criterion'"),
    },
}
