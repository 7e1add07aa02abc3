"""Lung segmentation end to end (train, Jaccard/Dice, masks predicted for a folder), masks read
back from files for real data, and patch-based FLANNEL learners and their ensemble."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from cxflax.config import base_config
from cxflax.data import phantom as phantom_lib
from cxflax.data.sources import make_source
from cxflax.errors import DataError
from tests.test_recipes import _final, _main


def _write_xrays(folder, sizes, nested=True):
  ph = phantom_lib.Phantom("cxr", num_subjects=len(sizes), image_size=64, slices_per_subject=(1, 1), seed=3)
  paths = []
  for i, (h, w) in enumerate(sizes):
    img = Image.fromarray(np.asarray(ph[i]["image"]).reshape(64, 64)).resize((w, h))
    path = os.path.join(folder, "sub" if nested and i % 2 else "", f"xray_{i}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)
    paths.append(path)
  return paths


def test_lung_segmentation_trains_and_writes_masks_for_a_folder(tmp_path):
  wd = str(tmp_path / "seg")
  _main("lung_seg.py:runlocal", wd, "--config.num_epochs=2")
  final = _final(wd)
  assert {"jaccard", "dice", "pixel_accuracy"} <= set(final["metrics"])
  assert 0 <= final["metrics"]["jaccard"] <= 1 and "jaccard" in final["baseline"]
  images = str(tmp_path / "xrays")
  sizes = [(40, 56), (64, 64), (50, 30)]
  _write_xrays(images, sizes)
  proc = _main("lung_seg.py:runlocal", wd, f"--config.predict.images={images}", mode="predict")
  assert "Lung masks of 3 images written" in proc.stdout
  for i, (h, w) in enumerate(sizes):
    mask = np.asarray(Image.open(os.path.join(wd, "masks", f"xray_{i}.png")))
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}


def test_masks_from_files_join_their_images(tmp_path):
  root = tmp_path / "data"
  for cls in ("a", "b"):  # a/xray_0.png, a/xray_1.png, b/xray_0.png, b/xray_1.png
    _write_xrays(str(root / cls), [(32, 32), (32, 32)], nested=False)
  masks = tmp_path / "masks"  # masks go by image name: xray_0.png serves a/ and b/
  masks.mkdir()
  Image.fromarray(np.full((16, 16), 255, np.uint8)).save(masks / "xray_0.png")  # half size: resized
  c = base_config().data
  c.source, c.root, c.mask_dir = "folder", str(root), str(masks)
  with pytest.raises(DataError, match="no mask in .*xray_1.png not found"):
    make_source(c)
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "xray_1.png")
  source = make_source(c)
  loaded = [source.load(i) for i in range(len(source))]
  assert all(ex["lung_mask"].shape == (32, 32) for ex in loaded)
  assert sorted(int(ex["lung_mask"].sum()) for ex in loaded) == [0, 0, 1024, 1024]
  c.target = "lung_mask"
  assert make_source(c).task == "segmentation"


PATCH_TINY = ["--config.data.image_size=48", "--config.patches.size=32", "--config.patches.num=4",
              "--config.num_epochs=1"]


def test_patched_flannel_learners_and_their_ensemble(tmp_path):
  members = []
  for seed in (0, 1):
    wd = str(tmp_path / f"learner{seed}")
    _main("patched_flannel.py:resnet10t,runlocal", wd, *PATCH_TINY, f"--config.seed={seed}")
    assert "accuracy" in _final(wd)["metrics"]
    members.append(wd)
  ens = str(tmp_path / "ensemble")
  _main("patched_flannel.py:ensemble,runlocal", ens, "--config.data.image_size=48", "--config.num_epochs=1",
        f"--config.ensemble.members={tuple(members)}", mode="ensemble")
  with open(os.path.join(ens, "final_metrics.json")) as f:
    assert "macro_f1" in json.load(f)["metrics"]


def test_patch_classifier_needs_the_mask_channel(tmp_path):
  proc_dir = str(tmp_path / "w")
  from tests.conftest import run_python
  from tests.test_recipes import TINY
  proc = run_python("", args=["-m", "cxflax.main", "--config=configs/flannel.py:resnet10t,runlocal",
                              f"--workdir={proc_dir}", *TINY, "--config.patches.num=4", "--config.patches.size=32"])
  assert proc.returncode == 2 and "append_mask" in proc.stderr
