"""Seed 000 (Anwar, SEnsembleNet): the settings the paper (seeds/000_*.txt) and the authors' code
(github.com/talhaanwarch/Covid-Infection-Estimation, train.py and ensemble.py at 5670d4c) state,
as the finalized config holds them when the recipe (configs/sensemble.py) follows them.
tests/test_paper_settings.py holds them against `--mode=describe`."""

_TRAIN = "authors' train.py"
_ENSEMBLE = "authors' ensemble.py"

# The authors' augmentation(img_size=224): A.Resize(img_size+32, img_size+32), A.CenterCrop(img_size,
# img_size), A.HorizontalFlip(0.5), A.ShiftScaleRotate(rotate_limit=30) (its defaults: shift 0.0625,
# scale 0.1, p=0.5, border reflect-101), A.Normalize() (ImageNet mean and std); images read with
# cv2 and turned BGR → RGB.
_TRAIN_PP = ("to_rgb|resize(256)|center_crop(224)|flip_lr(0.5)|shift_scale_rotate(0.0625, 0.1, 30, p=0.5)|"
             "normalize('imagenet')")

# What every member and both ensemble heads share.
_COMMON = {
    "optim.name": ("adamw", "Sec. 2.2 'We used AdamW optimizer'; configure_optimizers: torch.optim.AdamW"),
    "optim.learning_rate": (1e-3, "Sec. 2.2 'with a learning rate of 1e-3'; self.lr=1e-3"),
    "optim.weight_decay": (0.01, f"{_TRAIN}: torch.optim.AdamW(params, lr) with torch's default weight_decay=0.01"),
    "optim.b1": (0.9, f"{_TRAIN}: torch.optim.AdamW default betas=(0.9, 0.999)"),
    "optim.b2": (0.999, f"{_TRAIN}: torch.optim.AdamW default betas=(0.9, 0.999)"),
    "optim.eps": (1e-8, f"{_TRAIN}: torch.optim.AdamW default eps=1e-8"),
    "optim.grad_accum_steps": (4, f"{_TRAIN} / {_ENSEMBLE}: Trainer(accumulate_grad_batches=4)"),
    "schedule.name": ("cosine", "Sec. 2.4 cosine annealing; CosineAnnealingLR(opt, T_max=10, eta_min=1e-6)"),
    "schedule.unit": ("epoch", "Lightning steps a scheduler returned as {'lr_scheduler': scheduler} once per epoch"),
    "schedule.period_epochs": (10.0, f"{_TRAIN}: CosineAnnealingLR(T_max=10), stepped per epoch"),
    "schedule.min_learning_rate": (1e-6, f"{_TRAIN}: CosineAnnealingLR(eta_min=1e-6)"),
    "num_epochs": (50, f"{_TRAIN} / {_ENSEMBLE}: Trainer(max_epochs=50)"),
    "loss.name": ("smooth_l1", "Sec. 2.5 'Smooth L1 loss is used'; nn.SmoothL1Loss()"),
    "loss.beta": (1.0, "Sec. 2.5 'The value of beta is set to 1'"),
    "num_folds": (5, "Sec. 2.6 'Five fold cross-validation'; GroupKFold(n_splits=5)"),
    "data.stratify": ("none", "Sec. 2.6 'Group K fold cross-validation where the group is the subject ID'; "
                              "GroupKFold(n_splits=5).split(df, groups=df.subject), not stratified"),
    "data.image_size": (224, "Sec. 2.3 'center cropped to 224x224'; model_dict img_size 224"),
    "data.train_pp": (_TRAIN_PP, "Sec. 2.3 'resized to 256x256 and then center cropped to 224x224 ... random "
                                 "horizontal flipping and shift scale rotation'; augmentation(img_size)"),
    "data.eval_pp": (_TRAIN_PP, f"{_TRAIN}: val_dataloader and test_dataloader read DataReader(split, aug), "
                                "the training augmentation"),
    "dtype": ("float16", f"{_TRAIN} / {_ENSEMBLE}: Trainer(precision=16)"),
}

_MEMBER = {
    **_COMMON,
    "model": ("resnest50d", "Sec. 2.2 Table 1; model_dict"),
    "init_from": ("timm/resnest50d.in1k", f"Sec. 2.2 ImageNet-pretrained models; {_TRAIN}: "
                                          "timm.create_model(model_name, pretrained=True)"),
    "predict.clip_min": (0.0, f"{_TRAIN}: pred=np.where(pred<0,0,pred) before the folds are averaged"),
    "backbone_classes": (1000, f"{_TRAIN}: timm.create_model(model_name, pretrained=True) keeps its 1000-way "
                               "classifier, then nn.Linear(1000, 500)"),
    "pool": ("avg", "timm's resnest50d pools by global average before its classifier"),
    "head": ("mlp", "Sec. 2.2 'three more layers are added with the number of neurons as 500, 250 and 1'"),
    "head_kwargs": ({"hidden": (500, 250)}, f"Sec. 2.2; {_TRAIN}: fc1 Linear(1000, 500), fc2 Linear(500, 250), "
                                            "fc3 Linear(250, 1), ReLU between"),
    "head_dropout": (0.0, f"{_TRAIN}: no dropout in the head"),
    "batch_size": (72, "Sec. 2.2 'The batch size is set to 72 except for the skresnext50_32x4d'; model_dict"),
}

_ENSEMBLE_STAGE = {
    **_COMMON,
    "batch_size": (224, f"{_ENSEMBLE}: model_dict {{'ensemble_se': {{'batchsize': 224}}, ...}}"),
    "ensemble.head_hidden": ((500, 250), "Sec. 2.7 'new three layers with the number of neurons as 500, 250 and 1'"),
    "optim.freeze": (("^backbone/members_",), "Sec. 2.7 'layers of all models are frozen'; p.requires_grad = False "
                                              "for every member parameter"),
    "optim.train_frozen_bn": (False, f"{_ENSEMBLE}: requires_grad = False for all member parameters, BatchNorm's "
                                     "affine ones included"),
}

SETTINGS = {
    "sensemble.py:resnest50d": _MEMBER,
    "sensemble.py:resnest50d,warm": {
        **_MEMBER,
        "schedule.name": ("cosine_restarts", "Sec. 2.4 cosine annealing warm restarts; "
                                             "CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=1, eta_min=1e-6)"),
        "schedule.period_epochs": (10.0, f"{_TRAIN}: CosineAnnealingWarmRestarts(T_0=10)"),
        "schedule.restart_mult": (1, f"{_TRAIN}: CosineAnnealingWarmRestarts(T_mult=1)"),
    },
    "sensemble.py:ensemble": {
        **_ENSEMBLE_STAGE,
        "ensemble.kind": ("se", "Sec. 2.7 Weighted Ensemble: the SE block over the members' outputs; "
                                f"{_ENSEMBLE}: model_name 'ensemble_se'"),
    },
    "sensemble.py:average": {
        **_ENSEMBLE_STAGE,
        "ensemble.kind": ("average", "Sec. 2.7 Average Ensemble: 'the output is stacked and averaged'; "
                                     f"{_ENSEMBLE}: model_name 'ensemble'"),
    },
}
