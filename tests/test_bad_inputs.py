"""Bad images and bad label files: every one ends in a DataError naming its file (with
data.verify_images and without, in grain workers too), or under on_bad_data='skip' is left out
and counted; a seeded fuzz of a few hundred generated bad inputs holds the readers to that."""

from __future__ import annotations

import io
import os
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cxflax.data.images import read_image, write_image
from cxflax.data.sources import make_source
from cxflax.data.sources.tables import is_number
from cxflax.errors import DataError
from tests.conftest import data_config


def _png(arr) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(arr) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _dicom(pixels, slope="1.0") -> bytes:
  """A DICOM CT slice of `pixels` (uint16 stored, or float32 as FloatPixelData)."""
  import pydicom
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.RescaleSlope, ds.RescaleIntercept = slope, -1024.0
  if pixels.dtype == np.float32:
    ds.BitsAllocated, ds.FloatPixelData = 32, pixels.tobytes()
  else:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
  buf = io.BytesIO()
  pydicom.dcmwrite(buf, ds, enforce_file_format=True)
  return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
  """A PNG that declares width x height 8-bit gray pixels and holds none: what a decompression
  bomb looks like to PIL before it decodes anything."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
          + chunk(b"IEND", b""))


def _assert_names(excinfo, path):
  assert os.fspath(path) in str(excinfo.value), str(excinfo.value)


# --- item 6: each kind of bad image ---------------------------------------------------------------


def _bad_images(folder) -> dict[str, str]:
  """One file of each kind of bad image → what its error says."""
  good = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
  files = {
      "bomb.png": (_png_header(20000, 20000), "decompression bomb"),
      "truncated.png": (_png(good)[:200], "cannot decode image"),
      "truncated.jpg": (_jpeg(good)[:300], "cannot decode image"),
      "truncated.dcm": (_dicom(good.astype(np.uint16))[:400], "cannot read DICOM"),
      "empty.png": (b"", "cannot decode image"),
      "empty.dcm": (b"", "cannot read DICOM"),
      "png_named.dcm": (_png(good), "not a DICOM file but PNG image data"),
      "text_named.jpg": (b"patient,finding\n1,covid\n", "cannot decode image"),
  }
  for name, (data, _) in files.items():
    (folder / name).write_bytes(data)
  return {str(folder / name): said for name, (_, said) in files.items()}


def test_each_kind_of_bad_image_names_its_file(tmp_path):
  for path, said in _bad_images(tmp_path).items():
    with pytest.raises(DataError, match=said) as e:
      read_image(path)
    _assert_names(e, path)
  # A JPEG named .png and a DICOM named .png are read by what they hold.
  good = np.full((8, 8), 7, np.uint8)
  (tmp_path / "jpeg_named.png").write_bytes(_jpeg(good))
  (tmp_path / "dicom_named.png").write_bytes(_dicom(good.astype(np.uint16)))
  assert read_image(tmp_path / "jpeg_named.png").shape == (8, 8, 1)
  np.testing.assert_array_equal(read_image(tmp_path / "dicom_named.png")[..., 0], good)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # pydicom, on the 'nan' slope
def test_dicom_values_that_cannot_be_used_name_the_file(tmp_path):
  """Float pixels are not truncated to integers, a rescale that gives NaN is not windowed, and
  an unreadable rescale attribute is a bad file, not a crash."""
  (tmp_path / "float.dcm").write_bytes(_dicom(np.full((2, 2), 0.5, np.float32)))
  with pytest.raises(DataError, match="float.dcm: floating-point DICOM pixels .* need config.data.window"):
    read_image(tmp_path / "float.dcm")
  # Windowed they are used: HU 0.5 - 1024 in the window [-1025, -1023] is 0.75 of the way up.
  np.testing.assert_allclose(read_image(tmp_path / "float.dcm", window=(-1024, 2))[..., 0], 0.75)
  (tmp_path / "nan.dcm").write_bytes(_dicom(np.ones((2, 2), np.uint16), slope="nan"))
  with pytest.raises(DataError, match=r"nan.dcm: DICOM pixels are not finite after rescale \(slope nan"):
    read_image(tmp_path / "nan.dcm", window="lung")
  data = _dicom(np.ones((2, 2), np.uint16), slope="7.25")  # pydicom writes no bad DS: edit the bytes
  assert data.count(b"7.25") == 1
  (tmp_path / "text.dcm").write_bytes(data.replace(b"7.25", b"7X25"))
  with pytest.raises(DataError, match="text.dcm: cannot read DICOM pixels"):
    read_image(tmp_path / "text.dcm")


@pytest.mark.parametrize("verify", [True, False])
def test_bad_images_in_a_layout_name_the_file_or_are_skipped(tmp_path, caplog, verify):
  """A folder layout holding every kind of bad image: with verify_images every one is found up
  front (the first stops the run; 'skip' leaves all out and counts them); without, reading each
  example fails naming its file."""
  for cls in ("a", "b"):
    (tmp_path / cls).mkdir()
    write_image(tmp_path / cls / "good.png", np.full((8, 8), 9, np.uint8))
  bad = _bad_images(tmp_path / "a")
  d = data_config("folder", tmp_path, verify_images=verify)
  if verify:
    with pytest.raises(DataError, match="|".join(os.path.basename(p) for p in bad)):
      make_source(d)
  else:
    src = make_source(d)
    assert len(src) == len(bad) + 2
    for i, path in enumerate(src.paths):
      if path in bad:
        with pytest.raises(DataError, match=bad[path]) as e:
          src.load(i)
        _assert_names(e, path)
      else:
        assert src.load(i)["image"].shape == (8, 8, 1)
  with caplog.at_level("WARNING"):
    kept = make_source(data_config("folder", tmp_path, on_bad_data="skip", verify_images=verify))
  assert sorted(kept.paths) == [str(tmp_path / "a" / "good.png"), str(tmp_path / "b" / "good.png")]
  assert f"skipped {len(bad)} bad entries" in caplog.text


def test_decompression_bomb_in_a_grain_worker_names_the_file(tmp_path):
  """Decoded lazily in a grain worker process, the error still names the file."""
  from cxflax.data import pipeline
  for cls in ("a", "b"):
    (tmp_path / cls).mkdir()
    for k in range(2):
      write_image(tmp_path / cls / f"{k}.png", np.full((8, 8), k, np.uint8))
  (tmp_path / "b" / "1.png").write_bytes(_png_header(20000, 20000))
  src = make_source(data_config("folder", tmp_path))
  ds = pipeline.eval_dataset(src, np.arange(len(src)), pp="to_rgb", global_batch=4, workers=1)
  with pytest.raises(DataError, match=r"b/1\.png: .*decompression bomb"):
    next(iter(ds))


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
  for cls in ("COVID", "NonCOVID"):
    (tmp_path / cls).mkdir()
  write_image(tmp_path / "COVID" / "x.png", np.zeros((4, 4), np.uint8))
  (tmp_path / "NonCOVID" / "notes.txt").write_text("no images here")
  for policy in ("error", "skip"):
    with pytest.raises(DataError, match=f"class folder {tmp_path / 'NonCOVID'} holds no images"):
      make_source(data_config("folder", tmp_path, on_bad_data=policy))


def test_folder_names_with_glob_characters_are_read(tmp_path):
  """'[' in a class or image folder name is a name, not a glob pattern that matches nothing
  (which would have emptied the class)."""
  root = tmp_path / "set[1]"
  for cls in ("COVID[a]", "Non*COVID"):
    (root / cls).mkdir(parents=True)
    write_image(root / cls / "x.png", np.zeros((4, 4), np.uint8))
  assert len(make_source(data_config("folder", root))) == 2
  from cxflax.data.sources import image_folder
  assert len(image_folder(str(root))) == 2


# --- item 8: fuzzing the readers ------------------------------------------------------------------

FUZZ_SEED = 19


def _seed_images() -> dict[str, bytes]:
  """Valid files to break: PNG (8-bit, 16-bit, RGB), JPEG (gray, RGB) and DICOM."""
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (24, 20), dtype=np.uint8)
  return {"gray.png": _png(gray), "deep.png": _png(gray.astype(np.uint16) * 257),
          "rgb.png": _png(np.stack([gray, gray[::-1], gray // 2], -1)), "gray.jpg": _jpeg(gray),
          "rgb.jpg": _jpeg(np.stack([gray] * 3, -1)), "ct.dcm": _dicom(gray.astype(np.uint16) * 8)}


KINDS = ("truncate", "random", "header", "flip", "empty", "huge")


def _fuzz_images(folder, rng, n: int) -> dict[str, object]:
  """n generated bad image files in `folder` → what reading each may give: 'fail' (noise, a
  header alone, nothing), 'any' (bytes changed in place can leave a valid image), or for a cut
  file the seed's pixels (a cut that spares them, e.g. PNG's last chunk, may decode; a cut that
  loses pixels must fail)."""
  seeds = []
  for name, data in _seed_images().items():
    (folder / name).write_bytes(data)  # decoded once as the seed's pixels, then broken below
    seeds.append((name, data, read_image(folder / name)))
    os.remove(folder / name)
  extensions = (".png", ".jpg", ".jpeg", ".dcm", ".tif", ".bmp")
  out = {}
  for k in range(n):
    name, data, pixels = seeds[rng.integers(len(seeds))]
    kind = KINDS[rng.integers(len(KINDS))]
    expect = "fail"
    if kind == "truncate":
      data, expect = data[:rng.integers(0, len(data))], pixels
    elif kind == "random":
      data = rng.bytes(int(rng.integers(1, 4000)))
    elif kind == "header":  # the format's first bytes, then noise
      data = data[:rng.integers(4, 160)] + rng.bytes(int(rng.integers(0, 400)))
    elif kind == "flip":
      arr = np.frombuffer(data, np.uint8).copy()
      where = rng.integers(0, len(arr), rng.integers(1, 8))
      arr[where] = rng.integers(0, 256, len(where))
      data, expect = arr.tobytes(), "any"
    elif kind == "huge":  # a PNG declaring up to 60000² pixels (past PIL's bomb limit) and holding none
      data = _png_header(*(int(rng.integers(1, 64) if rng.random() < 0.5 else rng.integers(14000, 60000))
                           for _ in range(2)))
    else:
      data = b""
    ext = os.path.splitext(name)[1] if rng.random() < 0.6 else extensions[rng.integers(len(extensions))]
    path = folder / f"{k:03d}_{kind}_{os.path.splitext(name)[0]}{ext}"
    path.write_bytes(data)
    out[str(path)] = expect
  return out


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom, on a fuzzed header
def test_fuzzed_images_end_in_a_data_error_naming_the_file(tmp_path, caplog):
  """A few hundred cut, random, header-only and bit-flipped PNG / JPEG / DICOM files (some with
  another format's extension): read_image returns a valid array or raises DataError naming the
  file, never anything else; in a folder layout, 'skip' keeps exactly the readable ones and
  counts the others, 'error' stops on one of them by name."""
  rng = np.random.default_rng(FUZZ_SEED)
  root = tmp_path / "layout"
  (root / "cls").mkdir(parents=True)
  files = _fuzz_images(root / "cls", rng, 300)
  readable, wrong = set(), []
  for path, expect in files.items():
    try:
      arr = read_image(path)
    except DataError as e:
      if path not in str(e):
        wrong.append(f"{path}: DataError without the path: {e}")
      continue
    except Exception as e:  # the test's point: nothing else may come out
      wrong.append(f"{path}: {type(e).__name__}: {e}")
      continue
    if isinstance(expect, str) and expect == "fail":
      wrong.append(f"{path}: decoded, though it is noise or a bare header: {arr.shape} {arr.dtype}")
    elif not isinstance(expect, str) and not np.array_equal(arr, expect):
      wrong.append(f"{path}: cut, and decoded to other pixels than the file before the cut")
    elif not (arr.ndim == 3 and arr.shape[-1] in (1, 3) and arr.dtype in (np.uint8, np.uint16) and arr.size):
      wrong.append(f"{path}: decoded to {arr.shape} {arr.dtype}")
    readable.add(path)
  assert not wrong, "\n".join(wrong)
  assert len(readable) < len(files) / 4  # the fuzz mostly makes unreadable files
  with pytest.raises(DataError) as e:
    make_source(data_config("folder", root, verify_images=True))
  assert any(path in str(e.value) for path in set(files) - readable), str(e.value)
  with caplog.at_level("WARNING"):
    kept = make_source(data_config("folder", root, on_bad_data="skip"))
  assert set(kept.paths) == readable
  assert f"skipped {len(files) - len(readable)} bad entries" in caplog.text


def _word(rng, lo=3, hi=9) -> str:
  return "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, rng.integers(lo, hi)))


def _table_rows(rng, layout: str, images: list[str]) -> tuple[list[str], int]:
  """A generated label table of `layout` (its lines) and how many of its entries are good: the
  others have missing, extra, non-numeric or out-of-range fields, unknown classes or missing
  files."""
  while True:
    lines, good, labels, numeric = [], 0, 0, 0
    for _ in range(rng.integers(1, 12)):
      name, subject = images[rng.integers(len(images))], f"s{rng.integers(5)}"
      bad = rng.random() < 0.4
      kind = ("missing_field", "extra_field", "value", "missing_file")[rng.integers(4)] if bad else "ok"
      if kind == "missing_file":
        name = "" if rng.random() < 0.2 and layout != "covidx" else f"{_word(rng)}.png"
      if layout == "per_covid19":
        value = f"{rng.uniform(0, 100):.3f}"
        if kind == "value":
          value = [_word(rng), "", "12%", "-0.5", "100.01", "1e9", "nan", "inf", "-inf"][rng.integers(9)]
        fields = [name, value, subject]
      elif layout == "covidx":
        value = ["normal", "pneumonia", "COVID-19", "covid19", "Normal"][rng.integers(5)]
        if kind == "value":
          value = _word(rng)  # random letters: never one of the classes
        fields = [subject, name, value, "source"]
      elif layout == "csv_classes":
        value = ["cat", "dog", "Bird"][rng.integers(3)]
        if kind == "value":
          value = [_word(rng), "", "0"][rng.integers(3)]
        fields = [name, value, subject]
      else:  # csv_regression
        value = f"{rng.normal(0, 10):.4f}"
        if kind == "value":
          value = [_word(rng), "", "nan", "inf"][rng.integers(4)]
        fields = [name, value, subject]
      if kind == "missing_field":
        fields = fields[:-2] if layout == "covidx" else fields[:-2 + (layout == "per_covid19")]
      elif kind == "extra_field":
        fields = fields + [_word(rng), "7"]
      # Fields beyond a header's columns are an error; a table without a header (covidx) may
      # carry the user's own after the expected ones.
      good += kind == "ok" or (kind == "extra_field" and layout == "covidx")
      if kind != "missing_field" and value:
        labels, numeric = labels + 1, numeric + is_number(value)
      lines.append((" " if layout == "covidx" else ",").join(fields))
    # A regression table stays one while most of its labels are numbers (see csv_source).
    if layout != "csv_regression" or 2 * numeric >= labels:
      return lines, good


LAYOUT_FILES = {  # layout → (label file, header, config overrides)
    "per_covid19": ("Train.csv", "Slice_Name,Covid-19_percentage,Subject", {}),
    "covidx": ("train_COVIDx.txt", None, {}),
    "csv_classes": ("t.csv", "path,label,subject", dict(train_file="t.csv", class_names=("cat", "dog", "bird"))),
    "csv_regression": ("t.csv", "path,label,subject", dict(train_file="t.csv")),
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_FILES))
def test_fuzzed_label_files_end_in_a_data_error_or_counted_skips(tmp_path, caplog, layout):
  """Generated label tables of each layout with missing, extra, non-numeric and out-of-range
  fields, unknown classes and missing files: under 'error' a table with a bad entry stops naming
  its file, under 'skip' exactly the good entries remain and the others are counted; whole
  files of noise or cut short end in a DataError naming the file (or, cut, still read)."""
  rng = np.random.default_rng([FUZZ_SEED, len(layout)])
  table, header, overrides = LAYOUT_FILES[layout]
  folder = tmp_path / {"per_covid19": "Train", "covidx": "train"}.get(layout, "")
  folder.mkdir(exist_ok=True)
  images = [f"img{k}.png" for k in range(4)]
  for name in images:
    write_image(folder / name, np.full((4, 4), 3, np.uint8))
  source = "csv" if layout.startswith("csv") else layout
  path = tmp_path / table
  for trial in range(40):
    lines, good = _table_rows(rng, layout, images)
    path.write_text("\n".join(([header] if header else []) + lines) + "\n")
    bad = len(lines) - good
    if bad:
      with pytest.raises(DataError, match=re.escape(table)):
        make_source(data_config(source, tmp_path, **overrides))
    else:
      assert len(make_source(data_config(source, tmp_path, **overrides))) == good
    caplog.clear()
    with caplog.at_level("WARNING"):
      if good:
        assert len(make_source(data_config(source, tmp_path, on_bad_data="skip", **overrides))) == good, lines
      else:
        with pytest.raises(DataError, match=f"no examples.*{re.escape(table)}"):
          make_source(data_config(source, tmp_path, on_bad_data="skip", **overrides))
    assert sum(int(n) for n in re.findall(r"skipped (\d+) bad entr", caplog.text)) == bad, (lines, caplog.text)
  text = path.read_bytes()
  for trial in range(10):
    path.write_bytes(rng.bytes(int(rng.integers(1, 300))) if trial % 2 else text[:rng.integers(0, len(text))])
    for policy in ("error", "skip"):
      try:
        make_source(data_config(source, tmp_path, on_bad_data=policy, **overrides))
      except DataError as e:
        assert table in str(e), str(e)


# --- TFDS builds: labels range-checked as the file layouts' -------------------------------------


def test_tfds_labels_are_range_checked_and_bad_records_named(tmp_path, monkeypatch, caplog):
  """Builds whose records hold a percentage of 120 (per_covid19) or ClassLabel's -1 'no label'
  (covid_ct; tfds itself lets -1 through): reading them stops naming the record, or under 'skip'
  leaves it out and counts it. A record whose PNG does not decode names itself when loaded."""
  from cxflax.data import export, tfds_builders
  from cxflax.data.sources.base import FileSource
  data_dir = str(tmp_path / "tfds")
  export.export_per_covid19(str(tmp_path / "pc"), num_subjects=2, image_size=32, num_val_subjects=0)
  export.export_covid_ct(str(tmp_path / "ct"), num_subjects=5, image_size=32)
  ct_train = [os.path.basename(p) for p in make_source(data_config("covid_ct", tmp_path / "ct")).paths]
  broken = {os.path.basename(make_source(data_config("per_covid19", tmp_path / "pc")).paths[0]): 120.0,
            ct_train[-1]: -1}
  real_load, real_gray8, marker = FileSource.load, tfds_builders.to_gray8, np.zeros((3, 5, 1), np.uint8)

  def load(self, i):  # what the layout gave the builder, with the label of `broken` files replaced
    ex = real_load(self, i)
    name = os.path.basename(self.paths[i])
    return {**ex, "label": broken.get(name, ex["label"]), **({"image": marker} if name == ct_train[0] else {})}

  monkeypatch.setattr(FileSource, "load", load)  # ct_train[0]'s record: bytes that are no PNG
  monkeypatch.setattr(tfds_builders, "to_gray8", lambda im: b"\x89PNG\r\n\x1a\nnot" if im.shape == marker.shape
                      else real_gray8(im))
  tfds_builders.build("per_covid19", str(tmp_path / "pc"), data_dir)
  tfds_builders.build("covid_ct", str(tmp_path / "ct"), data_dir)
  monkeypatch.undo()
  for name, said in (("per_covid19", "percentage 120.0 is outside 0..100"),
                     ("covid_ct", r"label -1 is not a class index 0..1 \(NonCOVID, COVID\)")):
    bad = next(n for n in broken if (n.startswith("Image") if name == "per_covid19" else "%" in n))
    with pytest.raises(DataError, match=rf"{re.escape(bad)} \(tfds {name} train, record \d+\): {said}"):
      make_source(data_config("tfds", data_dir, tfds_name=name))
    caplog.clear()
    with caplog.at_level("WARNING"):
      kept = make_source(data_config("tfds", data_dir, tfds_name=name, on_bad_data="skip"))
    assert "skipped 1 bad entry" in caplog.text and bad in caplog.text
    names = [kept.example_name(i) for i in range(len(kept))]
    layout = make_source(data_config(name, tmp_path / ("pc" if name == "per_covid19" else "ct")))
    files = {os.path.basename(p): i for i, p in enumerate(layout.paths)}
    assert sorted(names) == sorted(set(files) - {bad}) and (name == "per_covid19" or ct_train[0] in names)
    for i, n in enumerate(names):  # each kept record still reads its own image and label
      ex = layout.load(files[n])
      assert kept.labels()[i] == pytest.approx(float(ex["label"]))
      if n == ct_train[0]:
        with pytest.raises(DataError, match=rf"{re.escape(n)} \(tfds covid_ct train, record \d+\): cannot decode"):
          kept.load(i)
      else:
        np.testing.assert_array_equal(kept.load(i)["image"], tfds_builders.to_gray8(ex["image"]))
