"""Sources, image reading, folds and the grain pipelines, with their errors."""


import os

import numpy as np
import pytest
from PIL import Image

from cxflax.data import export, folds, pipeline, transforms
from cxflax.data.images import read_image, write_image
from cxflax.config import base_config
from cxflax.data.sources import PhantomSource, image_folder, make_source
from cxflax.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def per_covid(tmp_path_factory):
  root = tmp_path_factory.mktemp("data") / "Per-COVID-19"
  export.export_per_covid19(str(root), num_subjects=5, image_size=32, num_val_subjects=2, seed=1,
                            val_labels=True)
  return root


def PerCovid19Source(root, split="train"):
  d = base_config().data
  d.source, d.root = "per_covid19", root
  return make_source(d, split)


def _copy_layout(src, dst, csv_text):
  import shutil
  shutil.copytree(src / "Train", dst / "Train")
  (dst / "Train.csv").write_text(csv_text)
  return dst


def test_per_covid19_with_and_without_header(per_covid, tmp_path):
  plain = PerCovid19Source(str(per_covid))
  text = (per_covid / "Train.csv").read_text()
  headed = _copy_layout(per_covid, tmp_path / "h", "Slice_Name,Covid-19_percentage,Subject\n" + text)
  with_header = PerCovid19Source(str(headed))
  np.testing.assert_array_equal(plain.labels(), with_header.labels())
  assert plain.subjects() == with_header.subjects()
  # Columns in another order, found by their header names.
  rows = [r.split(",") for r in text.splitlines()]
  swapped = "Subject,Slice_Name,Covid-19_percentage\n" + "\n".join(f"{s},{n},{p}" for n, p, s in rows)
  reordered = PerCovid19Source(str(_copy_layout(per_covid, tmp_path / "r", swapped)))
  np.testing.assert_array_equal(plain.labels(), reordered.labels())
  # Without a header, fields after the expected three are the user's own; with one, empty
  # trailing fields (a spreadsheet's export) are nothing.
  extra = PerCovid19Source(str(_copy_layout(per_covid, tmp_path / "x", "".join(
      f"{r},note,7\n" for r in text.splitlines()))))
  np.testing.assert_array_equal(plain.labels(), extra.labels())
  header = "Slice_Name,Covid-19_percentage,Subject\n"
  headed_trailing = header + "".join(f"{r},,\n" for r in text.splitlines())
  trailing = PerCovid19Source(str(_copy_layout(per_covid, tmp_path / "t", headed_trailing)))
  np.testing.assert_array_equal(plain.labels(), trailing.labels())
  val = PerCovid19Source(str(per_covid), "val")
  assert len(val) > 0 and val.load(0)["image"].shape == (32, 32, 1)


@pytest.mark.parametrize("edit,match", [
    (lambda rows: rows[:1] + [["Image_99999.png", "3", "s"]], r"missing.*Image_99999\.png \(Train.csv line 2\)"),
    (lambda rows: [[rows[0][0], "101", rows[0][2]]], r"line 1: percentage 101.0 is outside 0..100"),
    (lambda rows: [[rows[0][0], "abc", rows[0][2]]], r"line 1: percentage 'abc' is not a number"),
    (lambda rows: [[rows[0][0], "5"]], r"line 1: expected columns"),
    (lambda rows: [["Name", "Label", "Patient"]] + rows, r"header .* lacks column\(s\) \['Covid-19_percentage', 'Subject'\]"),
    # an unquoted comma in a name shifts the row: more fields than its header names
    (lambda rows: [["Slice_Name", "Covid-19_percentage", "Subject"], ["a", rows[0][0], "5", "s1"]],
     r"line 2: 4 fields where the header names 3"),
])
def test_per_covid19_bad_rows_name_file_and_line(per_covid, tmp_path, edit, match):
  rows = [r.split(",") for r in (per_covid / "Train.csv").read_text().splitlines()]
  root = _copy_layout(per_covid, tmp_path / "bad", "\n".join(",".join(r) for r in edit(rows)) + "\n")
  with pytest.raises(DataError, match=match) as e:
    PerCovid19Source(str(root))
  assert "Train.csv" in str(e.value)


def test_per_covid19_missing_parts(tmp_path):
  with pytest.raises(DataError, match="not a directory"):
    PerCovid19Source(str(tmp_path / "nowhere"))
  (tmp_path / "Train").mkdir()
  with pytest.raises(DataError, match="Train.csv is missing"):
    PerCovid19Source(str(tmp_path))
  (tmp_path / "Train.csv").write_text("")
  with pytest.raises(DataError, match="empty"):
    PerCovid19Source(str(tmp_path))


def test_read_image_formats(tmp_path):
  gray8 = np.arange(64, dtype=np.uint8).reshape(8, 8)
  gray16 = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
  rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
  write_image(tmp_path / "a.png", gray8)
  write_image(tmp_path / "b.png", gray16)
  write_image(tmp_path / "c.png", rgb)
  write_image(tmp_path / "d.jpg", rgb, quality=95)
  np.testing.assert_array_equal(read_image(tmp_path / "a.png"), gray8[..., None])
  b = read_image(tmp_path / "b.png")
  assert b.dtype == np.uint16
  np.testing.assert_array_equal(b[..., 0], gray16)
  np.testing.assert_array_equal(read_image(tmp_path / "c.png"), rgb)
  assert read_image(tmp_path / "d.jpg").shape == (8, 8, 3)


def test_written_masks_are_0_255_pngs_of_the_given_size(tmp_path):
  """write_mask writes what config.data.mask_dir reads: 0/255, nearest-neighbour resized."""
  from cxflax.data.images import write_mask
  from cxflax.data.sources import read_mask
  mask = np.zeros((4, 6), np.uint8)
  mask[:2, :3] = 1
  write_mask(tmp_path / "m.png", mask, (8, 12))
  written = read_image(tmp_path / "m.png")[..., 0]
  assert written.shape == (8, 12) and set(np.unique(written)) == {0, 255}
  np.testing.assert_array_equal(written, np.kron(mask, np.ones((2, 2), np.uint8)) * 255)
  np.testing.assert_array_equal(read_mask(str(tmp_path / "m.png"), (4, 6)), mask)


def test_an_image_write_cut_off_leaves_the_previous_file_whole(tmp_path, monkeypatch):
  """A write interrupted half-way (Ctrl-C inside PIL's PNG encoder, after some bytes) leaves the
  mask written before it as it was, and no temporary file: no truncated image for a later run."""
  from cxflax.data.images import write_mask
  first = np.eye(6, dtype=np.uint8)
  write_mask(tmp_path / "m.png", first, (6, 6))

  def cut_off(im, fp, filename, *args, **kwargs):
    fp.write(b"\x89PNG\r\n")
    raise KeyboardInterrupt

  monkeypatch.setitem(Image.SAVE, "PNG", cut_off)
  with pytest.raises(KeyboardInterrupt):
    write_mask(tmp_path / "m.png", 1 - first, (6, 6))
  assert os.listdir(tmp_path) == ["m.png"]
  np.testing.assert_array_equal(read_image(tmp_path / "m.png")[..., 0], first * 255)
  with pytest.raises(ValueError, match=r"m.txt: not an image file extension PIL writes"):
    write_mask(tmp_path / "m.txt", first, (6, 6))


def test_read_image_errors_name_the_file(tmp_path):
  with pytest.raises(DataError, match="nothere.png: image file not found"):
    read_image(tmp_path / "nothere.png")
  (tmp_path / "junk.png").write_bytes(b"not a png at all")
  with pytest.raises(DataError, match="junk.png: cannot decode"):
    read_image(tmp_path / "junk.png")
  write_image(tmp_path / "ok.png", np.zeros((64, 64), np.uint8))
  data = (tmp_path / "ok.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
  with pytest.raises(DataError, match="cut.png"):
    read_image(tmp_path / "cut.png")


def test_group_kfold_never_splits_a_subject():
  rng = np.random.default_rng(0)
  subjects = [f"s{rng.integers(0, 37)}" for _ in range(400)]
  fold_of = folds.group_kfold(subjects, 5)
  for s in set(subjects):
    assert len({fold_of[i] for i, t in enumerate(subjects) if t == s}) == 1
  sizes = np.bincount(fold_of)
  assert len(sizes) == 5 and sizes.max() - sizes.min() <= max(np.unique(subjects, return_counts=True)[1])
  train, held = folds.split_indices(fold_of, 2)
  assert set(train).isdisjoint(held) and len(train) + len(held) == 400
  assert not set(np.asarray(subjects)[train]) & set(np.asarray(subjects)[held])
  with pytest.raises(DataError, match="subject"):
    folds.group_kfold(["a", "a", "b"], 3)
  with pytest.raises(ConfigError):
    folds.split_indices(fold_of, 5)


def test_pp_parsing_and_errors():
  ops = transforms.parse("to_rgb|resize(16)|flip_lr(p=1.0)|normalize('imagenet')")
  assert len(ops) == 4
  with pytest.raises(ConfigError, match="unknown preprocessing op 'blur'"):
    transforms.parse("resize(8)|blur(3)")
  with pytest.raises(ConfigError, match="cannot parse"):
    transforms.parse("resize(8")
  with pytest.raises(ConfigError, match="bad arguments"):
    transforms.parse("flip_lr(2.0)")


def test_masks_follow_geometric_ops():
  ex = {"image": np.zeros((20, 30, 1), np.uint8), "lung_mask": np.zeros((20, 30, 1), np.uint8)}
  ex["image"][2:5, 3:9] = 255
  ex["lung_mask"][2:5, 3:9] = 1
  out = transforms.Preprocess("resize(10, 15)|flip_lr(1.0)|flip_ud(1.0)").random_map(
      ex, np.random.default_rng(0))
  assert out["image"].shape == (10, 15, 1) and out["lung_mask"].shape == (10, 15, 1)
  assert set(np.unique(out["lung_mask"])) <= {0, 1}
  mask = out["lung_mask"][..., 0] > 0
  resized = np.asarray(Image.fromarray(ex["lung_mask"][..., 0]).resize((15, 10), Image.NEAREST)) > 0
  np.testing.assert_array_equal(mask, resized[::-1, ::-1])  # resized, then flipped both ways
  ys, xs = np.nonzero(out["image"][..., 0] > 0.5)
  my, mx = np.nonzero(mask)
  assert abs(ys.mean() - my.mean()) <= 0.5 and abs(xs.mean() - mx.mean()) <= 0.5


def test_phantom_covid_labels_follow_the_lesion_threshold():
  pct = PhantomSource("ct", 8, 32, seed=0).labels()
  assert pct.min() == 0 and pct.max() > 1  # both kinds of slice present
  for threshold in (0.0, 1.0):
    src = PhantomSource("ct", 8, 32, seed=0, covid_labels=True, covid_min_percentage=threshold)
    assert tuple(src.class_names) == ("NonCOVID", "COVID")
    np.testing.assert_array_equal(src.labels(), (pct > threshold).astype(np.int32))
    i = int(np.argmax((pct > 0) & (pct <= 1.0))) if threshold else int(np.argmax(pct))
    assert src.load(i)["label"] == int(pct[i] > threshold)
  with pytest.raises(ConfigError, match="covid_min_percentage"):
    PhantomSource("ct", 8, 32, covid_labels=True, covid_min_percentage=-1)


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_batches_count_every_example_once(processes):
  src = PhantomSource("ct", 7, 32, seed=0)
  indices = np.arange(0, len(src), 2)  # an odd-sized subset
  seen, shapes = [], set()
  for p in range(processes):
    for batch in pipeline.eval_dataset(src, indices, pp="to_rgb", global_batch=8,
                                       process_index=p, process_count=processes):
      shapes.add(batch["image"].shape)
      seen.extend(batch["index"][batch["valid"] > 0].tolist())
  assert sorted(seen) == sorted(indices.tolist())
  assert shapes == {(8 // processes, 32, 32, 3)}


def test_eval_batches_carry_each_image_size_as_stored(tmp_path):
  """Predicted masks are written back at the stored size, read from the batch, not by decoding
  the image again."""
  sizes = [(40, 56), (64, 64), (50, 30)]
  for i, (h, w) in enumerate(sizes):
    Image.fromarray(np.full((h, w), 40 * i, np.uint8)).save(tmp_path / f"x{i}.png")
  src = image_folder(str(tmp_path))
  (batch,) = pipeline.eval_dataset(src, np.arange(3), pp="to_rgb|resize(24)", global_batch=4)
  assert batch["image"].shape == (4, 24, 24, 3)
  expected = [sizes[int(src.example_name(i)[1])] for i in batch["index"]]
  np.testing.assert_array_equal(batch["source_size"], expected)


def _batches(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_are_epoch_shuffled_and_resumable():
  src = PhantomSource("ct", 6, 32, seed=0)
  idx = np.arange(len(src))
  make = lambda: iter(pipeline.train_dataset(src, idx, pp="to_rgb|flip_lr(0.5)", global_batch=4, seed=5))
  steps = len(idx) // 4
  a = make()
  epoch1 = np.concatenate([b["index"] for b in _batches(a, steps)])
  epoch2 = np.concatenate([b["index"] for b in _batches(a, steps)])
  assert len(set(epoch1)) == len(epoch1) and len(set(epoch2)) == len(epoch2)
  assert not np.array_equal(epoch1, epoch2), "each epoch is shuffled anew"
  # Stop after 3 batches, save the state, continue in a fresh iterator: same batches follow.
  b = make()
  _batches(b, 3)
  state = b.get_state()
  expected = _batches(b, 4)
  c = make()
  c.set_state(state)
  for x, y in zip(expected, _batches(c, 4)):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_train_batches_split_among_processes_reassemble():
  """Two processes' halves of every batch are exactly the one-process batch, augmentation too."""
  src = PhantomSource("ct", 6, 32, seed=0)
  idx = np.arange(len(src))
  kw = dict(pp="to_rgb|flip_lr(0.5)", global_batch=4, seed=1)
  one = _batches(iter(pipeline.train_dataset(src, idx, **kw)), 3)
  halves = [_batches(iter(pipeline.train_dataset(src, idx, process_index=p, process_count=2, **kw)), 3)
            for p in range(2)]
  for k in range(3):
    whole = {int(i): img for i, img in zip(one[k]["index"], one[k]["image"])}
    parts = {int(i): img for h in halves for i, img in zip(h[k]["index"], h[k]["image"])}
    assert whole.keys() == parts.keys()
    for i in whole:
      np.testing.assert_array_equal(whole[i], parts[i])


def test_ungrouped_folds_are_scikit_learns_group_kfold_on_the_challenge_table(tmp_path):
  """Seed 000's folds (data.stratify='none') on a Per-COVID-19 challenge table read from disk:
  the examples of each fold are those scikit-learn's GroupKFold(5) holds out in that split, with
  the Subject column as the authors' pandas reads it (integers: '10' sorts after '9', which
  decides the order of subjects with equally many slices). The seed does not change them."""
  import csv
  from sklearn.model_selection import GroupKFold
  rng = np.random.default_rng(0)
  (tmp_path / "Train").mkdir()
  rows = []
  for subject in rng.permutation(np.arange(1, 41)):  # 40 subjects, 1-9 slices, many ties
    for _ in range(int(rng.integers(1, 10))):
      name = f"Image_{len(rows):04d}.png"
      write_image(tmp_path / "Train" / name, np.zeros((8, 8), np.uint8))
      rows.append((name, float(rng.integers(0, 100)), str(subject)))
  with open(tmp_path / "Train.csv", "w", newline="") as fh:
    csv.writer(fh).writerows(rows)  # header-less, as the challenge released it
  d = base_config().data
  d.source, d.root = "per_covid19", str(tmp_path)
  source = make_source(d, "train")
  subjects = [int(r[2]) for r in rows]
  want = np.empty(len(rows), np.int64)
  for k, (_, held) in enumerate(GroupKFold(n_splits=5).split(rows, groups=subjects)):
    want[held] = k
  for seed in (0, 7):
    got = pipeline.make_folds(source, 5, seed, "none")
    np.testing.assert_array_equal(got, want)
  # The folds as strings would sort '10' before '9' and differ: the integer reading matters here.
  as_strings = np.empty(len(rows), np.int64)
  for k, (_, held) in enumerate(GroupKFold(n_splits=5).split(rows, groups=[r[2] for r in rows])):
    as_strings[held] = k
  assert not np.array_equal(as_strings, want)


def test_too_small_training_split_is_an_error():
  src = PhantomSource("ct", 1, 32, slices_per_subject=(2, 2))
  with pytest.raises(DataError, match="fewer than one batch"):
    pipeline.train_dataset(src, np.arange(2), pp="to_rgb", global_batch=4, seed=0)
  with pytest.raises(DataError, match="empty"):
    pipeline.eval_dataset(src, np.arange(0), pp="to_rgb", global_batch=4)


def test_stratified_group_kfold_balances_severity_and_keeps_subjects():
  src = PhantomSource("ct", 80, 32, seed=4)
  subjects, strata = src.subjects(), pipeline.fold_strata(src)
  fold_of = folds.stratified_group_kfold(subjects, strata, 5, seed=0)
  plain = folds.group_kfold(subjects, 5)
  for s in set(subjects):
    assert len({fold_of[i] for i, t in enumerate(subjects) if t == s}) == 1

  def spread(f):  # how unevenly each severity class spreads over the folds
    counts = np.array([[np.sum((f == k) & (strata == c)) for c in np.unique(strata)] for k in range(5)])
    return float(np.mean(np.std(counts / counts.sum(0), axis=0)))

  assert spread(fold_of) < spread(plain)
  assert set(np.unique(fold_of)) == set(range(5))


def test_dataset_statistics_replace_normalize_dataset():
  from cxflax.config import finalize
  from tests.conftest import TINY, load_config
  config = load_config("resnest.py:runlocal", *TINY)
  config.data.train_pp = "to_rgb|resize(32)|normalize('dataset')"
  config.data.eval_pp = "to_rgb|resize(32)|normalize('dataset')"
  config = finalize(config)
  inp = pipeline.create_input(config)
  assert "dataset" not in inp.train_pp and inp.train_pp == inp.eval_pp
  assert config.data.train_pp.endswith("normalize('dataset')")  # the config is left as it was
  # The training split's own per-channel statistics (all of it: fewer images than stats_images).
  pixels = np.stack([inp.source.load(int(i))["image"] for i in inp.train_indices]).astype(np.float64) / 255
  mean, std = pixels.mean(), pixels.std()
  written = inp.train_pp.split("normalize(")[1][:-1]  # the literal the pipeline wrote
  np.testing.assert_allclose(np.array(eval(written), np.float64), [[mean] * 3, [std] * 3], rtol=1e-5)
  batch = next(iter(inp.eval()))
  images = batch["image"][batch["valid"] > 0]
  raw = np.stack([inp.source.load(int(i))["image"] for i in batch["index"][batch["valid"] > 0]]) / 255
  np.testing.assert_allclose(images, np.repeat((raw - mean) / std, 3, -1), rtol=1e-4, atol=1e-4)


def test_worker_processes_give_the_same_batches_and_resume():
  """...and ignore SIGINT: a terminal's Ctrl-C reaches every process of its group, and the main
  process stops the run (with a checkpoint), then its workers."""
  import multiprocessing
  import os
  import signal
  import time
  src = PhantomSource("ct", 6, 32, seed=0)
  idx = np.arange(len(src))
  kw = dict(pp="to_rgb|rand_augment(2, 10)|flip_lr(0.5)", global_batch=4, seed=5)
  reference = _batches(iter(pipeline.train_dataset(src, idx, **kw)), 6)
  it = iter(pipeline.train_dataset(src, idx, workers=2, **kw))
  first = _batches(it, 3)
  state = it.get_state()
  it.close()
  resumed = iter(pipeline.train_dataset(src, idx, workers=2, **kw))
  resumed.set_state(state)
  rest = _batches(resumed, 1)
  workers = multiprocessing.active_children()
  assert workers
  for w in workers:
    os.kill(w.pid, signal.SIGINT)
  time.sleep(1)
  assert all(w.is_alive() for w in workers)
  rest += _batches(resumed, 2)
  resumed.close()
  for x, y in zip(reference, first + rest):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_preprocessing_failure_names_the_example():
  src = PhantomSource("ct", 2, 32, seed=0)
  ds = pipeline.eval_dataset(src, np.arange(len(src)), pp="normalize('imagenet')", global_batch=2)
  with pytest.raises(DataError, match=r"phantom sample 0 .*preprocessing \"normalize\('imagenet'\)\" failed.*to_rgb"):
    next(iter(ds))
