"""Seed 003 (Patched FLANNEL; seeds/003_*.txt): the settings the report and the authors' code
state, as the finalized config holds them when configs/flannel.py and configs/patched_flannel.py
follow them. FLANNEL's code: github.com/qxiaobu/FLANNEL (FLANNEL/ensemble_step1.py,
ensemble_step2_ensemble_learning.py, data/base_dataset.py, data/xray_dataset_0328.py,
models/proposedModels/models/ensemble_learning.py); the Patched FLANNEL authors' copy and their
patch classifier: github.com/mannbiher/DeepLearningForHealthCareProject (src/FLANNEL/...,
src/patched_flannel/classification/train.py)."""

_STEP1 = "FLANNEL ensemble_step1.py"
_STEP2 = "FLANNEL ensemble_step2_ensemble_learning.py (the same defaults in the Patched FLANNEL copy)"
_BASE = "FLANNEL data/base_dataset.py get_transform (X-rays read as 'L', xray_dataset_0328.py)"
_PATCH = "Patched FLANNEL src/patched_flannel/classification/train.py"

# resize_and_crop: transforms.Resize([336, 336], Image.BICUBIC), a random 224 crop (get_params:
# x, y = randint(0, 336 - 224)), RandomHorizontalFlip via params['flip'] = random() > 0.5,
# ToTensor, Normalize((0.5,), (0.5,)), then the grey channel repeated three times; evaluation:
# the same resize, the crop at ((336 - 224) / 2, (336 - 224) / 2), the same normalisation.
_TRAIN_PP = "to_gray|resize(336, interpolation='bicubic')|random_crop(224)|flip_lr(0.5)|to_rgb|normalize('inception')"
_EVAL_PP = "to_gray|resize(336, interpolation='bicubic')|center_crop(224)|to_rgb|normalize('inception')"

_LEARNER = {
    "head": ("linear", f"{_STEP1}: the last layer replaced by torch.nn.Linear(features, 4)"),
    "loss.name": ("cross_entropy", f"{_STEP1}: criterion = nn.CrossEntropyLoss()"),
    "optim.name": ("adam", f"Results: 'fine-tuned ... by using the Adam optimizer'; {_STEP1}: optim.Adam"),
    "optim.learning_rate": (1e-3, f"{_STEP1}: --lr default 0.001"),
    "optim.weight_decay": (1e-4, f"{_STEP1}: --weight_decay default 1e-4, Adam(weight_decay=...)"),
    "schedule.name": ("step", f"{_STEP1}: adjust_learning_rate multiplies the rate by --gamma at --schedule epochs"),
    "schedule.unit": ("epoch", f"{_STEP1}: adjust_learning_rate(optimizer, epoch) once per epoch"),
    "schedule.step_decay_epochs": (150, f"{_STEP1}: --schedule [150, 225], of which 200 epochs reach 150"),
    "schedule.step_decay_factor": (0.1, f"{_STEP1}: --gamma 0.1"),
    "num_epochs": (200, f"{_STEP1}: --epochs 200; Discussion '200 epochs for five foldes'"),
    "batch_size": (10, f"{_STEP1}: --train-batch 10"),
    "eval_batch_size": (10, f"{_STEP1}: --test-batch 10"),
    "num_folds": (5, f"Sec. 2.1 'we used five fold cross validation'; {_STEP1}: exp_%s_list_cv5.pkl"),
    "data.image_size": (224, f"{_STEP1}: --crop_size 224"),
    "data.train_pp": (_TRAIN_PP, f"{_BASE}, training: --load_size 336 (bicubic), --crop_size 224, flip, "
                                 "Normalize((0.5,), (0.5,))"),
    "data.eval_pp": (_EVAL_PP, f"{_BASE}, evaluation: the central 224 crop of the 336 resize"),
}

_TORCHVISION = "torchvision.models"  # the authors' learners: models.__dict__[arch](pretrained=True)

_ENSEMBLE = {
    "ensemble.kind": ("flannel", f"Sec. 2.3 neural weight module; {_STEP2}: --arch ensembleNovel"),
    "ensemble.activation": ("tanh", "Sec. 2.3 'dense neural network with TanH layer'; ensemble_learning.py "
                                    "GENet: tanh(Linear(400, 5)(f fᵀ))"),
    "loss.name": ("focal", "Sec. 2.3 Eq. (1)-(2) FocalLoss; " + _STEP2 + ": criterion = focalloss(gamma=10, ...)"),
    "loss.gamma": (10.0, f"{_STEP2}: focalloss(gamma=10)"),
    "loss.alpha": ((), "Sec. 2.3 'α_m is set to be inverse class frequency of each class' (() = the training "
                       "split's inverse class frequency); get_label_distri: 1000 / counts"),
    "optim.name": ("adam", f"{_STEP2}: optim.Adam(model.parameters(), ...)"),
    "optim.learning_rate": (1e-5, f"{_STEP2}: --lr default 0.00001"),
    "optim.weight_decay": (1e-4, f"{_STEP2}: --weight_decay default 1e-4"),
    "schedule.name": ("constant", f"{_STEP2}: --schedule [50, 225] is never reached in 40 epochs"),
    "num_epochs": (40, f"{_STEP2}: --epochs default 40"),
    "batch_size": (20, f"{_STEP2}: --train-batch default 20"),
    "eval_batch_size": (20, f"{_STEP2}: --test-batch default 20"),
    "optim.freeze": (("^members_",), "Sec. 2.3 / Algorithm 1: the ensemble learns the base models' weights on "
                                     "their predictions; step 2 trains only the neural weight module"),
    "num_folds": (5, "Sec. 2.1 five fold cross validation; step 2 runs per fold (--cv)"),
}

_PATCHED_LEARNER = {
    "optim.name": ("adam", "Sec. 2.2 'the Adam optimizer with a learning rate of 0.00001'"),
    "optim.learning_rate": (1e-5, "Sec. 2.2 'a learning rate of 0.00001'; header.py lr = 1e-5"),
    "optim.weight_decay": (0.1, f"Sec. 2.2 'a weight decay and L1 regularization were used'; {_PATCH}: "
                                "optim.Adam(..., weight_decay=0.1)"),
    "schedule.name": ("constant", f"{_PATCH}: no learning-rate scheduler"),
    "num_epochs": (200, "Sec. 2.2 'The best model is selected among 200 epochs training'"),
    "loss.name": ("cross_entropy", f"{_PATCH}: criterion = nn.CrossEntropyLoss()"),
    "num_folds": (5, "Sec. 2.1 'we used five fold cross validation'"),
    "data.image_size": (1024, "Sec. 2.2 'The pre-processed images were first resized to 1024x1024'; Algorithm 1 "
                              "steps 2-3"),
    "patches.size": (224, "Sec. 2.2 'k number crops/patches of size 224x224'; Considerations"),
    "patches.num": (100, "Considerations: 'The number of patches(K) to be 100'; header.py repeat = 100"),
    "patches.aggregate": ("vote", "Sec. 2.2 'the percentage of predictions for each class based on the k "
                                  "patches'; Algorithm 1 step 6 majority voting"),
}

SETTINGS = {
    "flannel.py:densenet161": {
        **_LEARNER,
        "model": ("densenet161", "Results: base models Densenet161, ...; ensemble_dataset.py model_list"),
        "init_from": ("timm/densenet161.tv_in1k", "ensemble_step1.py: torchvision.models.densenet161(pretrained=True)"),
        "head_dropout": (0.0, f"{_TORCHVISION}.densenet161: no dropout before its classifier"),
    },
    "flannel.py:inception_v3": {
        **_LEARNER,
        "model": ("inception_v3", "Results: InceptionV3; ensemble_dataset.py model_list"),
        "init_from": ("timm/inception_v3.tv_in1k", "ensemble_step1.py: torchvision.models.inception_v3(pretrained=True)"),
        "head_dropout": (0.5, f"{_TORCHVISION}.inception_v3: Dropout(p=0.5) before fc, which {_STEP1} replaces"),
    },
    "flannel.py:resnet152": {
        **_LEARNER,
        "model": ("resnet152", "Results: Resnet152; ensemble_dataset.py model_list"),
        "init_from": ("timm/resnet152.tv_in1k", "ensemble_step1.py: torchvision.models.resnet152(pretrained=True)"),
        "head_dropout": (0.0, f"{_TORCHVISION}.resnet152: no dropout before fc"),
    },
    "flannel.py:resnext101_32x8d": {
        **_LEARNER,
        "model": ("resnext101_32x8d", "Results: ResneXt101; ensemble_dataset.py model_list"),
        "init_from": ("timm/resnext101_32x8d.tv_in1k", "ensemble_step1.py: torchvision.models.resnext101_32x8d(pretrained=True)"),
        "head_dropout": (0.0, f"{_TORCHVISION}.resnext101_32x8d: no dropout before fc"),
    },
    "flannel.py:vgg19_bn": {
        **_LEARNER,
        "model": ("vgg19_bn", "Results: Vgg19_bn; ensemble_dataset.py model_list"),
        "init_from": ("timm/vgg19_bn.tv_in1k", "ensemble_step1.py: torchvision.models.vgg19_bn(pretrained=True)"),
        "drop_rate": (0.5, f"{_TORCHVISION}.vgg19_bn classifier[2] Dropout(0.5), after the first 4096 layer "
                           "(timm's pre-logits)"),
        "head_dropout": (0.5, f"{_TORCHVISION}.vgg19_bn classifier[5] Dropout(0.5), before classifier[6], which "
                              f"{_STEP1} replaces with Linear(4096, 4)"),
    },
    "flannel.py:ensemble": _ENSEMBLE,
    "patched_flannel.py:densenet161": {
        **_PATCHED_LEARNER,
        "model": ("densenet161", "Results: the FLANNEL base models made patch-based"),
        "init_from": ("timm/densenet161.tv_in1k", "ensemble_step1.py: torchvision.models.densenet161(pretrained=True)"),
    },
    "patched_flannel.py:vgg19_bn": {
        **_PATCHED_LEARNER,
        "model": ("vgg19_bn", "Results: the FLANNEL base models made patch-based"),
        "init_from": ("timm/vgg19_bn.tv_in1k", "ensemble_step1.py: torchvision.models.vgg19_bn(pretrained=True)"),
        "drop_rate": (0.5, f"{_TORCHVISION}.vgg19_bn classifier Dropout(0.5) (kept when its last layer is replaced)"),
        "head_dropout": (0.5, f"{_TORCHVISION}.vgg19_bn classifier Dropout(0.5) before the replaced last layer"),
    },
    "patched_flannel.py:ensemble": _ENSEMBLE,
}
