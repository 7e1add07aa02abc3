"""Lung segmentation end to end (train, Jaccard/Dice, masks predicted for a folder), masks read
back from files for real data, and patch-based FLANNEL learners and their ensemble."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from cxflax.config import base_config
from cxflax.data import phantom as phantom_lib
from cxflax.data.sources import make_source
from cxflax.errors import ConfigError, DataError
from tests.conftest import assert_same_variables, read_json, run_main, run_variables


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
  """Jaccard and Dice of the held-out fold, and masks written at each image's own size for a
  folder of images: both recomputed here from the checkpoint's own per-pixel predictions."""
  import jax
  from cxflax.data.transforms import Preprocess
  from cxflax.train.build import load_run
  wd = str(tmp_path / "seg")
  run_main(wd, config="lung_seg.py:runlocal")
  final = read_json(wd, "final_metrics.json")
  run = load_run(wd)
  pp = Preprocess(run.config.data.eval_pp)
  apply = jax.jit(lambda v, x: run.model.apply(v, x, train=False))
  segment = lambda ex: np.asarray(apply(run.variables, pp.random_map(dict(ex), np.random.default_rng(0))["image"][None]))[0].argmax(-1)
  from tests.test_recipes import _held_out
  source, held_out = _held_out(wd)
  jaccard, dice = [], []
  for i in held_out:
    ex = source.load(int(i))
    pred = segment(ex) == 1
    true = np.asarray(ex["lung_mask"]).reshape(pred.shape) > 0  # stored at the model's size
    inter, union = (pred & true).sum(), (pred | true).sum()
    jaccard.append(inter / union if union else 1.0)
    dice.append(2 * inter / (pred.sum() + true.sum()) if union else 1.0)
  assert final["metrics"]["jaccard"] == pytest.approx(np.mean(jaccard), abs=1e-6)
  assert final["metrics"]["dice"] == pytest.approx(np.mean(dice), abs=1e-6)
  assert "jaccard" in final["baseline"] and "pixel_accuracy" in final["metrics"]
  # --mode=eval's report: every held-out image's Jaccard and Dice, as computed above.
  run_main(wd, mode="eval", config="lung_seg.py:runlocal")
  with open(os.path.join(wd, "report", "per_image.csv")) as f:
    rows = {r["name"]: r for r in csv.DictReader(f)}
  names = [source.example_name(int(i)) for i in held_out]
  assert sorted(rows) == sorted(names)
  np.testing.assert_allclose([float(rows[n]["jaccard/lung"]) for n in names], jaccard, atol=1e-6)
  np.testing.assert_allclose([float(rows[n]["dice/lung"]) for n in names], dice, atol=1e-6)
  assert os.path.getsize(os.path.join(wd, "report", "overlap.png")) > 0
  images = str(tmp_path / "xrays")
  sizes = [(40, 56), (64, 64), (50, 30)]
  paths = _write_xrays(images, sizes)
  predicted = run_main(wd, f"--config.predict.images={images}", mode="predict", config="lung_seg.py:runlocal")
  assert "Lung masks of 3 images written" in predicted.stdout
  from cxflax.data.images import read_image
  for i, ((h, w), path) in enumerate(zip(sizes, paths)):
    mask = np.asarray(Image.open(os.path.join(wd, "masks", f"xray_{i}.png")))
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
    expected = segment({"image": read_image(path)}).astype(np.uint8) * 255
    expected = np.asarray(Image.fromarray(expected).resize((w, h), Image.NEAREST))
    np.testing.assert_array_equal(mask, expected)


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


PATCH_TINY = ["--config.data.image_size=48", "--config.patches.size=32", "--config.patches.num=4"]


def test_patched_flannel_learners_and_their_ensemble(tmp_path):
  """Two patch classifiers (4 patches of 32 px inside the lung mask) and FLANNEL's ensemble of
  them; the ensemble's accuracy is that of its checkpoint, recomputed here."""
  from tests.conftest import checkpoint_predictions
  from tests.test_recipes import _held_out
  from tests.test_recipes import two_members
  members = two_members(tmp_path, *PATCH_TINY, config="patched_flannel.py:resnet10t,runlocal")
  source, held_out = _held_out(members[0])
  probs = checkpoint_predictions(members[0], source, held_out)
  assert read_json(members[0], "final_metrics.json")["metrics"]["accuracy"] == pytest.approx(
      np.mean(probs.argmax(1) == source.labels()[held_out]), abs=1e-9)
  ens = str(tmp_path / "ensemble")
  run_main(ens, "--config.data.image_size=48", "--config.num_epochs=1", f"--config.ensemble.members={tuple(members)}",
           mode="ensemble", config="patched_flannel.py:ensemble,runlocal")
  final = read_json(ens, "final_metrics.json")["metrics"]
  probs = checkpoint_predictions(ens, source, held_out)
  assert final["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == source.labels()[held_out]), abs=1e-9)
  params = run_variables(ens)["params"]
  for i, member in enumerate(members):  # the learners inside are the trained ones, frozen
    assert_same_variables(params[f"members_{i}"]["network"], run_variables(member)["params"]["network"],
                          rtol=0, what=f"learner {i}")


def test_patch_classifier_needs_the_mask_channel(tmp_path):
  with pytest.raises(ConfigError, match="append_mask"):
    run_main(str(tmp_path / "w"), "--config.patches.num=4", "--config.patches.size=32",
             config="flannel.py:resnet10t,runlocal")
