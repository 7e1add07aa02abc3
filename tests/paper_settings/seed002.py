"""Seed 002 (Farooq & Hafeez, COVID-ResNet, seeds/002_771452a1cdd7b2fa.txt): the settings the
paper states, and the fastai v1 defaults it relies on ("The entire data preprocessing, data
augmentation and training performed use the fastai [11] framework", Sec. II-D), as the finalized
configs/covid_resnet.py config holds them: "covid_resnet.py" for what every stage shares,
"covid_resnet.py#stageK" for the K-th entry of config.stages as cxflax.config.stage_configs
finalizes it. Values are what the recipe holds when it matches the paper; a recipe that differs
lists the path in config.departures (stages 2 and 4 have no rates in the paper: none listed)."""

_PAPER = "seed 002"
_FASTAI = "fastai v1 default (the paper trains with fastai, Sec. II-D)"


def _pp(size):
  return ("to_rgb|resize(%d)|dihedral()|rotate(15, p=0.75)|zoom(1.1, p=0.75)|lighting(0.2, p=0.75)|"
          "normalize('imagenet')" % size)


def _eval_pp(size):
  return "to_rgb|resize(%d)|normalize('imagenet')" % size


_AUG = (f"{_PAPER} Sec. II-B: 'vertical flips ..., random rotation (maximum rotation angle was 15 degree), "
        f"and lighting'; {_FASTAI}: get_transforms(flip_vert=True, max_rotate=15): dihedral_affine, "
        f"rotate/zoom 1.1 with p_affine 0.75, lighting 0.2 with p_lighting 0.75; ImageNet statistics (Sec. II-C)")
_EVAL = f"{_PAPER} Sec. II-B: 'test time augmentation was not explored'; ImageNet statistics (Sec. II-C)"
_HEAD_ONLY = ("^backbone/",)


def _stage(size, epochs, frozen, size_src, epochs_src, lr_range=None, lr_src=""):
  s = {
      "data.image_size": (size, size_src),
      "num_epochs": (epochs, epochs_src),
      "optim.freeze": (_HEAD_ONLY if frozen else (),
                       f"{_PAPER} Sec. II-D: " + ("'only the newly added head of the network is trained'"
                                                  if frozen else "'the whole network is fine-tuned'")),
      "data.train_pp": (_pp(size), _AUG),
      "data.eval_pp": (_eval_pp(size), _EVAL),
  }
  if lr_range:
    s["optim.group_lr_range"] = (lr_range, lr_src)
  return s


SETTINGS = {
    "covid_resnet.py": {
        "model": ("resnet50", f"{_PAPER} Sec. II-C: 'ResNet50 [10]', pretrained on ImageNet"),
        "init_from": ("timm/resnet50.tv_in1k", f"{_PAPER} Sec. II-C: pretrained on ImageNet; fastai v1's "
                                               "cnn_learner(models.resnet50) loads torchvision's weights"),
        "head": ("fastai", f"{_PAPER} Sec. II-C: 'Adaptive average/max pooling, batch normalization, drop out and "
                           f"linear layers as proposed in [11]' (fastai's create_head)"),
        "batch_size": (32, f"{_PAPER} Sec. II-D: 'Adam optimizer with batch size of 32'"),
        "optim.name": ("adamw", f"{_PAPER} Sec. II-D: Adam; {_FASTAI}: true_wd=True, decoupled weight decay"),
        "optim.b2": (0.99, f"{_FASTAI}: Learner opt_func=partial(optim.Adam, betas=(0.9, 0.99))"),
        "optim.weight_decay": (1e-2, f"{_FASTAI}: Learner wd=1e-2"),
        "optim.train_frozen_bn": (True, f"{_FASTAI}: train_bn=True, BatchNorm trains while the body is frozen"),
        "schedule.name": ("one_cycle", f"{_PAPER} Sec. II-D: Smith's cyclical learning rates [8] in fastai; "
                                       f"{_FASTAI}: fit_one_cycle"),
        "schedule.pct_start": (0.3, f"{_FASTAI}: fit_one_cycle pct_start=0.3"),
        "schedule.div_factor": (25.0, f"{_FASTAI}: fit_one_cycle div_factor=25"),
        "schedule.final_div_factor": (1e4, f"{_FASTAI}: OneCycleScheduler final_div = div_factor * 1e4"),
        "loss.name": ("cross_entropy", f"{_FASTAI}: CrossEntropyFlat for single-label classification"),
        "data.source": ("covidx", f"{_PAPER} Sec. II-A: 'We used the COVIDx dataset'"),
        "data.eval_split": ("test", f"{_PAPER} Sec. III: accuracy 'on independent test set as suggested by authors in [7]'"),
        "lr_find.start": (1e-7, f"{_PAPER} Sec. II-D: LR range finder [8]; {_FASTAI}: lr_find start_lr=1e-7"),
        "lr_find.end": (10.0, f"{_FASTAI}: lr_find end_lr=10"),
        "lr_find.steps": (100, f"{_FASTAI}: lr_find num_it=100"),
        "lr_find.skip_start": (10, f"{_FASTAI}: recorder.plot(skip_start=10)"),
        "lr_find.skip_end": (5, f"{_FASTAI}: recorder.plot(skip_end=5)"),
    },
    "covid_resnet.py#stage1": _stage(
        128, 3, True, f"{_PAPER} Sec. II-D Stage I: 'resized to 128x128x3'",
        f"{_PAPER} Sec. II-D Stage I step 1: 'for 3 epochs'", (1e-3, 1e-3),
        f"{_PAPER} Sec. II-D Stage I step 1: 'with a learning rate of 1e-3'"),
    "covid_resnet.py#stage2": _stage(
        128, 5, False, f"{_PAPER} Sec. II-D Stage I", f"{_PAPER} Sec. II-D Stage I step 2: 'for 5 epochs'"),
    "covid_resnet.py#stage3": _stage(
        224, 3, True, f"{_PAPER} Sec. II-D Stage II: 'images of size 224x224x3'",
        f"{_PAPER} Sec. II-D Stage II step 1: 'for 3 epochs'", (1e-4, 1e-4),
        f"{_PAPER} Sec. II-D Stage II step 1: 'with learning rate of 1e-4'"),
    "covid_resnet.py#stage4": _stage(
        224, 5, False, f"{_PAPER} Sec. II-D Stage II", f"{_PAPER} Sec. II-D Stage II step 2: 'for 5 epochs'"),
    "covid_resnet.py#stage5": _stage(
        229, 25, False, f"{_PAPER} Sec. II-D Stage III: 'input images of size 229x229x3' (abstract: 229; "
                        f"Sec. II-C says 299)", f"{_PAPER} Sec. II-D Stage III: 'for 25 epochs'", (1e-6, 1e-4),
        f"{_PAPER} Sec. II-D Stage III: 'the earliest layer ... 1e-6 and the last layer ... 1e-4'"),
}
