"""The evaluation report (cxflax/train/report.py): its metrics against scikit-learn and hand
computations, the bootstrap intervals, and the files --mode=eval writes for a regression and a
classification run (and write_report for segmentation counts)."""

from __future__ import annotations

import base64
import csv
import os
import re
import statistics

import numpy as np
import pytest
from sklearn import metrics as skm

from cxflax.data.sources import make_source
from cxflax.data.sources.phantom import PhantomSource
from cxflax.train import metrics as metrics_lib
from cxflax.train import report
from tests.conftest import held_out, load_config, read_json, run_main, TINY, TINY_RUN


def _random_classifier(n=60, k=3, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]  # better than chance, not perfect
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  return np.round(probs, 1), labels  # rounded: tied scores, which AUC counts half


def test_class_statistics_match_scikit_learn_and_eval_metrics():
  probs, labels = _random_classifier()
  names = ("a", "b", "c")
  rep = report.classification_report(probs, labels, names, samples=0)
  pred = probs.argmax(1)
  cm = skm.confusion_matrix(labels, pred, labels=[0, 1, 2])
  np.testing.assert_array_equal(rep["confusion_matrix"], cm)
  np.testing.assert_allclose(rep["confusion_matrix_normalized"], cm / cm.sum(1, keepdims=True))
  ppv, sens, f1, _ = skm.precision_recall_fscore_support(labels, pred, labels=[0, 1, 2], zero_division=0)
  eval_metrics = metrics_lib.classification_metrics(pred, labels, 3, probs=probs, class_names=names)
  for k, name in enumerate(names):
    c = rep["per_class"][name]
    tn = cm.sum() - cm[k].sum() - cm[:, k].sum() + cm[k, k]
    fp, fn = cm[:, k].sum() - cm[k, k], cm[k].sum() - cm[k, k]
    assert c["sensitivity"]["value"] == pytest.approx(sens[k]) == eval_metrics[f"sensitivity/{name}"]
    assert c["ppv"]["value"] == pytest.approx(ppv[k]) == eval_metrics[f"ppv/{name}"]
    assert c["f1"]["value"] == pytest.approx(f1[k]) == eval_metrics[f"f1/{name}"]
    assert c["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    assert c["npv"]["value"] == pytest.approx(tn / (tn + fn))
    assert c["auc"]["value"] == pytest.approx(skm.roc_auc_score(labels == k, probs[:, k]))
    assert c["auc"]["value"] == pytest.approx(eval_metrics[f"auc/{name}"])
    assert c["auc"]["low"] is None  # no resamples, no interval


def test_rank_auc_matches_scikit_learn_with_ties_row_by_row():
  rng = np.random.default_rng(2)
  scores = np.round(rng.uniform(size=(5, 40)), 1)  # many ties
  positive = rng.uniform(size=(5, 40)) < 0.3
  positive[4] = False  # no positives: undefined
  aucs = metrics_lib.ranked_auc(scores, positive)
  for b in range(4):
    assert aucs[b] == pytest.approx(skm.roc_auc_score(positive[b], scores[b]), abs=1e-12)
    assert metrics_lib.binary_auc(scores[b], positive[b]) == pytest.approx(aucs[b], abs=1e-12)
  assert np.isnan(aucs[4]) and np.isnan(metrics_lib.binary_auc(scores[4], positive[4]))


def test_undefined_ratios_are_zero_and_auc_of_an_absent_class_undefined():
  """A class never predicted nor present: PPV, sensitivity, F1 0 (scikit-learn's zero_division=0);
  its AUC has no positives: None (NaN) rather than a number."""
  probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0]])
  rep = report.classification_report(probs, np.array([0, 1, 1, 0]), ("a", "b", "c"), samples=50)
  c = rep["per_class"]["c"]
  assert (c["sensitivity"]["value"], c["ppv"]["value"], c["f1"]["value"]) == (0.0, 0.0, 0.0)
  assert c["specificity"]["value"] == 1.0 and c["npv"]["value"] == 1.0
  assert c["auc"] == {"value": None, "low": None, "high": None}
  assert rep["per_class"]["a"]["sensitivity"]["value"] == 0.5 and rep["per_class"]["a"]["npv"]["value"] == 0.5


def test_bootstrap_is_seeded_chunk_independent_and_contains_the_estimate():
  probs, labels = _random_classifier(n=80, k=3, seed=1)
  a = report.classification_report(probs, labels, ("a", "b", "c"), samples=300, seed=7)
  assert report.classification_report(probs, labels, ("a", "b", "c"), samples=300, seed=7) == a
  other = report.classification_report(probs, labels, ("a", "b", "c"), samples=300, seed=8)
  assert other["per_class"]["a"]["auc"] != a["per_class"]["a"]["auc"]
  for per in a["per_class"].values():
    for e in per.values():
      assert e["low"] <= e["value"] <= e["high"] and e["low"] < e["high"]
  # The interval is the 2.5th / 97.5th percentile of the statistic over resamples drawn with the
  # seed, whether computed in one chunk or in many.
  values = np.arange(20.0) ** 2
  stat = lambda idx: values[idx].mean(1)
  whole = report.bootstrap(stat, 20, 500, seed=3)
  np.testing.assert_array_equal(report.bootstrap(stat, 20, 500, seed=3, chunk_elements=7 * 20), whole)
  idx = np.random.default_rng(3).integers(0, 20, size=(500, 20))
  np.testing.assert_allclose(whole, values[idx].mean(1))
  low, high = report.interval(whole)
  assert (low, high) == (np.percentile(whole, 2.5), np.percentile(whole, 97.5))


def test_regression_report_by_hand():
  """Errors 1, 0, 2, 0, -3, 5, -10: MAE 3, RMSE sqrt(139 / 7); per severity of the true value
  (0 normal; (0, 10] minimal, 10 included; (10, 25] moderate; ...)."""
  labels = np.array([0, 0, 5, 10, 12, 30, 80.0])
  pred = np.array([1, 0, 7, 10, 9, 35, 70.0])
  rep = report.regression_report(pred, labels, samples=400, seed=0)
  assert rep["mae"]["value"] == pytest.approx(3.0)
  assert rep["rmse"]["value"] == pytest.approx(np.sqrt(139 / 7))
  assert rep["mae"]["low"] <= 3.0 <= rep["mae"]["high"]
  got = {r["category"]: (r["n"], r["mae"], r["mean_error"]) for r in rep["severity"]}
  assert got == {"normal": (2, 0.5, 0.5), "minimal": (2, 1.0, 1.0), "moderate": (1, 3.0, -3.0),
                 "extent": (1, 5.0, 5.0), "severe": (0, None, None), "critical": (1, 10.0, -10.0)}
  # Bland-Altman: mean difference -5/7, sample standard deviation (statistics.stdev), ±1.96 sd.
  errors = [1, 0, 2, 0, -3, 5, -10]
  sd = statistics.stdev(errors)
  assert rep["agreement"] == pytest.approx({"mean_difference": -5 / 7, "sd": sd,
                                            "lower": -5 / 7 - 1.96 * sd, "upper": -5 / 7 + 1.96 * sd})


def test_segmentation_report_per_image_by_hand():
  """Image 0: lung 6 px predicted, 8 true, 4 shared: Jaccard 4/10, Dice 8/14; image 1: no lung
  predicted or present: 1 and 1 (a correct empty mask)."""
  counts = np.array([[[20, 22, 20], [4, 6, 8]], [[16, 16, 16], [0, 0, 0]]])
  rep = report.segmentation_report(counts, ("background", "lung"), samples=100)
  np.testing.assert_allclose(rep["jaccard"], [[0.4], [1.0]])
  np.testing.assert_allclose(rep["dice"], [[8 / 14], [1.0]])
  assert rep["mean"]["jaccard/lung"]["value"] == pytest.approx(0.7)
  seg = metrics_lib.segmentation_metrics(counts, ("background", "lung"))  # eval_metrics.json's, the same counts
  assert seg["dice"] == pytest.approx((8 / 14 + 1) / 2) and seg["jaccard"] == pytest.approx(0.7)


@pytest.mark.parametrize("override", ["--config.eval.bootstrap_samples=-1", "--config.eval.worst=-2"])
def test_bad_report_settings_are_config_errors(override):
  from cxflax.config import finalize
  from cxflax.errors import ConfigError
  key, value = override[len("--config."):].split("=")
  with pytest.raises(ConfigError, match=rf"config\.{key} must be >= 0, got {value}"):
    finalize(load_config("resnest.py:runlocal", override))


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _embedded_pngs(page: str) -> list[bytes]:
  return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _check_page(workdir, pngs: tuple[str, ...]) -> str:
  """report.html is self-contained: every plot of report/ embedded byte for byte, nothing loaded
  from elsewhere, no script."""
  with open(os.path.join(workdir, "report.html")) as f:
    page = f.read()
  embedded = _embedded_pngs(page)
  for name in pngs + ("worst.png",):
    with open(os.path.join(workdir, "report", name), "rb") as f:
      assert f.read() in embedded, name
  assert all(p.startswith(b"\x89PNG") for p in embedded)
  assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)
  return page


def test_eval_report_of_a_regression_run(tiny_run, tmp_path, monkeypatch):
  """predictions.csv has the evaluated examples (names, subjects and labels of the held-out fold;
  the MAE recomputed from it is eval_metrics.json's); report.json's MAE and RMSE are too; the maps
  drawn over the worst examples are Grad-CAM's."""
  drawn = []

  def plot_examples(images, titles, maps):
    drawn.append((images, maps))
    return real(images, titles, maps)

  real = report.plot_examples
  monkeypatch.setattr(report, "plot_examples", plot_examples)
  wd = tmp_path / "eval"
  run = run_main(wd, *TINY_RUN, "--config.eval.bootstrap_samples=200", "--config.eval.worst=3", mode="eval",
                 checkpoint=tiny_run[0])
  assert f"; report: {wd / 'report.html'}" in run.stdout
  ev = read_json(wd, "eval_metrics.json")
  rows = _rows(wd / "predictions.csv")
  assert len(rows) == ev["num_examples"] and list(rows[0]) == ["name", "prediction", "subject", "label"]
  source, fold = held_out(load_config("resnest.py:runlocal", *TINY, *TINY_RUN))
  expected = {source.example_name(i): (source.subjects()[i], source.labels()[i]) for i in fold}
  assert {r["name"] for r in rows} == set(expected)
  for r in rows:
    assert r["subject"] == expected[r["name"]][0]
    assert float(r["label"]) == pytest.approx(expected[r["name"]][1], abs=1e-4)
  err = np.array([float(r["prediction"]) - float(r["label"]) for r in rows])
  assert np.mean(np.abs(err)) == pytest.approx(ev["metrics"]["mae"], abs=1e-4)
  rep = read_json(wd, "report", "report.json")["regression"]
  assert rep["mae"]["value"] == pytest.approx(ev["metrics"]["mae"], rel=1e-9)
  assert rep["rmse"]["value"] == pytest.approx(ev["metrics"]["rmse"], rel=1e-9)
  assert sum(r["n"] for r in rep["severity"]) == len(rows)
  table = _rows(wd / "report" / "severity.csv")
  assert [(r["category"], int(r["n"])) for r in table] == [(r["category"], r["n"]) for r in rep["severity"]]
  page = _check_page(wd, ("scatter.png", "bland_altman.png"))
  assert f"{rep['mae']['value']:.3f} [{rep['mae']['low']:.3f}, {rep['mae']['high']:.3f}]" in page
  assert "resnet10t" in page and "Error by severity category" in page
  assert rep["agreement"]["mean_difference"] == pytest.approx(np.mean(err), abs=1e-4)
  assert f"{rep['agreement']['mean_difference']:.4f}" in page
  assert "saliency maps over the images" in page
  _check_worst_maps(tiny_run[0], source, fold, [w["name"] for w in read_json(wd, "report", "report.json")["worst"]],
                    drawn)
  # Without the report: eval_metrics.json alone, the same.
  off = tmp_path / "off"
  run = run_main(off, *TINY_RUN, "--config.eval.report=False", mode="eval", checkpoint=tiny_run[0])
  assert sorted(os.listdir(off)) == ["eval_metrics.json"] and "report:" not in run.stdout
  assert read_json(off, "eval_metrics.json") == ev


def _check_worst_maps(workdir, source, fold, worst: list[str], drawn: list) -> None:
  """The maps --mode=eval drew over the worst examples (its saliency hook) are those a direct
  saliency() call gives for those images, each preprocessed on its own as evaluated."""
  import jax
  from cxflax.data.transforms import Preprocess
  from cxflax.models.saliency import saliency
  from cxflax.train.build import load_run
  [(shown, maps)] = drawn
  by_name = {source.example_name(int(i)): int(i) for i in fold}
  run = load_run(str(workdir))
  pp = Preprocess(run.config.data.eval_pp)
  images = np.stack([pp.random_map(dict(source.load(by_name[n])), np.random.default_rng(0))["image"]
                     for n in worst])
  expected = np.asarray(jax.device_get(saliency(run.model, run.variables, images)["map"]))
  assert len(maps) == len(worst) == 3 and maps[0].shape == images.shape[1:3]
  assert expected.max() > 0  # a map with something in it, not only the ReLU's zeros
  np.testing.assert_allclose(np.stack(maps), expected, rtol=1e-3, atol=1e-4 * expected.max())
  # Drawn over the images as evaluated, in grayscale (display_image stretches each to [0, 1]).
  gray = images.mean(-1)
  lo, hi = gray.min(axis=(1, 2), keepdims=True), gray.max(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(np.stack(shown), (gray - lo) / (hi - lo), atol=1e-5)


def test_eval_report_of_a_classification_run(tmp_path):
  """A tiny 4-class run (one step, checkpointed as if preempted: no evaluation while training):
  predictions.csv's probabilities give eval_metrics.json's accuracy and AUCs; report.json's
  per-class values are eval_metrics.json's."""
  wd = tmp_path / "cls"
  args = (*TINY_RUN, "--config.data.phantom.kind=cxr", "--config.loss.name=cross_entropy",
          "--config.eval.bootstrap_samples=200", "--config.eval.worst=3")
  run_main(wd, *args, "--config.halt_after_steps=1")
  run_main(wd, *args, mode="eval")
  ev = read_json(wd, "eval_metrics.json")["metrics"]
  names = ("normal", "bacterial", "viral", "covid19")
  assert tuple(make_source(load_config("resnest.py:runlocal", *TINY, *args).data, "train").class_names) == names
  rows = _rows(wd / "predictions.csv")
  assert list(rows[0]) == ["name", "prediction"] + [f"p/{c}" for c in names] + ["subject", "label"]
  probs = np.array([[float(r[f"p/{c}"]) for c in names] for r in rows])
  labels = np.array([names.index(r["label"]) for r in rows])
  assert [r["prediction"] for r in rows] == [names[k] for k in probs.argmax(1)]
  assert np.mean(probs.argmax(1) == labels) == pytest.approx(ev["accuracy"])
  rep = read_json(wd, "report", "report.json")["classification"]
  np.testing.assert_array_equal(rep["confusion_matrix"], ev["confusion_matrix"])
  for k, c in enumerate(names):
    for key in ("sensitivity", "ppv", "f1"):
      assert rep["per_class"][c][key]["value"] == pytest.approx(ev[f"{key}/{c}"], abs=1e-12)
    if (labels == k).any() and not (labels == k).all():
      assert rep["per_class"][c]["auc"]["value"] == pytest.approx(ev[f"auc/{c}"], abs=1e-12)
      assert rep["per_class"][c]["auc"]["value"] == pytest.approx(skm.roc_auc_score(labels == k, probs[:, k]),
                                                                  abs=1e-4)
  assert len(_rows(wd / "report" / "class_metrics.csv")) == 4
  assert len(read_json(wd, "report", "report.json")["worst"]) == 3
  page = _check_page(wd, ("confusion_matrix.png", "roc.png"))
  assert "Per-class metrics" in page and all(f"<td>{c}</td>" in page for c in names)


def test_segmentation_report_files_and_saliency_hook(tmp_path):
  """write_report for segmentation counts: per_image.csv row by row; the worst images (lowest
  Jaccard first) are handed to the saliency hook, and its maps are drawn."""
  source = PhantomSource("ct", 3, 32, (1, 1), seed=0)
  counts = np.array([[[90, 100, 100], [5, 10, 10]], [[95, 100, 100], [9, 10, 10]], [[99, 100, 100], [0, 1, 2]]])
  result = {"pred": counts, "label": counts[..., 2], "index": np.array([2, 0, 1])}
  seen = []

  def saliency(indices):
    seen.append(list(indices))
    return [(source.load(int(i))["image"], np.outer(np.arange(8), np.arange(8))) for i in indices]

  data = report.write_report(str(tmp_path), "segmentation", result, source, ("background", "lung"),
                             {"jaccard": 0.5}, summary={"model": "fc_densenet"}, samples=50, worst=2,
                             saliency=saliency)
  rows = _rows(tmp_path / "report" / "per_image.csv")
  assert [r["name"] for r in rows] == [source.example_name(i) for i in (2, 0, 1)]
  np.testing.assert_allclose([float(r["jaccard/lung"]) for r in rows], [5 / 15, 9 / 11, 0 / 3], atol=1e-6)
  np.testing.assert_allclose([float(r["dice/lung"]) for r in rows], [10 / 20, 18 / 20, 0 / 3], atol=1e-6)
  assert seen == [[1, 2]]  # eval-source indices, worst (Jaccard 0) first
  assert [w["name"] for w in data["worst"]] == [source.example_name(1), source.example_name(2)]
  assert not os.path.exists(tmp_path / "predictions.csv")
  page = _check_page(tmp_path, ("overlap.png",))
  assert "saliency maps over the images" in page

