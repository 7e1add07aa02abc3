"""--mode=explain (cxflax/train/explain.py): overlays, their table and the TensorBoard grid for a
trained regression run and a patch classifier; what the overlay picture shows."""

from __future__ import annotations

import csv
import glob
import os

import numpy as np
import pytest
from PIL import Image

from cxflax.data.images import write_image
from cxflax.errors import ConfigError, DataError
from cxflax.train.explain import _target, image_grid, render_overlay
from tests.conftest import (TINY, TINY_RUN, checkpoint_predictions, held_out, load_config, run_main,
                            tensorboard_events)


def _table(workdir):
  with open(os.path.join(workdir, "explain", "saliency.csv")) as f:
    return list(csv.DictReader(f))


def test_explain_regression_run(tiny_run, tmp_path):
  """The tiny regression run's first three held-out images: their predicted values (the map is
  that value's gradient) as the checkpoint computes them, one overlay each, a grid in TensorBoard."""
  workdir, _ = tiny_run
  out = tmp_path / "explain"
  run_main(out, *TINY_RUN, "--config.explain.num=3", mode="explain", checkpoint=workdir)
  rows = _table(out)
  source, indices = held_out(load_config("resnest.py:runlocal", *TINY, *TINY_RUN))
  assert [r["name"] for r in rows] == [source.example_name(int(i)) for i in indices[:3]]
  preds = checkpoint_predictions(workdir, source, indices[:3])
  np.testing.assert_allclose([float(r["predicted"]) for r in rows], preds, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose([float(r["true"]) for r in rows], source.labels()[indices[:3]], rtol=1e-3)
  for r in rows:
    picture = np.asarray(Image.open(out / "explain" / r["overlay"]))
    assert picture.ndim == 3 and picture.shape[-1] == 3 and float(r["map_max"]) >= 0
  assert len(glob.glob(str(out / "explain" / "*.png"))) == 3
  _, images, _ = tensorboard_events(out)  # the three overlays side by side
  [(_, grid)] = images["explain/saliency"]
  overlay = np.asarray(Image.open(out / "explain" / rows[0]["overlay"]))
  assert grid.shape == (overlay.shape[0], 3 * overlay.shape[1], 3)
  np.testing.assert_array_equal(grid[:, :overlay.shape[1]], overlay)
  # New images (config.predict.images, as --mode=predict reads them): the same three images as
  # PNG files of other names give the same predictions and no true value.
  folder = tmp_path / "new"
  folder.mkdir()
  for k, i in enumerate(indices[:3]):
    write_image(folder / f"case{k}.png", source.load(int(i))["image"])
  run_main(tmp_path / "explain_new", *TINY_RUN, f"--config.predict.images={folder}", mode="explain",
           checkpoint=workdir)
  new = _table(tmp_path / "explain_new")
  assert [r["name"] for r in new] == sorted(os.listdir(folder))
  np.testing.assert_allclose([float(r["predicted"]) for r in new], preds, rtol=1e-3, atol=1e-3)
  assert [r["true"] for r in new] == ["?"] * 3
  with pytest.raises(ConfigError, match="config.explain.target='1'.*regresses"):
    run_main(out, *TINY_RUN, "--config.explain.target=1", mode="explain", checkpoint=workdir)
  with pytest.raises(DataError, match="config.explain.images.*nope.png"):
    run_main(out, *TINY_RUN, "--config.explain.images=('nope.png',)", mode="explain", checkpoint=workdir)


# A patch classifier of seed 003's recipe after one training step: what it predicts does not
# matter, only that explain reports what its checkpoint computes. (~45 s, most of it compiling the
# train step and the Grad-CAM call: the one end-to-end check of a classifier and its patches.)
PATCHES = ("--config.data.image_size=48", "--config.patches.size=32", "--config.patches.num=4",
           "--config.halt_after_steps=1")


def test_explain_patch_classifier(tmp_path):
  """A patch classifier (seed 003, probabilistic Grad-CAM): named images, in the order named, with
  their predicted class and its probability as the checkpoint computes them."""
  spec = "patched_flannel.py:resnet10t,runlocal"
  workdir = tmp_path / "run"
  run_main(workdir, *PATCHES, config=spec)
  source, indices = held_out(load_config(spec, *TINY, *PATCHES))
  names = [source.example_name(int(i)) for i in indices[[2, 0]]]
  run_main(workdir, *PATCHES, f"--config.explain.images={tuple(names)}", mode="explain", config=spec)
  rows = _table(workdir)
  assert [r["name"] for r in rows] == names
  probs = checkpoint_predictions(workdir, source, indices[[2, 0]])
  classes = list(source.class_names)
  assert [r["predicted"] for r in rows] == [classes[k] for k in probs.argmax(1)]
  assert [r["true"] for r in rows] == [classes[k] for k in source.labels()[indices[[2, 0]]]]
  np.testing.assert_allclose([float(r["probability"]) for r in rows], probs.max(1), atol=1e-4)
  assert [r["explained"] for r in rows] == [r["predicted"] for r in rows]


def test_explained_class_from_the_config():
  names = ["covid19", "viral", "bacterial", "normal"]
  assert _target("predicted", names) is None
  assert _target("bacterial", names) == 2 and _target("3", names) == 3
  with pytest.raises(ConfigError, match="config.explain.target='4'.*index below 4"):
    _target("4", names)
  with pytest.raises(ConfigError, match="config.explain.target='covid'.*'viral'"):
    _target("covid", names)


def test_overlay_shows_the_map_where_it_is():
  """A map that is hot only in the image's top-left quadrant colours that quadrant red (jet's top)
  and leaves the bottom-right blue (jet's bottom) over the grayscale image."""
  image = np.random.default_rng(0).uniform(0.3, 0.7, (64, 64, 3))
  heat = np.zeros((64, 64))
  heat[:32, :32] = 5.0
  picture = render_overlay(image, heat, "title", alpha=0.5).astype(float)
  drawn = (picture < 250).any(axis=-1)  # the overlay leaves no pixel of the image white
  rows = np.flatnonzero(drawn.mean(axis=1) > 0.5)
  cols = np.flatnonzero(drawn[rows].mean(axis=0) > 0.5)
  (r0, r1), (c0, c1) = (rows[0], rows[-1]), (cols[0], cols[-1])
  assert abs((r1 - r0) - (c1 - c0)) <= 2  # square pixels: the map has the image's shape

  def at(fr, fc):  # mean colour around a point given as fractions of the drawn image
    r, c = int(r0 + fr * (r1 - r0)), int(c0 + fc * (c1 - c0))
    return picture[r - 3:r + 4, c - 3:c + 4].reshape(-1, 3).mean(axis=0)

  hot, cold = at(0.25, 0.25), at(0.75, 0.75)
  assert hot[0] > hot[2] + 60  # red over blue where the map is hot
  assert cold[2] > cold[0] + 60  # blue where it is zero
  h, w, _ = picture.shape
  grid = image_grid([picture.astype(np.uint8)] * 5, columns=4)
  assert grid.shape == (2 * h, 4 * w, 3) and (grid[h:, w:] == 255).all()
  np.testing.assert_array_equal(grid[h:, :w], picture.astype(np.uint8))
