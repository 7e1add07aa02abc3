"""The evaluation report --mode=eval writes beside eval_metrics.json: the predictions of every
example, the metrics with bootstrap confidence intervals, tables and plots, and one
self-contained report.html (images embedded as data URIs, no scripts: it opens offline).

The papers report per-class sensitivity, PPV and F1, confusion matrices and ROC curves (seeds 002,
003, 004) and MAE / RMSE (seeds 000, 001); a single number over a few hundred examples says little
without its uncertainty, and people trust a model after they have looked at its worst cases.

Files: WORKDIR/predictions.csv, WORKDIR/report.html and WORKDIR/report/ (report.json with every
number of the page, the tables as CSV, the plots as PNG).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
import warnings
from typing import Callable, Sequence

import numpy as np
from absl import logging

from cxflax.data.sources import SEVERITY_NAMES, severity_class
from cxflax.files import atomic_file, write_csv
from cxflax.train import metrics as metrics_lib
from cxflax.train.predict import prediction_row

CLASS_STATS = ("sensitivity", "specificity", "ppv", "npv", "f1")
# The severity bins of the regressed infection percentage (Per-COVID-19's categories, the ones
# seed 001's folds are stratified by; cxflax/data/sources/per_covid19.py).
SEVERITY_RANGES = ("0 %", "(0, 10] %", "(10, 25] %", "(25, 50] %", "(50, 75] %", "(75, 100] %")
# A saliency hook: given the eval-source indices of the worst-predicted examples, one (image, map)
# pair per example: the image as the model saw it (its preprocessing may crop the source's image,
# which is therefore not the map's frame), shown in place of the source's, and the 2-D map of it
# (any size; stretched over the image). --mode=eval fills it with Grad-CAM
# (explain.report_saliency); without one the source's images are shown alone.
Saliency = Callable[[np.ndarray], Sequence[tuple[np.ndarray, np.ndarray]]]


# --- bootstrap ---------------------------------------------------------------------------------------


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, samples: int, seed: int,
              chunk_elements: int = 2_000_000) -> np.ndarray:
  """`statistic` of `samples` resamples (with replacement, seeded) of n examples: statistic takes
  index arrays (B, n) and returns (B, ...). Computed in chunks of resamples, so that big
  evaluation sets do not hold samples x n arrays at once."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, size=(samples, n))
  step = max(1, chunk_elements // max(n, 1))
  return np.concatenate([statistic(idx[s:s + step]) for s in range(0, samples, step)])


def interval(values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """Percentile bootstrap interval over axis 0, ignoring resamples where the statistic is
  undefined (NaN, e.g. an AUC of a resample without positives)."""
  tail = 100 * (1 - level) / 2
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a statistic never defined stays NaN
    return np.nanpercentile(values, tail, axis=0), np.nanpercentile(values, 100 - tail, axis=0)


def _estimate(value, low, high) -> dict:
  return {"value": _num(value), "low": _num(low), "high": _num(high)}


def _num(x) -> float | None:
  """A float for JSON, None where undefined."""
  x = float(x)
  return None if np.isnan(x) else x


# --- classification ----------------------------------------------------------------------------------


def class_statistics(cm: np.ndarray) -> dict[str, np.ndarray]:
  """One-vs-rest sensitivity, specificity, PPV, NPV and F1 per class from confusion matrices
  counts[..., true, predicted]; a ratio with nothing to count is 0 (scikit-learn's
  zero_division=0, and eval_metrics.json's convention)."""
  cm = np.asarray(cm, np.float64)
  total = cm.sum((-2, -1))[..., None]
  tp = np.diagonal(cm, axis1=-2, axis2=-1)
  actual, predicted = cm.sum(-1), cm.sum(-2)
  fn, fp = actual - tp, predicted - tp
  tn = total - tp - fn - fp
  ratio = lambda a, b: np.where(b > 0, a / np.maximum(b, 1e-300), 0.0)
  return {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
          "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn)}


def classification_report(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                          samples: int = 1000, seed: int = 0) -> dict:
  """Per class: sensitivity, specificity, PPV, NPV, F1 and one-vs-rest AUC, each with a 95 %
  bootstrap interval over examples; the confusion matrix (counts and row-normalised)."""
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
  k, n = len(class_names), len(labels)
  pred = probs.argmax(-1)

  def stats(idx):  # (B, n) -> (B, statistic, class)
    b = len(idx)
    flat = (np.arange(b)[:, None] * k + labels[idx]) * k + pred[idx]
    cms = np.bincount(flat.ravel(), minlength=b * k * k).reshape(b, k, k)
    s = class_statistics(cms)
    aucs = np.stack([metrics_lib.ranked_auc(probs[idx, c], labels[idx] == c) for c in range(k)], -1)
    return np.stack([s[name] for name in CLASS_STATS] + [aucs], 1)

  point = stats(np.arange(n)[None])[0]
  low, high = interval(bootstrap(stats, n, samples, seed)) if samples else (point * np.nan,) * 2
  names = CLASS_STATS + ("auc",)
  per_class = {c: {s: _estimate(point[j, i], low[j, i], high[j, i]) for j, s in enumerate(names)}
               for i, c in enumerate(class_names)}
  cm = metrics_lib.confusion_matrix(pred, labels, k)
  rows = cm.sum(1, keepdims=True)
  return {"per_class": per_class, "confusion_matrix": cm.tolist(),
          "confusion_matrix_normalized": np.where(rows > 0, cm / np.maximum(rows, 1), 0.0).tolist(),
          "bootstrap": {"samples": samples, "seed": seed, "level": 0.95}}


# --- regression --------------------------------------------------------------------------------------


def regression_report(pred: np.ndarray, labels: np.ndarray, samples: int = 1000, seed: int = 0) -> dict:
  """MAE and RMSE with 95 % bootstrap intervals; MAE and RMSE per severity category of the true
  value (SEVERITY_NAMES / SEVERITY_RANGES); Bland and Altman's agreement: the mean difference
  (prediction - truth) and its 95 % limits of agreement, mean ± 1.96 standard deviations."""
  pred, labels = np.asarray(pred, np.float64), np.asarray(labels, np.float64)
  err = pred - labels
  sd = err.std(ddof=1) if len(err) > 1 else 0.0
  agreement = {"mean_difference": _num(err.mean()), "sd": _num(sd),
               "lower": _num(err.mean() - 1.96 * sd), "upper": _num(err.mean() + 1.96 * sd)}

  def stats(idx):
    e = err[idx]
    return np.stack([np.abs(e).mean(-1), np.sqrt((e ** 2).mean(-1))], -1)

  point = stats(np.arange(len(err))[None])[0]
  low, high = interval(bootstrap(stats, len(err), samples, seed)) if samples else (point * np.nan,) * 2
  category = np.array([severity_class(v) for v in labels])
  severity = []
  for c, name in enumerate(SEVERITY_NAMES):
    e = err[category == c]
    severity.append({"category": name, "range": SEVERITY_RANGES[c], "n": int(len(e)),
                     "mae": _num(np.abs(e).mean()) if len(e) else None,
                     "rmse": _num(np.sqrt((e ** 2).mean())) if len(e) else None,
                     "mean_error": _num(e.mean()) if len(e) else None})
  return {"mae": _estimate(point[0], low[0], high[0]), "rmse": _estimate(point[1], low[1], high[1]),
          "severity": severity, "agreement": agreement,
          "bootstrap": {"samples": samples, "seed": seed, "level": 0.95}}


# --- segmentation ------------------------------------------------------------------------------------


def segmentation_report(counts: np.ndarray, class_names: Sequence[str], samples: int = 1000,
                        seed: int = 0) -> dict:
  """Jaccard and Dice per image and foreground class (from the eval step's pixel counts), and
  their means over images with 95 % bootstrap intervals."""
  jaccard, dice = metrics_lib.overlap_scores(counts)
  fg = list(class_names)[1:]
  scores = np.concatenate([jaccard[:, 1:], dice[:, 1:]], 1)  # (N, 2 * foreground)
  stats = lambda idx: scores[idx].mean(1)
  point = scores.mean(0)
  low, high = interval(bootstrap(stats, len(scores), samples, seed)) if samples else (point * np.nan,) * 2
  summary = {}
  for j, key in enumerate([f"jaccard/{c}" for c in fg] + [f"dice/{c}" for c in fg]):
    summary[key] = _estimate(point[j], low[j], high[j])
  return {"mean": summary, "jaccard": jaccard[:, 1:].tolist(), "dice": dice[:, 1:].tolist(),
          "bootstrap": {"samples": samples, "seed": seed, "level": 0.95}}


# --- plots -------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _png(fig) -> bytes:
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return buf.getvalue()


def plot_confusion(cm: np.ndarray, class_names: Sequence[str]) -> bytes:
  """Counts and row-normalised confusion matrices side by side, every cell annotated."""
  cm = np.asarray(cm)
  norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
  k = len(class_names)
  size = max(3.2, 0.75 * k + 1.8)
  fig = _figure(2 * size + 0.6, size)
  panels = [(cm, "counts", "{:d}"), (norm, "row-normalised (recall)", "{:.2f}")]
  for j, (values, title, fmt) in enumerate(panels):
    ax = fig.add_subplot(1, 2, j + 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for (t, p), v in np.ndenumerate(values):
      ax.text(p, t, fmt.format(v.item()), ha="center", va="center",
              color="white" if norm[t, p] > 0.5 else "black", fontsize=10)
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
  return _png(fig)


def plot_roc(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], per_class: dict) -> bytes:
  """One-vs-rest ROC curve per class (scikit-learn's roc_curve), the AUC and its interval in the
  legend."""
  from sklearn.metrics import roc_curve
  fig = _figure(5.6, 5.0)
  ax = fig.add_subplot()
  for k, name in enumerate(class_names):
    positive = np.asarray(labels) == k
    if positive.all() or not positive.any():
      continue
    fpr, tpr, _ = roc_curve(positive, probs[:, k])
    a = per_class[name]["auc"]
    ci = f" [{a['low']:.2f}, {a['high']:.2f}]" if a["low"] is not None else ""
    ax.plot(fpr, tpr, linewidth=2, label=f"{name}: AUC {a['value']:.3f}{ci}")
  ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="chance")
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_xlabel("1 - specificity (false positive rate)")
  ax.set_ylabel("sensitivity (true positive rate)")
  ax.set_title("ROC, one class vs the rest (95 % CI)")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=9)
  return _png(fig)


def plot_regression(pred: np.ndarray, labels: np.ndarray, agreement: dict) -> tuple[bytes, bytes]:
  """Prediction against truth (the identity dashed), and the Bland–Altman plot: the difference
  against the mean of the two, with regression_report's mean difference and its 95 % limits of
  agreement."""
  pred, labels = np.asarray(pred, np.float64), np.asarray(labels, np.float64)
  lo, hi = min(pred.min(), labels.min()), max(pred.max(), labels.max())
  pad = 0.05 * (hi - lo or 1)
  fig = _figure(5.0, 5.0)
  ax = fig.add_subplot()
  ax.scatter(labels, pred, s=14, alpha=0.6, color="navy", edgecolors="none")
  ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="red", linestyle="--", linewidth=1, label="y = x")
  ax.set_xlim(lo - pad, hi + pad)
  ax.set_ylim(lo - pad, hi + pad)
  ax.set_xlabel("true value")
  ax.set_ylabel("prediction")
  ax.set_title(f"prediction vs truth (n={len(pred)})")
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left")
  scatter = _png(fig)
  bias, lower, upper = (agreement[k] for k in ("mean_difference", "lower", "upper"))
  fig = _figure(6.4, 4.6)
  ax = fig.add_subplot()
  ax.scatter((pred + labels) / 2, pred - labels, s=14, alpha=0.6, color="navy", edgecolors="none")
  ax.axhline(bias, color="red", linewidth=1.5, label=f"mean difference {bias:.2f}")
  for limit in (lower, upper):
    ax.axhline(limit, color="red", linestyle="--", linewidth=1)
  ax.plot([], [], color="red", linestyle="--", linewidth=1,
          label=f"95 % limits of agreement [{lower:.2f}, {upper:.2f}]")
  ax.set_xlabel("mean of prediction and truth")
  ax.set_ylabel("prediction - truth")
  ax.set_title("Bland-Altman")
  ax.grid(alpha=0.3)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=9, frameon=False)
  return scatter, _png(fig)


def plot_overlap(report: dict, class_names: Sequence[str]) -> bytes:
  """Histograms of the per-image Jaccard index and Dice coefficient of each foreground class."""
  fig = _figure(8.0, 3.6)
  fg = list(class_names)[1:]
  for j, key in enumerate(("jaccard", "dice")):
    ax = fig.add_subplot(1, 2, j + 1)
    values = np.asarray(report[key])
    for c, name in enumerate(fg):
      ax.hist(values[:, c], bins=np.linspace(0, 1, 21), alpha=0.7, label=name)
    ax.set_xlabel(f"{key} per image")
    ax.set_ylabel("images")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
  return _png(fig)


def plot_examples(images: Sequence[np.ndarray], titles: Sequence[str],
                  maps: Sequence[np.ndarray] | None) -> bytes:
  """The given images in a row (at most 4 a row), each titled; saliency maps over them where given."""
  cols = min(4, len(images))
  rows = -(-len(images) // cols)
  fig = _figure(3.0 * cols, 3.3 * rows)
  for i, (image, title) in enumerate(zip(images, titles)):
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    if maps is not None and maps[i] is not None:
      h, w = image.shape[:2]
      ax.imshow(np.asarray(maps[i], np.float64), cmap="jet", alpha=0.4, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    ax.set_title(title, fontsize=9)
    ax.axis("off")
  return _png(fig)


def display_image(image: np.ndarray) -> np.ndarray:
  """An image as a source loads it (uint8, uint16 or float, 1 or 3 channels) stretched to [0, 1]
  for display: (H, W) grey or (H, W, 3)."""
  x = np.asarray(image, np.float64)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  x = x[..., :3] if x.ndim == 3 else x
  lo, hi = x.min(), x.max()
  return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


# --- the report --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Part:
  """A task's share of the report: its numbers, HTML tables, plots, and how bad each example's
  prediction is (higher: worse) with a line saying why."""
  data: dict
  sections: list
  plots: dict
  badness: np.ndarray
  describe: Callable[[int], str]


def write_report(workdir: str, task_name: str, result: dict, source, class_names, metrics: dict, *,
                 summary: dict, config_text: str = "", round_predictions: bool = False,
                 samples: int = 1000, seed: int = 0, worst: int = 8, saliency: Saliency | None = None) -> dict:
  """Writes predictions.csv (regression, classification), report/ and report.html in workdir for
  an evaluation `result` ('pred', 'label', 'index': eval-source indices) of `source`; `metrics`
  are eval_metrics.json's, shown beside; `summary` the run's settings for the page's table and
  config_text the whole config (shown folded). Returns what report/report.json holds."""
  make = {"classification": _classification, "regression": _regression, "segmentation": _segmentation}
  if task_name not in make:
    logging.info("no evaluation report for a %s task", task_name)
    return {}
  out_dir = os.path.join(workdir, "report")
  os.makedirs(out_dir, exist_ok=True)
  index = np.asarray(result["index"], np.int64)
  all_subjects = source.subjects()
  names = [source.example_name(int(i)) for i in index]
  subjects = [all_subjects[int(i)] for i in index]
  part = make[task_name](workdir, out_dir, np.asarray(result["pred"]), np.asarray(result["label"]), names,
                         subjects, class_names, round_predictions, samples, seed)
  data, plots = {"summary": summary, task_name: part.data}, dict(part.plots)
  order = np.argsort(-part.badness, kind="stable")[:worst]
  if len(order):
    if saliency is not None:
      seen, maps = zip(*saliency(index[order]))
      images = [display_image(image) for image in seen]
    else:
      maps, images = None, [display_image(source.load(int(index[i]))["image"]) for i in order]
    plots["worst.png"] = plot_examples(images, [f"{names[i]}\n{part.describe(i)}" for i in order], maps)
    data["worst"] = [{"name": names[i], "subject": subjects[i], "what": part.describe(i)} for i in order]
  for name, png in plots.items():
    with atomic_file(os.path.join(out_dir, name), "wb") as f:
      f.write(png)
  with atomic_file(os.path.join(out_dir, "report.json")) as f:
    json.dump(data, f, indent=2)
  page = _html(summary, metrics, part.sections, plots, data.get("worst", []), task_name,
               with_saliency=saliency is not None, config_text=config_text)
  with atomic_file(os.path.join(workdir, "report.html")) as f:
    f.write(page)
  return data


def _classification(workdir, out_dir, probs, labels, names, subjects, class_names, round_predictions,
                    samples, seed) -> _Part:
  rep = classification_report(probs, labels, class_names, samples, seed)
  _write_predictions(os.path.join(workdir, "predictions.csv"), names, subjects, probs,
                     [class_names[int(v)] for v in labels], class_names, round_predictions)
  stats = CLASS_STATS + ("auc",)
  write_csv(os.path.join(out_dir, "class_metrics.csv"),
            [[c] + [_cell(rep["per_class"][c][s][x]) for s in stats for x in ("value", "low", "high")]
             for c in class_names],
            ["class"] + [f"{s}{x}" for s in stats for x in ("", " low", " high")])
  write_csv(os.path.join(out_dir, "confusion_matrix.csv"),
            [[c] + list(r) for c, r in zip(class_names, rep["confusion_matrix"])],
            ["true \\ predicted", *class_names])
  table = _table(["class", "sensitivity", "specificity", "PPV", "NPV", "F1", "AUC"],
                 [[c] + [_with_ci(rep["per_class"][c][s]) for s in stats] for c in class_names])
  plots = {"confusion_matrix.png": plot_confusion(rep["confusion_matrix"], class_names),
           "roc.png": plot_roc(probs, labels, class_names, rep["per_class"])}
  truth = labels.astype(np.int64)
  return _Part(rep, [("Per-class metrics (95 % bootstrap intervals)", table)], plots,
               -probs[np.arange(len(truth)), truth],  # the lower the true class's probability, the worse
               lambda i: (f"true {class_names[truth[i]]}, predicted {class_names[int(probs[i].argmax())]} "
                          f"(p={probs[i].max():.2f})"))


def _regression(workdir, out_dir, pred, labels, names, subjects, class_names, round_predictions,
                samples, seed) -> _Part:
  value = np.round(pred) if round_predictions else pred  # as eval_metrics.json scores it
  rep = regression_report(value, labels, samples, seed)
  _write_predictions(os.path.join(workdir, "predictions.csv"), names, subjects, value,
                     [f"{v:.4f}" for v in labels], None, round_predictions)
  severity = [[r["category"], r["range"], r["n"], _cell(r["mae"]), _cell(r["rmse"]), _cell(r["mean_error"])]
              for r in rep["severity"]]
  write_csv(os.path.join(out_dir, "severity.csv"), severity,
            ["category", "range", "n", "mae", "rmse", "mean_error"])
  agree = rep["agreement"]
  sections = [("Error (95 % bootstrap intervals)",
               _table(["metric", "value"], [["MAE", _with_ci(rep["mae"])], ["RMSE", _with_ci(rep["rmse"])]])),
              ("Error by severity category of the true value",
               _table(["category", "range", "n", "MAE", "RMSE", "mean error"], severity)),
              ("Agreement (Bland-Altman: prediction - truth)",
               _table(["mean difference", "sd", "95 % limits of agreement"],
                      [[_cell(agree["mean_difference"]), _cell(agree["sd"]),
                        f"[{_cell(agree['lower'])}, {_cell(agree['upper'])}]"]]))]
  scatter, bland_altman = plot_regression(value, labels, agree)
  return _Part(rep, sections, {"scatter.png": scatter, "bland_altman.png": bland_altman},
               np.abs(value - labels), lambda i: f"true {labels[i]:.1f}, predicted {value[i]:.1f}")


def _segmentation(workdir, out_dir, counts, labels, names, subjects, class_names, round_predictions,
                  samples, seed) -> _Part:
  rep = segmentation_report(counts, class_names, samples, seed)
  fg = list(class_names)[1:]
  jac, dice = np.asarray(rep["jaccard"]), np.asarray(rep["dice"])
  write_csv(os.path.join(out_dir, "per_image.csv"),
            [[n, s, *[f"{v:.6f}" for v in j], *[f"{v:.6f}" for v in d]]
             for n, s, j, d in zip(names, subjects, jac, dice)],
            ["name", "subject", *[f"jaccard/{c}" for c in fg], *[f"dice/{c}" for c in fg]])
  table = _table(["metric", "value"], [[k, _with_ci(v)] for k, v in rep["mean"].items()])
  return _Part(rep, [("Overlap, mean over images (95 % bootstrap intervals)", table)],
               {"overlap.png": plot_overlap(rep, class_names)}, -jac.mean(1),
               lambda i: f"Jaccard {jac[i].mean():.3f}, Dice {dice[i].mean():.3f}")


def _write_predictions(path, names, subjects, preds, labels, class_names, round_value) -> None:
  """predictions.csv: --mode=predict's columns (prediction_row), then subject and label, with a
  header row."""
  header = ["name", "prediction"] + [f"p/{c}" for c in class_names or ()] + ["subject", "label"]
  write_csv(path, [prediction_row(n, p, class_names, round_value) + [s, l]
                   for n, p, s, l in zip(names, preds, subjects, labels)], header)


# --- HTML --------------------------------------------------------------------------------------------

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#eef}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.3em 0}h2{border-bottom:1px solid #ccc}
.small{color:#666;font-size:90%}"""


def _cell(x) -> str:
  return "–" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def _with_ci(e: dict) -> str:
  if e["value"] is None:
    return "–"
  if e["low"] is None:
    return f"{e['value']:.3f}"
  return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


def _table(header, rows) -> str:
  head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
  return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _html(summary: dict, metrics: dict, sections, plots: dict, worst: list, task_name: str,
          with_saliency: bool, config_text: str) -> str:
  scalars = metrics_lib.scalar_metrics(metrics)
  parts = [f"<h1>Evaluation report</h1><p class=small>{html.escape(str(summary.get('checkpoint', '')))}</p>",
           "<h2>Run</h2>", _table(["setting", "value"], [[k, v] for k, v in summary.items() if k != "config"]),
           "<h2>Metrics (eval_metrics.json)</h2>",
           _table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in scalars.items()])]
  for title, table in sections:
    parts += [f"<h2>{html.escape(title)}</h2>", table]
  parts.append("<h2>Plots</h2>")
  parts += [_img(png, name) for name, png in plots.items() if name != "worst.png"]
  if "worst.png" in plots:
    what = ("saliency maps over the images (red: what drove the prediction)" if with_saliency
            else "no saliency maps in this report")
    column = "overlap" if task_name == "segmentation" else "label and prediction"
    parts += [f"<h2>Worst-predicted examples</h2><p class=small>{html.escape(what)}</p>",
              _table(["name", "subject", column], [[w["name"], w["subject"], w["what"]] for w in worst]),
              _img(plots["worst.png"], "worst-predicted examples")]
  if config_text:
    parts.append("<h2>Full config</h2><details><summary>show</summary>"
                 f"<pre>{html.escape(config_text)}</pre></details>")
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cxflax evaluation report</title>"
          f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
