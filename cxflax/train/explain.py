"""--mode=explain: what a trained model looks at. For the evaluation split's first
config.explain.num images (or those config.explain.images names, or config.predict.images), a
Grad-CAM map (cxflax/models/saliency.py; probabilistic Grad-CAM for a patch classifier) is drawn
over the image as the model saw it: grayscale underneath, the map in colour over it, titled with
the predicted and true label and the probability. Overlays go to workdir/explain/<name>.png, a
table of them to workdir/explain/saliency.csv, and a grid of them to TensorBoard.

Maps are computed config.eval_batch_size images at a time in one compiled call (unsharded: a
handful of images; every process computes them, process 0 writes), and each is scaled to its own
maximum for display; the CSV keeps the maximum. Grad-CAM keeps the activations for a backward
pass, and a patch classifier's batch is B·K patches: lower config.eval_batch_size if it does not
fit the device.

The map function (saliency_function) and the overlay (draw_saliency, render_overlay) are also
those of the evaluation report's worst examples (report_saliency, --mode=eval) and of training's
TensorBoard grids (train.py): one way to compute and draw a map.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxflax import config as config_lib
from cxflax.data import pipeline
from cxflax.data.images import write_image
from cxflax.data.sources import image_folder
from cxflax.errors import ConfigError, DataError
from cxflax.files import write_csv
from cxflax.models import saliency, xla_cpu
from cxflax.models.patches import PatchClassifier
from cxflax.train import build
from cxflax.train.summaries import MetricWriter
from cxflax.train.workdir import announce, prepare_workdir

HEADER = ["name", "true", "predicted", "explained", "probability", "map_max", "overlay"]


def explain(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None) -> str:
  """Overlays of the latest checkpoint of workdir (or `checkpoint`); returns the folder."""
  config = config_lib.finalize(config)
  workdir = prepare_workdir(workdir)
  run = build.load_run(checkpoint or workdir)
  if run.meta["task"] not in EXPLAINED_TASKS:
    raise ConfigError(f"--mode=explain: {run.path} is a {run.meta['task']} run; saliency maps explain "
                      "a regressed value or a class")
  e = config.explain
  if config.predict.images:
    source = image_folder(config.predict.images)
    candidates = np.arange(len(source))
  else:
    _, _, source, candidates = pipeline.split_examples(config)
  indices = _chosen(source, candidates, e, config.predict.images or f"the {config.data.eval_split} split")
  class_names = list(run.meta.get("class_names") or [])
  target = _target(e.target, class_names)
  mask_last = isinstance(run.model, PatchClassifier)
  compute = saliency_function(run.model, target, e.layer)
  batches = pipeline.eval_dataset(source, indices, pp=run.config.data.eval_pp,
                                  global_batch=min(config.eval_batch_size, len(indices)))
  out_dir = os.path.join(workdir, "explain")
  rows, overlays, used = [], [], set()
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
  for batch in batches:
    images = np.asarray(batch["image"])
    result = jax.device_get(compute(run.variables, images))
    for j in np.flatnonzero(np.asarray(batch["valid"]) > 0):
      name = source.example_name(int(batch["index"][j]))
      overlay, row = draw_saliency(result, images, batch["label"], j, class_names, mask_last, e.alpha)
      heat = np.asarray(result["map"][j], np.float64)
      png = _png_name(name)
      if png in used:  # two images of one name (classes' folders): the second keeps its index
        png = f"{os.path.splitext(png)[0]}_{int(batch['index'][j])}.png"
      used.add(png)
      path = os.path.join(out_dir, png)
      if jax.process_index() == 0:
        write_image(path, overlay)
      overlays.append(overlay)
      rows.append([name] + row + [f"{heat.max():.6g}", os.path.basename(path)])
  if jax.process_index() == 0:
    write_csv(os.path.join(out_dir, "saliency.csv"), rows, HEADER)
  writer = MetricWriter(workdir if jax.process_index() == 0 else None)
  writer.write_images(run.step, {"explain/saliency": image_grid(overlays)[None]})
  writer.close()
  announce(f"Saliency overlays of {len(rows)} images (checkpoint {run.path}) written to {out_dir}")
  return out_dir


EXPLAINED_TASKS = ("regression", "classification")  # a map explains a regressed value or a class


def saliency_function(model, target: saliency.Target = None, layer: str = ""):
  """(variables, images) -> saliency.saliency's dict, compiled once for every batch of one shape:
  the one way explain, the evaluation report and training's TensorBoard grid compute maps."""
  return jax.jit(lambda v, x: saliency.saliency(model, v, x, target, layer),
                 compiler_options=xla_cpu.compiler_options())


def draw_saliency(result: dict, images: np.ndarray, labels, j: int, class_names: list[str],
                  mask_last: bool, alpha: float = 0.4) -> tuple[np.ndarray, list[str]]:
  """(overlay picture, CSV row's true, predicted, explained, probability) of example j of a batch
  and its saliency `result`; a patch classifier's image is shown without its lung-mask channel."""
  shown = images[j, ..., :-1] if mask_last else images[j]
  title, row = _describe(result, j, labels[j], class_names)
  return render_overlay(shown, np.asarray(result["map"][j], np.float64), title, alpha), row


def report_saliency(model, variables, source, pp: str, layer: str = ""):
  """The evaluation report's saliency hook (report.Saliency) for a regression or classification
  model: (image, map) of the given eval-source examples, preprocessed by `pp` as evaluated (in
  grayscale, as render_overlay shows it: its channel mean, a patch classifier's lung mask left
  out), and its Grad-CAM (probabilistic for a patch classifier) of the predicted value or class,
  all in one compiled call. The variables are copied to this host first: only process 0 writes
  the report, so the call must not span other processes' devices."""
  compute = saliency_function(model, None, layer)
  mask_last = isinstance(model, PatchClassifier)
  host = jax.device_get(variables)

  def maps(indices: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    [batch] = list(pipeline.eval_dataset(source, indices, pp=pp, global_batch=len(indices)))
    images = np.asarray(batch["image"])
    result = jax.device_get(compute(host, images))
    shown = (images[..., :-1] if mask_last else images).mean(-1)
    by_index = {int(i): (shown[j], np.asarray(result["map"][j], np.float64))
                for j, i in enumerate(batch["index"]) if batch["valid"][j]}
    return [by_index[int(i)] for i in indices]

  return maps


def _chosen(source, candidates: np.ndarray, e, where: str) -> np.ndarray:
  """The examples to explain: those named in config.explain.images (by file name or its path as
  listed), else the first config.explain.num."""
  if not e.images:
    return candidates[:e.num]
  by_name = {}
  for i in candidates:
    name = source.example_name(int(i))
    by_name.setdefault(name, i)
    by_name.setdefault(os.path.basename(name), i)
  missing = [n for n in e.images if n not in by_name]
  if missing:
    raise DataError(f"config.explain.images: {missing[:5]} not in {where} ({len(candidates)} images, "
                    f"e.g. {[source.example_name(int(i)) for i in candidates[:3]]})")
  return np.asarray([by_name[n] for n in e.images])


def _target(value: str, class_names: list[str]) -> int | None:
  """config.explain.target as a class index, or None for the predicted class."""
  if value == "predicted":
    return None
  if not class_names:
    raise ConfigError(f"config.explain.target={value!r}: this run regresses one value, whose map is "
                      "that value's gradient; leave the target 'predicted'")
  if value in class_names:
    return class_names.index(value)
  if value.isdigit() and int(value) < len(class_names):
    return int(value)
  raise ConfigError(f"config.explain.target={value!r}: use 'predicted', a class index below "
                    f"{len(class_names)} or a class name, one of {class_names}")


def label_text(label, class_names) -> str:
  """A label as pictures show it: its class name, its value (regression), or '?' (none, or a class
  index outside the classes)."""
  value = float(label)
  if np.isnan(value):
    return "?"
  if class_names:
    return class_names[int(value)] if 0 <= value < len(class_names) else "?"
  return f"{value:.4g}"


def _describe(result: dict, j: int, label, class_names: list[str]) -> tuple[str, list[str]]:
  """The overlay's title and the CSV row's (true, predicted, explained, probability)."""
  out = result["output"]
  out = np.asarray(out["prediction"] if isinstance(out, dict) else out, np.float64)[j]
  true = label_text(label, class_names)
  if not class_names:  # regression: the map is the predicted value's gradient
    pred = f"{out[0]:.4g}"
    return f"predicted {pred} · true {true}", [true, pred, "value", ""]
  probs = np.exp(out - out.max())
  probs /= probs.sum()
  pred, explained = int(np.argmax(probs)), int(result["class"][j])
  title = f"predicted {class_names[pred]} (p={probs[pred]:.2f}) · true {true}"
  if explained != pred:
    title += f"\nmap of {class_names[explained]} (p={probs[explained]:.2f})"
  return title, [true, class_names[pred], class_names[explained], f"{probs[explained]:.6f}"]


def _png_name(name: str) -> str:
  stem = os.path.splitext(name)[0].replace(os.sep, "__").replace("/", "__")
  return f"{stem}.png"


def render_overlay(image: np.ndarray, heat: np.ndarray | None, title: str, alpha: float = 0.4) -> np.ndarray:
  """(H', W', 3) uint8 picture: `image` (H, W, C) as the model saw it, in grayscale (its channel
  mean, scaled to its own range), under `heat` (H, W) — the map at the image's size, or a mask —
  in the jet colour map scaled to the map's maximum (None: the image alone), with `title` above."""
  gray = np.asarray(image, np.float64).mean(axis=-1)
  gray = (gray - gray.min()) / max(gray.max() - gray.min(), 1e-12)
  fig = Figure(figsize=(4, 4.5), dpi=100)
  canvas = FigureCanvasAgg(fig)
  ax = fig.add_axes((0.02, 0.02, 0.96, 0.84))
  ax.imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  if heat is not None:
    ax.imshow(heat / max(float(heat.max()), 1e-12), cmap="jet", vmin=0, vmax=1, alpha=alpha,
              interpolation="nearest")
  ax.set_axis_off()
  fig.suptitle(title, fontsize=9, y=0.97)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def image_grid(images: list[np.ndarray], columns: int = 4) -> np.ndarray:
  """The pictures (all of one size) tiled row by row, white where the last row ends early."""
  h, w, c = images[0].shape
  rows = -(-len(images) // columns)
  cols = min(columns, len(images))
  grid = np.full((rows * h, cols * w, c), 255, np.uint8)
  for k, im in enumerate(images):
    r, q = divmod(k, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
  return grid
