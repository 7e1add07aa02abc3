"""Seed 001 (Miron & Breaban, seeds/001_fb38e3b899fed612.txt): the settings the paper, or the
authors' code as DESIGN.md reads it, states, as the finalized configs/resnest.py config holds
them: {recipe[:argument]: {field path: (value, source)}}. Values are what the recipe holds when
it matches the paper; a recipe that differs lists the path in config.departures."""

_PAPER = "seed 001"
_DESIGN = "DESIGN.md seed 001 row (the authors' code)"

# Every approach shares the training and inference procedure of Sec. 3.1 / 3.2 / 4.1.
_COMMON = {
    "model": ("resnest50d", f"{_PAPER} Sec. 3.1: 'We stick with ResNeSt for final architecture'; Table 1 ResNeSt50"),
    "init_from": ("timm/resnest50d.in1k", f"{_PAPER} Sec. 3.1: networks pretrained on ImageNet (timm's weights)"),
    "optim.name": ("sgd", f"{_PAPER} Sec. 3.1: 'we use SAM + SGD [23] as optimizer'"),
    "optim.sam_rho": (0.05, f"{_DESIGN}: SAM over SGD (rho 0.05)"),
    "optim.momentum": (0.9, f"{_DESIGN}: momentum 0.9"),
    "optim.weight_decay": (5e-3, f"{_DESIGN}: wd 5e-3"),
    "optim.learning_rate": (1e-3, f"{_PAPER} Sec. 3.1: 'The initial learning rate is 1e-3'"),
    "schedule.name": ("warmup_cosine", f"{_PAPER} Sec. 3.1: 'cosine annealing with warm-up [24] as learning rate scheduler'"),
    "num_epochs": (50, f"{_PAPER} Sec. 3.1: 'We train every model for 50 epochs' (Table 1 rows 1-4 used 30)"),
    "data.image_size": (512, f"{_PAPER} Sec. 3.1: 'We do not rescale the input and keep the original size of 512x512'"),
    "data.train_pp": ("to_rgb|resize(512)|rand_augment(2, 9)|flip_lr(0.5)|flip_ud(0.5)|normalize('imagenet')",
                      f"{_PAPER} Sec. 3.1: RandAugment [25] over rotation 0-30, Color, Contrast, Brightness, "
                      f"Sharpness, ShearX/Y, Cutout, TranslateX/Y (N, M not stated: RandAugment's 2, 9); "
                      f"{_DESIGN}: + flips"),
    "data.eval_pp": ("to_rgb|resize(512)|normalize('imagenet')",
                     f"{_PAPER} Sec. 3.1: 512x512 input, no rescaling; no test-time augmentation stated"),
    "num_folds": (5, f"{_PAPER} Sec. 4.1: 'We split the training set into 5 folds'; Sec. 3.2: 'all our 5 folds'"),
    "data.stratify": ("auto", f"{_PAPER} Sec. 4.1: folds 'taking into consideration the distribution of the "
                              f"labels Normal, Minimal, Moderate, Extent, Severe, and Critical' (auto = severity)"),
    "round_predictions": (True, f"{_PAPER} Sec. 3.2: 'the output is always rounded to the closest integer'"),
    "predict.round": (True, f"{_PAPER} Sec. 3.2: outputs rounded; 'compute the mean of the predictions and "
                            f"round it to the closest integer'"),
    "predict.last_n": (5, f"{_PAPER} Sec. 3.2: 'we use the checkpoints from the last 5 epochs at inference time'"),
    "keep_checkpoints": (5, f"{_PAPER} Sec. 3.2: the last 5 epochs' checkpoints must be kept"),
    "loss.beta": (1.0, f"{_PAPER} Sec. 3: 'the smooth L1 loss, with parameter beta = 1'"),
}

SETTINGS = {
    "resnest.py": {
        **_COMMON,
        "head": ("linear", f"{_PAPER} Sec. 3: 'The first approach just adds a linear layer ... which outputs a single number'"),
        "pool": ("avg", f"{_PAPER} Sec. 3: the feature extractor's global average pooling (hybrid pooling replaces it later)"),
        "loss.name": ("smooth_l1", f"{_PAPER} Sec. 3: 'For this approach we used the smooth L1 loss'"),
    },
    "resnest.py:multitask": {
        **_COMMON,
        "head": ("multitask", f"{_PAPER} Sec. 3: second approach, a 101-way softmax layer and a 101 -> 1 layer"),
        "pool": ("hybrid", f"{_PAPER} Sec. 3: 'we replace its global average pooling with a hybrid pooling'; "
                           f"Table 1 model (7)"),
        "loss.name": ("multitask", f"{_PAPER} Sec. 3, Eq. 1 and 2: 'the sum of two losses'"),
    },
    "resnest.py:kl": {
        **_COMMON,
        "head": ("multitask", f"{_PAPER} Sec. 3: third approach, the second approach's layers"),
        "pool": ("hybrid", f"{_PAPER} Sec. 3; Table 1 model (13), 3 tasks with hybrid pooling"),
        "loss.name": ("multitask_kl", f"{_PAPER} Sec. 3, Eq. 3: KL divergence to the label distribution, "
                                      f"'The final loss will be the sum of the three losses'"),
        "loss.kl_weight": (1.0, f"{_PAPER} Sec. 3: 'the sum of the three losses' (unweighted)"),
    },
}
