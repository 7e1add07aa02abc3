"""What a run reports while it works: TensorBoard event files and the lines it logs.

clu's writers (`clu.metric_writers`, and `clu.periodic_actions`, which imports them) import
TensorFlow to write event files: about 7 s and several hundred MB of every training process
before its first step (benchmarks/NOTES.md §16). The same files are written here with
TensorBoard's own record writer and protocol buffers (the `tensorboard` package, no TensorFlow),
in the form clu writes them (TF2 summaries: scalars as float tensors, images as a string tensor
[width, height, PNG...], hyperparameters as the hparams plugin's session start), so TensorBoard
shows a run as before; and the log lines are those of clu's LoggingWriter and ReportProgress.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from typing import Mapping

import numpy as np
from absl import logging
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from cxflax.errors import WorkdirError
from cxflax.files import os_error_reason


class MetricWriter:
  """Scalars, image grids and hyperparameters: logged, and written to an event file in `logdir`
  (None: logged only, as by processes other than the first). Each write reaches the file at
  once: what a killed run reported stays readable. (Not tensorboard's EventFileWriter, which
  imports TensorFlow where it is installed.)"""

  def __init__(self, logdir: str | None):
    self._events = None
    if logdir is not None:
      name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.v2"
      self.path = os.path.join(logdir, name)
      try:
        self._events = RecordWriter(open(self.path, "ab"))
      except OSError as e:
        raise self._error(e) from None
      self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _error(self, e: OSError) -> WorkdirError:
    return WorkdirError(f"cannot write TensorBoard events to {self.path}: {os_error_reason(e)}")

  def _add(self, event: event_pb2.Event) -> None:
    try:
      self._events.write(event.SerializeToString())
      self._events.flush()
    except OSError as e:
      raise self._error(e) from None

  def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if self._events is not None:
      self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):g}" for k, v in sorted(scalars.items())))
    metadata = scalar_metadata.create_summary_metadata(display_name="", description="")
    self._write(step, [summary_pb2.Summary.Value(
        tag=k, metadata=metadata, tensor=tensor_util.make_tensor_proto(np.float32(v)))
        for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Each value a batch (N, H, W, 3) of uint8 pictures."""
    logging.info("[%d] Got images: %s.", step, {k: tuple(v.shape) for k, v in images.items()})
    values = []
    for tag, batch in images.items():
      batch = np.asarray(batch)
      if batch.dtype != np.uint8 or batch.ndim != 4:
        raise ValueError(f"{tag}: images must be uint8 (N, H, W, C), got {batch.dtype} {batch.shape}")
      pngs = []
      for picture in batch:
        buffer = io.BytesIO()
        Image.fromarray(picture.squeeze(-1) if picture.shape[-1] == 1 else picture).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
      height, width = batch.shape[1:3]
      tensor = tensor_util.make_tensor_proto([str(width).encode(), str(height).encode(), *pngs],
                                             shape=[2 + len(pngs)])
      values.append(summary_pb2.Summary.Value(
          tag=tag, tensor=tensor, metadata=image_metadata.create_summary_metadata(display_name="", description="")))
    self._write(step, values)

  def write_hparams(self, hparams: Mapping[str, int | float | str | bool]) -> None:
    logging.info("[Hyperparameters] %s", dict(hparams))
    self._write(0, list(hparams_summary.hparams_pb(dict(hparams)).value))

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


class Progress:
  """A stage's clock. Every `every` steps: the steps/s since the last report, the share done and
  the time left logged, and steps_per_sec and uptime written; with the share of the time spent in
  each `timed` section ('eval', 'checkpoint') since the first step. At each epoch's end
  (`end_epoch`): where that epoch's seconds went, training (everything but the timed sections:
  steps, input, logging; the first epoch's includes compiling the step), evaluation and
  checkpointing, and the training images/s, logged and written as train/epoch_seconds and
  train/images_per_second."""

  def __init__(self, total_steps: int, writer: MetricWriter, every: int, examples_per_step: int = 0):
    self.total_steps, self.writer, self.every = total_steps, writer, every
    self.examples_per_step = examples_per_step
    self._start = time.monotonic()
    self._last: tuple[int, float] | None = None  # (step, time) of the last report
    self._spent: dict[str, float] = {}
    self._new_epoch()

  def _new_epoch(self) -> None:
    self._epoch_start, self._epoch_steps = time.monotonic(), 0
    self._epoch_spent = {"eval": 0.0, "checkpoint": 0.0}

  def __call__(self, step: int) -> None:
    now = time.monotonic()
    self._epoch_steps += 1
    if self._last is None:  # the first step: what follows is timed from here
      self._last, self._first = (step, now), now
      return
    if step % self.every and step != self.total_steps:
      return
    last_step, last_time = self._last
    rate = (step - last_step) / max(now - last_time, 1e-9)
    self._last = (step, now)
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    note = f"{rate:.3g} steps/s, {100 * step / self.total_steps:.1f}% ({step}/{self.total_steps}), ETA: {_duration(eta)}"
    elapsed = now - self._first
    if self._spent and elapsed > 0:
      note += " (" + ", ".join(f"{100 * s / elapsed:.1f}% {name}" for name, s in sorted(self._spent.items())) + ")"
    logging.info("%s", note)
    self.writer.write_scalars(step, {"steps_per_sec": rate, "uptime": now - self._start})

  @contextlib.contextmanager
  def timed(self, name: str):
    t0 = time.monotonic()
    try:
      yield
    finally:
      spent = time.monotonic() - t0
      self._spent[name] = self._spent.get(name, 0.0) + spent
      self._epoch_spent[name] = self._epoch_spent.get(name, 0.0) + spent

  def end_epoch(self, epoch: int, step: int) -> None:
    total = time.monotonic() - self._epoch_start
    train = max(total - sum(self._epoch_spent.values()), 1e-9)
    images = self._epoch_steps * self.examples_per_step
    logging.info("epoch %d took %.1f s: training %.1f s (%d images, %.1f images/s), evaluation %.1f s, "
                 "checkpoint %.1f s", epoch, total, train, images, images / train, self._epoch_spent["eval"],
                 self._epoch_spent["checkpoint"])
    self.writer.write_scalars(step, {"train/epoch_seconds": total, "train/images_per_second": images / train})
    self._new_epoch()


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  if seconds < 60:
    return f"{seconds:.0f}s"
  minutes = round(seconds / 60)
  return f"{minutes}m" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
