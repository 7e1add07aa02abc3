"""What TensorBoard shows while training (cxflax/train/train.py, config.tensorboard_images): a grid
of a stage's first augmented inputs and, at each evaluation, one of evaluation examples with their
Grad-CAM maps; read back from the tiny run's event file."""

from __future__ import annotations

import os
import types

import flax.linen as nn
import numpy as np
import pytest

from cxflax.models.patches import PatchClassifier
from cxflax.train import train
from cxflax.train.explain import render_overlay
from tests.conftest import read_json, tensorboard_events


def test_training_writes_inputs_and_saliency_grids(tiny_run):
  """The tiny regression run (2 epochs, evaluated after each, tensorboard_images 4 by default):
  one grid of 4 augmented inputs at its first step, and a grid of 4 evaluation examples with maps at
  each evaluation's step (those of its eval/ scalars), each 4 overlays of explain's size wide."""
  scalars, images, hparams = tensorboard_events(tiny_run[0])
  assert hparams["model"] == "resnet10t" and hparams["batch_size"] == 8  # the run's config
  assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8, 10]  # every log_every_steps (2)
  assert sorted(images) == ["eval/saliency", "train/inputs"]
  h, w, _ = render_overlay(np.zeros((32, 32, 3)), None, "t").shape
  [(step, inputs)] = images["train/inputs"]
  assert step == 1 and inputs.shape == (h, 4 * w, 3)
  eval_steps = sorted({step for step, _ in scalars["eval/mae"]})
  assert len(eval_steps) == 2
  final = read_json(tiny_run[0], "final_metrics.json")  # the last evaluation's value, as float32
  assert scalars["eval/mae"][-1] == (final["step"], pytest.approx(final["metrics"]["mae"], rel=1e-6))
  assert [s for s, _ in images["eval/saliency"]] == eval_steps
  for _, grid in images["eval/saliency"]:
    assert grid.shape == (h, 4 * w, 3)
    # The jet maps over the grayscale images (at 32 px resnet10t's last map is 1x1: one colour).
    assert (np.ptp(grid.astype(int), axis=-1) > 30).mean() > 0.3
  assert np.ptp(inputs.astype(int), axis=-1).max() <= 2  # the inputs are shown alone, in gray


def _assert_top_left_marked(picture):
  """An overlay whose mask covers the image's top-left quadrant: jet's red there, its blue in the
  bottom-right (at opacity 0.4 over the gray image)."""
  picture = picture.astype(float)
  drawn = (picture < 250).any(-1)
  rows = np.flatnonzero(drawn.mean(1) > 0.5)
  cols = np.flatnonzero(drawn[rows].mean(0) > 0.5)

  def at(f):  # mean colour around a point a fraction f down and across the drawn image
    r, c = int(rows[0] + f * (rows[-1] - rows[0])), int(cols[0] + f * (cols[-1] - cols[0]))
    return picture[r - 3:r + 4, c - 3:c + 4].reshape(-1, 3).mean(0)

  hot, cold = at(0.25), at(0.75)
  assert hot[0] > hot[2] + 30 and cold[2] > cold[0] + 30


class _Writer:
  def __init__(self):
    self.images = []

  def write_images(self, step, images):
    self.images.append((step, images))


def _run(n, model=None, class_names=None):
  return types.SimpleNamespace(config=types.SimpleNamespace(tensorboard_images=n), model=model,
                               class_names=class_names, writer=_Writer())


def test_input_grid_draws_masks(monkeypatch):
  """A segmentation batch's mask is drawn over its image (jet's red where the mask is, its blue
  elsewhere), and a patch classifier's lung-mask channel over its image channels; a classification
  batch's images are shown alone, in gray, titled with their labels' names; 0 writes nothing."""
  titles = []
  draw = train.render_overlay
  monkeypatch.setattr(train, "render_overlay", lambda image, heat, title: titles.append(title) or draw(image, heat, title))
  rng = np.random.default_rng(0)
  image = rng.uniform(0.3, 0.7, (3, 32, 32, 3)).astype(np.float32)
  masks = np.zeros((3, 32, 32), np.int32)
  masks[:, :16, :16] = 1
  seg = _run(2)
  train._write_inputs(seg, {"image": image, "label": masks}, 7)
  [(step, written)] = seg.writer.images
  grid = written["train/inputs"]
  h, w, _ = render_overlay(image[0], None, "t").shape
  assert step == 7 and grid.shape == (1, h, 2 * w, 3)
  _assert_top_left_marked(grid[0, :, :w])
  cls = _run(3, class_names=("normal", "covid19"))
  train._write_inputs(cls, {"image": image, "label": np.array([1, 0, 1])}, 1)
  [(_, written)] = cls.writer.images
  grid = written["train/inputs"]
  assert grid.shape == (1, h, 3 * w, 3)
  assert np.abs(grid[0].astype(int) - grid[0].mean(-1, keepdims=True)).max() <= 2  # gray: no map
  assert titles == ["mask", "mask", "label covid19", "label normal", "label covid19"]
  # A patch classifier's input: image channels and the lung mask last, drawn over them.
  patches = _run(1, model=PatchClassifier(nn.Dense(2)), class_names=("normal", "covid19"))
  with_mask = np.concatenate([image, masks[..., None].astype(np.float32)], -1)
  train._write_inputs(patches, {"image": with_mask, "label": np.array([1, 0, 1])}, 1)
  [(_, written)] = patches.writer.images
  assert written["train/inputs"].shape == (1, h, w, 3)
  _assert_top_left_marked(written["train/inputs"][0])
  off = _run(0)
  train._write_inputs(off, {"image": image, "label": masks}, 1)
  assert off.writer.images == []


def test_no_saliency_grid_when_off_or_for_segmentation():
  """tensorboard_images=0, or a task without Grad-CAM (segmentation, embeddings): no evaluation
  examples are prepared and each evaluation writes no picture."""
  from cxflax.config import finalize
  from cxflax.errors import ConfigError
  from tests.conftest import load_config
  stage = types.SimpleNamespace(inp=types.SimpleNamespace(eval_indices=np.arange(5)))
  for n, task in ((0, "regression"), (4, "segmentation"), (4, "embedding")):
    run = _run(n)
    run.task = types.SimpleNamespace(name=task)
    pictures = train._EvalPictures(run, stage)
    pictures.write(3, None)
    assert pictures.batch is None and run.writer.images == []
  with pytest.raises(ConfigError, match="config.tensorboard_images must be >= 0, got -1"):
    finalize(load_config("resnest.py:runlocal", "--config.tensorboard_images=-1"))


def test_metric_writer_events_read_back_in_tensorboard_before_close(tmp_path, caplog):
  """Scalars, uint8 image batches and hyperparameters come back from the event file with their
  steps and values (each write reaches the file at once, so a killed run's are readable), and
  are logged as clu's logging writer logged them."""
  import logging
  from cxflax.train.summaries import MetricWriter
  pictures = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  with caplog.at_level(logging.INFO, logger="absl"):
    w = MetricWriter(str(tmp_path))
    w.write_hparams({"optim.learning_rate": 0.1, "model": "resnet10t", "num_epochs": 3, "sam": True})
    w.write_scalars(3, {"train/loss": 1.25, "eval/mae": np.float32(0.5)})
    w.write_scalars(6, {"train/loss": 0.75})
    w.write_images(4, {"train/inputs": pictures})
    scalars, images, hparams = tensorboard_events(tmp_path)
    w.close()
  assert scalars == {"train/loss": [(3, 1.25), (6, 0.75)], "eval/mae": [(3, 0.5)]}
  assert [s for s, _ in images["train/inputs"]] == [4, 4]
  for (_, got), want in zip(images["train/inputs"], pictures):
    np.testing.assert_array_equal(got, want)
  assert hparams == {"optim.learning_rate": 0.1, "model": "resnet10t", "num_epochs": 3.0, "sam": True}
  assert "[3] eval/mae=0.5, train/loss=1.25" in caplog.text
  assert "[4] Got images: {'train/inputs': (2, 5, 7, 3)}." in caplog.text
  with pytest.raises(ValueError, match=r"train/inputs: images must be uint8 \(N, H, W, C\), got float32"):
    MetricWriter(None).write_images(1, {"train/inputs": pictures.astype(np.float32)})


def test_metric_writer_of_other_processes_only_logs(tmp_path, monkeypatch, caplog):
  import logging
  from cxflax.train.summaries import MetricWriter
  monkeypatch.chdir(tmp_path)
  with caplog.at_level(logging.INFO, logger="absl"):
    w = MetricWriter(None)
    w.write_hparams({"a": 1})
    w.write_scalars(2, {"train/loss": 3.5})
    w.close()
  assert "[2] train/loss=3.5" in caplog.text and os.listdir(tmp_path) == []


def test_progress_reports_the_rate_time_left_and_where_time_went(monkeypatch, caplog):
  """Steps of 30 s, an evaluation of 60 s after step 5, a report every 2 of 10 steps: the rate
  since the last report (the evaluation's time counted in), the time left at that rate, and
  the share of the time since the first step spent evaluating."""
  import logging
  from cxflax.train import summaries
  clock = [100.0]
  monkeypatch.setattr(summaries.time, "monotonic", lambda: clock[0])
  written = []
  writer = types.SimpleNamespace(write_scalars=lambda step, scalars: written.append((step, scalars)))
  with caplog.at_level(logging.INFO, logger="absl"):
    report = summaries.Progress(10, writer, every=2)
    for step in range(1, 11):
      clock[0] += 30
      report(step)
      if step == 5:
        with report.timed("eval"):
          clock[0] += 60
  assert [s for s, _ in written] == [2, 4, 6, 8, 10]
  rates = {s: v["steps_per_sec"] for s, v in written}
  assert rates == pytest.approx({2: 1 / 30, 4: 1 / 30, 6: 1 / 60, 8: 1 / 30, 10: 1 / 30})
  assert written[2][1]["uptime"] == pytest.approx(240.0)  # step 6: six steps and the evaluation
  assert "0.0333 steps/s, 20.0% (2/10), ETA: 4m" in caplog.text
  assert "0.0167 steps/s, 60.0% (6/10), ETA: 4m (28.6% eval)" in caplog.text
  assert "100.0% (10/10), ETA: 0s (18.2% eval)" in caplog.text


def test_a_full_disk_under_the_event_file_is_a_workdir_error(tmp_path, monkeypatch):
  """The event file's name taken by a link to /dev/full (every write: ENOSPC): a WorkdirError
  naming the file, which the command line prints as its `error:` line."""
  from cxflax.errors import WorkdirError
  from cxflax.train import summaries
  monkeypatch.setattr(summaries.time, "time", lambda: 1234.0)
  monkeypatch.setattr(summaries.socket, "gethostname", lambda: "host")
  path = tmp_path / f"events.out.tfevents.1234.host.{os.getpid()}.v2"
  os.symlink("/dev/full", path)
  with pytest.raises(WorkdirError, match=rf"cannot write TensorBoard events to {path}: No space left on device \(ENOSPC\)"):
    summaries.MetricWriter(str(tmp_path))
