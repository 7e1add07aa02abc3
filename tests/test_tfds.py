"""TFDS builders: phantom data exported into each layout, built into ArrayRecord, read back
through tfds.data_source in a process where importing TensorFlow fails."""

import json
import textwrap

import numpy as np
import pytest

from cxflax.config import base_config
from cxflax.data import export
from cxflax.data.sources import make_source
from tests.conftest import run_python

LAYOUTS = {  # builder → (export function, kwargs, tfds_name to read back)
    "per_covid19": (export.export_per_covid19, dict(num_subjects=4, num_val_subjects=2, val_labels=True), "per_covid19"),
    "covidx": (export.export_covidx, dict(num_subjects=16, four_class=True), "covidx4"),
    "covid_ct": (export.export_covid_ct, dict(num_subjects=10), "covid_ct"),
    "flannel": (export.export_flannel, dict(num_subjects=16), "flannel"),
}

_READ = textwrap.dedent("""
    import builtins, json, sys
    real = builtins.__import__
    def guard(name, *a, **k):
      if name == "tensorflow" or name.startswith("tensorflow."):
        raise ImportError("TensorFlow is blocked on the read path")
      return real(name, *a, **k)
    builtins.__import__ = guard
    from cxflax.data.sources.tfds import TfdsSource
    out = {}
    for name, split in json.loads(sys.argv[2]):
      s = TfdsSource(name, split, sys.argv[1])
      out[f"{name}/{split}"] = {
          "labels": [float(v) for v in s.labels()], "subjects": s.subjects(),
          "names": [s.example_name(i) for i in range(len(s))],
          "sums": [int(s.load(i)["image"].astype("int64").sum()) for i in range(len(s))],
          "classes": list(s.class_names or [])}
    out["tensorflow_imported"] = any(m.split(".")[0] == "tensorflow" for m in sys.modules)
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Every layout exported and built into one TFDS data_dir; per_covid19 through the two commands
  a user types (python -m cxflax.data.export, python -m cxflax.data.build_tfds)."""
  from cxflax.data import tfds_builders
  base = tmp_path_factory.mktemp("tfds")
  data_dir = str(base / "data")
  sources = {}
  for builder, (fn, kw, _) in LAYOUTS.items():
    manual = str(base / builder)
    if builder == "per_covid19":
      for command, said in (
          (["cxflax.data.export", "per_covid19", "--out", manual, "--subjects", "4", "--size", "32",
            "--seed", "2", "--val-subjects", "2", "--val-labels"], f"wrote the per_covid19 layout to {manual}"),
          (["cxflax.data.build_tfds", "--dataset", "per_covid19", "--manual_dir", manual, "--data_dir", data_dir],
           "built cxflax_per_covid19 into")):
        proc = run_python("", args=["-m", *command])
        assert proc.returncode == 0 and said in proc.stdout, proc.stderr[-3000:]
    else:
      fn(manual, image_size=32, seed=2, **kw)
      tfds_builders.build(builder, manual, data_dir, "four_class" if builder == "covidx" else None)
    d = base_config().data
    d.source, d.root = builder, manual
    if builder == "covidx":
      d.class_names = ("normal", "bacteria", "viral", "COVID-19")
    splits = ["train"] + {"per_covid19": ["val"], "covidx": ["test"], "covid_ct": ["val", "test"]}.get(builder, [])
    sources[builder] = {s: make_source(d, s) for s in splits}
  return data_dir, sources


def test_builds_read_back_without_tensorflow(built):
  data_dir, sources = built
  wanted = [(LAYOUTS[b][2], split) for b, splits in sources.items() for split in splits]
  proc = run_python(_READ, args=["-c", _READ, data_dir, json.dumps(wanted)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert out["tensorflow_imported"] is False
  for builder, splits in sources.items():
    for split, src in splits.items():
      got = out[f"{LAYOUTS[builder][2]}/{split}"]
      assert len(got["labels"]) == len(src)
      # ArrayRecord order is tfds' own: compare example by example through the file name.
      expected = {}
      for i in range(len(src)):
        import os
        img = src.load(i)["image"]
        gray = img if img.shape[-1] == 1 else np.round(img.astype(np.float32) @ [0.299, 0.587, 0.114])
        expected[os.path.basename(src.paths[i])] = (float(src.labels()[i]), src.subjects()[i], int(gray.sum()))
      for name, label, subject, total in zip(got["names"], got["labels"], got["subjects"], got["sums"]):
        exp_label, exp_subject, exp_total = expected[name]
        assert label == pytest.approx(exp_label, abs=1e-4) and subject == exp_subject
        assert abs(total - exp_total) <= 32 * 32  # RGB → 8-bit gray rounds per pixel
      if src.class_names:
        assert got["classes"] == list(src.class_names)


def test_tfds_source_feeds_the_pipeline(built):
  from cxflax.data import pipeline
  from cxflax.data.sources.tfds import TfdsSource
  data_dir, _ = built
  src = TfdsSource("per_covid19", "train", data_dir)
  batch = next(iter(pipeline.train_dataset(src, np.arange(len(src)), pp="to_rgb|flip_lr(0.5)",
                                           global_batch=4, seed=0, workers=1)))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].dtype == np.float32


def test_training_reads_a_tfds_build(built, tmp_path):
  """data.source=tfds trains on the ArrayRecord build and evaluates on its val split: the
  reported metric is the checkpoint's on the build's val examples, recomputed here."""
  from cxflax.data.sources.tfds import TfdsSource
  from tests.conftest import TINY_RUN, checkpoint_predictions, read_json, run_main
  data_dir, sources = built
  wd = str(tmp_path / "w")
  run = run_main(wd, *TINY_RUN, "--config.data.source=tfds", "--config.data.tfds_name=per_covid19",
                 f"--config.data.root={data_dir}", "--config.data.eval_split=val")
  val = TfdsSource("per_covid19", "val", data_dir)
  assert f"{len(sources['per_covid19']['train'])} training / {len(val)} evaluation examples" in run.log
  pred = checkpoint_predictions(wd, val, np.arange(len(val)))
  assert read_json(wd, "final_metrics.json")["metrics"]["mae"] == pytest.approx(
      np.mean(np.abs(pred - val.labels())), rel=1e-4)
