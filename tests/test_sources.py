"""Every dataset layout, written from phantom data by cxflax.data.export and read back; DICOM;
and the errors (or counted skips) for bad data."""

import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from cxflax.data import export
from cxflax.data.images import read_dicom, read_image
from cxflax.data.phantom import CXR_CLASS_NAMES, Phantom
from cxflax.data.sources import FLANNEL_CLASSES, PhantomSource, known_sources, make_source, register
from cxflax.errors import ConfigError, DataError
from tests.conftest import data_config


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  """Each layout exported once, small (32 px)."""
  base = tmp_path_factory.mktemp("layouts")
  out = {}
  for name, fn, kw in [
      ("per_covid19", export.export_per_covid19, dict(num_subjects=6, num_val_subjects=2, val_labels=True)),
      ("per_covid19_original", export.export_per_covid19_original, dict(num_subjects=6)),
      ("covidx", export.export_covidx, dict(num_subjects=24)),
      ("covidx4", lambda r, **k: export.export_covidx(r, four_class=True, **k), dict(num_subjects=24)),
      ("covid_ct", export.export_covid_ct, dict(num_subjects=12)),
      ("flannel", export.export_flannel, dict(num_subjects=24)),
      ("folder", export.export_folder, dict(num_subjects=12)),
      ("csv", export.export_csv, dict(num_subjects=12))]:
    out[name] = base / name
    fn(str(out[name]), image_size=32, seed=3, **kw)
  return out


def test_per_covid19_challenge_and_original_release(layouts):
  truth = Phantom("ct", 6, 32, seed=3)
  expected = np.array([truth.percentage(i) for i in range(len(truth))], np.float32)
  for key in ("per_covid19", "per_covid19_original"):
    src = make_source(data_config("per_covid19", layouts[key]))
    np.testing.assert_allclose(src.labels(), expected, atol=1e-4)
    assert src.subjects() == [f"phantom{truth.subject(i):05d}" for i in range(len(truth))]
    np.testing.assert_array_equal(src.load(3)["image"], truth[3]["image"])
  val = make_source(data_config("per_covid19", layouts["per_covid19"]), "val")
  assert len(val) == len(Phantom("ct", 2, 32, seed=4))


@pytest.mark.parametrize("key,classes", [
    ("covidx", ("normal", "pneumonia", "COVID-19")),
    ("covidx4", ("normal", "bacteria", "viral", "COVID-19"))])
def test_covidx_three_and_four_classes(layouts, key, classes):
  src = make_source(data_config("covidx", layouts[key]))
  test = make_source(data_config("covidx", layouts[key]), "test")
  assert src.class_names == classes and test.class_names == classes
  truth = Phantom("cxr", 24, 32, (1, 2), seed=3)
  by_subject = {f"phantom{s:05d}": CXR_CLASS_NAMES[truth.subject_class(s)] for s in range(24)}
  mapping = ({"normal": "normal", "bacterial": "pneumonia", "viral": "pneumonia", "covid19": "COVID-19"}
             if len(classes) == 3 else
             {"normal": "normal", "bacterial": "bacteria", "viral": "viral", "covid19": "COVID-19"})
  for s in (src, test):
    for label, subject in zip(s.labels(), s.subjects()):
      assert classes[label] == mapping[by_subject[subject]]
  assert not set(src.subjects()) & set(test.subjects())
  assert src.load(0)["image"].shape == (32, 32, 3)


def test_covid_ct_splits_and_percent_names(layouts):
  d = data_config("covid_ct", layouts["covid_ct"])
  splits = {s: make_source(d, s) for s in ("train", "val", "test")}
  assert all(len(s) > 0 for s in splits.values())
  assert any("%" in p for p in splits["train"].paths)
  truth = Phantom("ct", 12, 32, (2, 4), seed=3)
  for s in splits.values():
    for i in range(len(s)):
      index = int(os.path.basename(s.paths[i]).split("%")[1].split(".")[0])
      assert s.labels()[i] == int(truth.percentage(index) > 0)
      np.testing.assert_array_equal(s.load(i)["image"], truth[index]["image"])


def test_flannel_uses_ap_pa_xrays_and_kaggle_names(layouts):
  src = make_source(data_config("flannel", layouts["flannel"]))
  assert src.class_names == FLANNEL_CLASSES
  assert not any("lateral" in p or p.endswith("ct.png") for p in src.paths)
  for path, label in zip(src.paths, src.labels()):
    name = os.path.basename(path)
    if "NORMAL" in path:
      assert FLANNEL_CLASSES[label] == "normal"
    elif "_virus_" in name:
      assert FLANNEL_CLASSES[label] == "viral"
    elif "_bacteria_" in name:
      assert FLANNEL_CLASSES[label] == "bacterial"
  assert set(src.labels()) == {0, 1, 2, 3}


def test_folder_and_csv(layouts):
  folder = make_source(data_config("folder", layouts["folder"]))
  assert folder.class_names == tuple(sorted(CXR_CLASS_NAMES))
  ordered = make_source(data_config("folder", layouts["folder"], class_names=CXR_CLASS_NAMES))
  assert ordered.class_names == CXR_CLASS_NAMES
  for p, label in zip(ordered.paths, ordered.labels()):
    assert os.path.basename(os.path.dirname(p)) == CXR_CLASS_NAMES[label]
  table = make_source(data_config("csv", layouts["csv"], train_file="train.csv", class_names=CXR_CLASS_NAMES))
  truth = Phantom("cxr", 12, 32, (1, 2), seed=3)
  assert [CXR_CLASS_NAMES[v] for v in table.labels()] == [
      CXR_CLASS_NAMES[truth.subject_class(truth.subject(i))] for i in range(len(truth))]


def test_csv_regression_labels(tmp_path):
  (tmp_path / "a.png").write_bytes(b"")
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
  (tmp_path / "t.csv").write_text("image,target\na.png,12.5\na.png,0\n")
  src = make_source(data_config("csv", tmp_path, train_file="t.csv"))
  assert src.task == "regression" and list(src.labels()) == [12.5, 0.0]


# --- bad data -------------------------------------------------------------------------------------


def _broken_copy(layouts, tmp_path, key="per_covid19"):
  root = tmp_path / key
  shutil.copytree(layouts[key], root)
  return root


def test_missing_file_errors_or_is_skipped_and_counted(layouts, tmp_path, caplog):
  root = _broken_copy(layouts, tmp_path)
  (root / "Train" / "Image_00002.png").unlink()
  with pytest.raises(DataError, match=r"missing.*Image_00002\.png \(Train\.csv line 3\)"):
    make_source(data_config("per_covid19", root))
  full = len(make_source(data_config("per_covid19", layouts["per_covid19"])))
  with caplog.at_level("WARNING"):
    src = make_source(data_config("per_covid19", root, on_bad_data="skip"))
  assert len(src) == full - 1
  assert "skipped 1 bad entry" in caplog.text and "Image_00002.png" in caplog.text


def test_percentage_out_of_range_and_unknown_class(layouts, tmp_path):
  root = _broken_copy(layouts, tmp_path)
  lines = (root / "Train.csv").read_text().splitlines()
  name, _, subject = lines[1].split(",")
  lines[1] = f"{name},120,{subject}"
  (root / "Train.csv").write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match="Train.csv line 2: percentage 120.0 is outside 0..100"):
    make_source(data_config("per_covid19", root))
  assert len(make_source(data_config("per_covid19", root, on_bad_data="skip"))) == len(lines) - 1
  cx = _broken_copy(layouts, tmp_path, "covidx")
  listing = cx / "train_COVIDx.txt"
  rows = listing.read_text().splitlines()
  rows[0] = rows[0].replace(rows[0].split()[2], "tuberculosis")
  listing.write_text("\n".join(rows) + "\n")
  with pytest.raises(DataError, match=r"train_COVIDx.txt line 1: unknown class 'tuberculosis'"):
    make_source(data_config("covidx", cx))


def test_corrupt_image_found_before_training(layouts, tmp_path, caplog):
  root = _broken_copy(layouts, tmp_path)
  path = root / "Train" / "Image_00001.png"
  path.write_bytes(path.read_bytes()[:40])  # truncated
  with pytest.raises(DataError, match=r"Image_00001\.png.*Train\.csv line 2"):
    make_source(data_config("per_covid19", root, verify_images=True))
  with caplog.at_level("WARNING"):
    src = make_source(data_config("per_covid19", root, on_bad_data="skip"))
  assert not any(p.endswith("Image_00001.png") for p in src.paths)
  assert "skipped 1 bad entry" in caplog.text


def test_empty_split_wrong_columns_and_bad_config(tmp_path):
  (tmp_path / "Train").mkdir()
  (tmp_path / "Train.csv").write_text("Slice_Name,Covid-19_percentage,Subject\n")
  with pytest.raises(DataError, match="no examples"):
    make_source(data_config("per_covid19", tmp_path))
  (tmp_path / "Train.csv").write_text("Slice_Name,Score\nx.png,3\n")
  with pytest.raises(DataError, match=r"lacks column\(s\) \['Covid-19_percentage', 'Subject'\]"):
    make_source(data_config("per_covid19", tmp_path))
  with pytest.raises(ConfigError, match="unknown data source 'imagenet'"):
    make_source(data_config("imagenet", tmp_path))
  with pytest.raises(ConfigError, match="on_bad_data"):
    make_source(data_config("per_covid19", tmp_path, on_bad_data="ignore"))
  with pytest.raises(DataError, match="no validation split"):
    make_source(data_config("covidx", tmp_path), "val")


# --- DICOM ---------------------------------------------------------------------------------------


def _write_dicom(path, pixels, slope=1.0, intercept=-1024.0, photometric="MONOCHROME2"):
  import pydicom
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
  ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  ds.PixelData = pixels.astype(np.uint16).tobytes()
  ds.save_as(str(path), enforce_file_format=True)


def test_dicom_hounsfield_window_and_monochrome1(tmp_path):
  stored = np.array([[0, 424], [1024, 2024]], np.uint16)  # HU = stored - 1024: -1024, -600, 0, 1000
  _write_dicom(tmp_path / "ct.dcm", stored)
  raw = read_image(tmp_path / "ct.dcm")
  assert raw.dtype == np.uint16 and raw.shape == (2, 2, 1)
  np.testing.assert_array_equal(raw[..., 0], stored)
  lung = read_dicom(str(tmp_path / "ct.dcm"), "lung")  # centre -600, width 1500: [-1350, 150]
  np.testing.assert_allclose(lung[..., 0], [[326 / 1500, 750 / 1500], [1350 / 1500, 1.0]], atol=1e-6)
  custom = read_image(tmp_path / "ct.dcm", window=(0, 2000))
  np.testing.assert_allclose(custom[..., 0], [[0.0, 0.2], [0.5, 1.0]], atol=1e-6)
  _write_dicom(tmp_path / "xr.dcm", np.array([[0, 100], [200, 300]]), 1.0, 0.0, "MONOCHROME1")
  np.testing.assert_array_equal(read_image(tmp_path / "xr.dcm")[..., 0], [[300, 200], [100, 0]])
  (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"junk")
  with pytest.raises(DataError, match="bad.dcm: cannot read DICOM"):
    read_image(tmp_path / "bad.dcm")
  with pytest.raises(ValueError, match="unknown CT window"):
    read_image(tmp_path / "ct.dcm", window="brain")


def test_dicom_window_from_the_config(tmp_path):
  """config.data.window as the command line gives it ('lung', or '(centre, width)' in HU) windows
  the DICOM images of a layout; a window it cannot read is a config error before any work."""
  from tests.conftest import load_config, run_main
  stored = np.array([[0, 424], [1024, 2024]], np.uint16)  # HU = stored - 1024: -1024, -600, 0, 1000
  for cls in ("COVID", "NonCOVID"):
    (tmp_path / "ct" / cls).mkdir(parents=True)
    _write_dicom(tmp_path / "ct" / cls / "a.dcm", stored)
  layout = ("--config.data.source=folder", f"--config.data.root={tmp_path / 'ct'}")
  for window, expected in [("(0,2000)", [[0.0, 0.2], [0.5, 1.0]]), ("-600, 1500", [[326 / 1500, 0.5], [0.9, 1.0]]),
                           ("lung", [[326 / 1500, 0.5], [0.9, 1.0]])]:
    c = load_config("resnest.py:runlocal", *layout, f"--config.data.window={window}")
    np.testing.assert_allclose(make_source(c.data).load(0)["image"][..., 0], expected, atol=1e-6)
  with pytest.raises(ConfigError, match="config.data.window: unknown CT window 'brain'"):
    run_main(str(tmp_path / "w"), *layout, "--config.data.window=brain")
  with pytest.raises(ConfigError, match="config.data.window: CT window width must be positive"):
    run_main(str(tmp_path / "w"), *layout, "--config.data.window=(40,0)")


# --- the registry of layouts ---------------------------------------------------------------------

LAYOUT_NAMES = ["covid_ct", "covidx", "csv", "flannel", "folder", "per_covid19", "phantom", "tfds"]


def test_registry_holds_exactly_the_documented_layouts():
  from cxflax.data import sources
  assert known_sources() == LAYOUT_NAMES
  documented = re.findall(r"^  (\w+) {2,}", sources.__doc__, re.MULTILINE)
  assert sorted(documented) == LAYOUT_NAMES


def test_unknown_layout_lists_the_registered_ones_and_a_name_registers_once(monkeypatch):
  from cxflax.data.sources import registry
  with pytest.raises(ConfigError, match=r"^config.data.source: unknown data source 'imagenet'; use one of "
                     + ", ".join(LAYOUT_NAMES) + "$"):
    make_source(data_config("imagenet", ""))
  csv_factory = registry.SOURCES.get("csv")
  with pytest.raises(ValueError, match=r"data source 'csv' is registered twice \(cxflax.data.sources.csv "
                     r"and tests.test_sources\)"):
    @register("csv")
    def _again(data_config, split, unlabeled_ok):
      raise AssertionError("never opened")
  assert registry.SOURCES.get("csv") is csv_factory

  monkeypatch.setattr(registry.SOURCES, "_items", dict(registry.SOURCES._items))  # undone after the test
  opened = []

  @register("toy")
  def _toy(data_config, split, unlabeled_ok):
    opened.append((split, unlabeled_ok))
    return PhantomSource("ct", 2, 16, (1, 1), seed=0)

  src = make_source(data_config("toy", ""), "val", unlabeled_ok=True)
  assert opened == [("val", True)] and isinstance(src, PhantomSource) and len(src) == 2
  with pytest.raises(ConfigError, match=r"use one of .*per_covid19, phantom, tfds, toy$"):
    make_source(data_config("imagenet", ""))


@pytest.mark.parametrize("first", ["cxflax.data.phantom", "cxflax.data.sources.per_covid19",
                                   "cxflax.data.sources.phantom", "cxflax.data.sources.tfds"])
def test_modules_load_in_any_order(first):
  """The generator imports the severity categories from the Per-COVID-19 reader, whose package
  holds the phantom source: whichever is imported first, all load and work."""
  code = (f"import {first}\n"
          "from cxflax.data.phantom import Phantom, severity_class\n"
          "from cxflax.data.sources import PhantomSource, known_sources\n"
          "src = PhantomSource('ct', 2, 16, (1, 1), seed=0)\n"
          "from cxflax.data.pipeline import fold_strata\n"
          "assert list(fold_strata(src)) == [severity_class(float(v)) for v in src.labels()]\n"
          "print(len(known_sources()), int(Phantom('ct', 1, 16, (1, 1))[0]['severity']) >= 0)\n")
  from tests.conftest import run_python
  result = run_python(code)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [str(len(LAYOUT_NAMES)), "True"]
