"""The built-in phantom data: determinism, exact labels, anatomy, classes, export, learnability."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxflax.data import export
from cxflax.data.phantom import CXR_CLASS_NAMES, Phantom
from cxflax.config import base_config
from cxflax.data.sources import make_source
from cxflax.data.sources.per_covid19 import severity_class


def test_deterministic_from_seed():
  a, b = Phantom("ct", 6, 64, seed=3), Phantom("ct", 6, 64, seed=3)
  c = Phantom("ct", 6, 64, seed=4)
  assert len(a) == len(b)
  for i in (0, len(a) - 1):
    for key in ("image", "lung_mask", "lesion_mask", "percentage", "subject"):
      np.testing.assert_array_equal(a[i][key], b[i][key])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_sample_does_not_depend_on_access_order():
  p, q = Phantom("ct", 5, 48, seed=1), Phantom("ct", 5, 48, seed=1)
  order = list(range(len(p)))
  first = [p[i]["image"] for i in order]
  second = [q[i]["image"] for i in reversed(order)][::-1]
  for x, y in zip(first, second):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("size", [16, 37, 96])
@pytest.mark.parametrize("kind", ["ct", "cxr"])
def test_any_size_and_exact_percentage(kind, size):
  p = Phantom(kind, 8, size, seed=0)
  for i in range(0, len(p), 3):
    ex = p[i]
    assert ex["image"].shape == ex["lung_mask"].shape == ex["lesion_mask"].shape == (size, size, 1)
    assert ex["image"].dtype == np.uint8
    lung, lesion = ex["lung_mask"][..., 0] > 0, ex["lesion_mask"][..., 0] > 0
    assert lung.sum() > 0
    assert not (lesion & ~lung).any(), "lesions must lie inside the lungs"
    assert ex["percentage"] == pytest.approx(100.0 * lesion.sum() / lung.sum(), abs=1e-5)
    assert ex["percentage"] == pytest.approx(p.percentage(i), abs=1e-5)
    assert ex["severity"] == severity_class(float(ex["percentage"]))


def test_severity_classes():
  assert [severity_class(v) for v in (0, 0.01, 10, 10.5, 25, 26, 50, 51, 75, 75.5, 100)] == \
      [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_ct_labels_cover_the_severity_range():
  p = Phantom("ct", 60, 64, seed=0)
  pct = np.array([p.percentage(i) for i in range(len(p))])
  classes = np.bincount([severity_class(v) for v in pct], minlength=6)
  assert (classes > 0).all(), f"every severity class should occur, got {classes}"
  assert 0.1 < np.mean(pct == 0) < 0.6


def _iou(a, b):
  return (a & b).sum() / max((a | b).sum(), 1)


def test_slices_of_a_subject_are_correlated():
  """Neighbouring slices of one subject cut the same 3-D lesions; other subjects' do not."""
  p = Phantom("ct", 30, 64, slices_per_subject=(4, 4), seed=2)
  same, other = [], []
  for s in range(30):
    a, b = p[4 * s + 1]["lesion_mask"] > 0, p[4 * s + 2]["lesion_mask"] > 0
    c = p[(4 * s + 6) % len(p)]["lesion_mask"] > 0
    if a.any() and b.any():
      same.append(_iou(a, b))
    if a.any() and c.any():
      other.append(_iou(a, c))
  assert np.mean(same) > np.mean(other) + 0.1


def test_cxr_classes_place_lesions_as_described():
  p = Phantom("cxr", 80, 64, slices_per_subject=(1, 1), seed=0)
  seen = set()
  for i in range(len(p)):
    ex = p[i]
    name = CXR_CLASS_NAMES[int(ex["label"])]
    seen.add(name)
    lesion = ex["lesion_mask"][..., 0] > 0
    left, right = lesion[:, :32].sum(), lesion[:, 32:].sum()
    if name == "normal":
      assert ex["percentage"] == 0
    elif name == "bacterial":  # one lung only
      assert min(left, right) == 0 and max(left, right) > 0
    else:  # viral and COVID-19: both lungs
      assert left > 0 and right > 0, (name, left, right)
  assert seen == set(CXR_CLASS_NAMES)


def test_covid_lesions_are_peripheral_and_viral_central():
  p = Phantom("cxr", 120, 96, slices_per_subject=(1, 1), seed=5)
  dist = {"viral": [], "covid19": []}
  cols = np.abs(np.arange(96) - 47.5)
  for i in range(len(p)):
    ex = p[i]
    name = CXR_CLASS_NAMES[int(ex["label"])]
    if name in dist:
      lesion = ex["lesion_mask"][..., 0] > 0
      dist[name].append(cols[np.nonzero(lesion)[1]].mean())
  assert np.mean(dist["covid19"]) > np.mean(dist["viral"]) + 3


def test_bad_arguments():
  with pytest.raises(ValueError, match="kind"):
    Phantom("mri")
  with pytest.raises(ValueError, match="image_size"):
    Phantom("ct", image_size=8)
  with pytest.raises(IndexError):
    Phantom("ct", 2, 32)[10_000]


def test_export_per_covid19_layout_round_trip(tmp_path):
  root = tmp_path / "Per-COVID-19"
  export.export_per_covid19(str(root), num_subjects=6, image_size=40, num_val_subjects=2, seed=7)
  assert (root / "Train").is_dir() and (root / "Val").is_dir() and (root / "Train.csv").is_file()
  first = (root / "Train.csv").read_text().splitlines()[0].split(",")
  assert first[0].startswith("Image_") and len(first) == 3, "header-less, as the challenge ships it"
  d = base_config().data
  d.source, d.root = "per_covid19", str(root)
  src = make_source(d, "train")
  p = Phantom("ct", 6, 40, seed=7)
  assert len(src) == len(p)
  for i in (0, len(p) - 1):
    np.testing.assert_array_equal(src.load(i)["image"], p[i]["image"])
    assert src.labels()[i] == pytest.approx(float(p[i]["percentage"]), abs=1e-4)
  assert src.subjects()[0] == p[0]["subject"]
  val = sorted(os.listdir(root / "Val"))
  assert val and all(v.endswith(".png") for v in val)


class _TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    for width in (16, 32, 64, 64):
      x = nn.Conv(width, (3, 3))(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    return nn.Dense(1)(jnp.mean(x, axis=(1, 2)))[:, 0]


@pytest.mark.optimized
def test_phantom_is_learnable():
  """A tiny CNN trained 100 steps on 48-px slices beats predicting the training mean by far (MAE
  0.34-0.35 of the baseline's at seeds 0-2, as after 300 steps)."""
  train, test = Phantom("ct", 120, 48, seed=0), Phantom("ct", 30, 48, seed=99)
  xs = np.stack([train[i]["image"] for i in range(len(train))]).astype(np.float32) / 255.0
  ys = np.array([train[i]["percentage"] for i in range(len(train))], np.float32)
  xt = np.stack([test[i]["image"] for i in range(len(test))]).astype(np.float32) / 255.0
  yt = np.array([test[i]["percentage"] for i in range(len(test))], np.float32)
  mu, sd = ys.mean(), ys.std()  # regress standardised targets

  model = _TinyCNN()
  variables = model.init(jax.random.key(0), xs[:2], train=False)
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, 100))
  params, stats = variables["params"], variables["batch_stats"]
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt, x, y):
    def loss_fn(p):
      out, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
      return jnp.mean(optax.huber_loss(out, (y - mu) / sd, delta=1.0)), upd["batch_stats"]
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), stats, opt, loss

  rng = np.random.default_rng(0)
  for _ in range(100):
    idx = rng.choice(len(xs), 32, replace=False)
    params, stats, opt, _ = step(params, stats, opt, xs[idx], ys[idx])
  pred = np.asarray(model.apply({"params": params, "batch_stats": stats}, xt, train=False)) * sd + mu
  mae = float(np.mean(np.abs(pred - yt)))
  baseline = float(np.mean(np.abs(ys.mean() - yt)))
  assert mae < 0.5 * baseline, (mae, baseline)
