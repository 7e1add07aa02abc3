"""Augmentations: reference behaviour (PIL, torchvision semantics), masks following the image,
and per-element determinism."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from cxflax.data import transforms
from cxflax.data.phantom import Phantom
from cxflax.errors import ConfigError


def _example(size=48, seed=0):
  ex = Phantom("ct", 2, size, seed=seed)[0]
  return {"image": transforms.to_float(ex["image"]), "lung_mask": ex["lung_mask"],
          "lesion_mask": ex["lesion_mask"]}


def _rng(seed=0):
  return np.random.default_rng(seed)


def _apply(spec, ex, seed=0):
  ops = transforms.parse(spec)
  for op in ops:
    ex = op(ex, _rng(seed))
  return ex


@pytest.mark.parametrize("name,fn", [("Brightness", transforms.adjust_brightness),
                                     ("Color", transforms.adjust_saturation),
                                     ("Contrast", transforms.adjust_contrast),
                                     ("Sharpness", transforms.adjust_sharpness)])
@pytest.mark.parametrize("factor", [0.3, 1.6])
def test_enhance_ops_match_pil(name, fn, factor):
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
  ref = np.asarray(getattr(ImageEnhance, name)(Image.fromarray(img)).enhance(factor), np.float32) / 255
  ours = fn(img.astype(np.float32) / 255, factor)
  # PIL rounds to uint8 (and its contrast uses the rounded mean): within 2 grey levels.
  assert np.abs(ours - ref).max() <= 2.5 / 255


def _iou(a, b):
  a, b = a > 0.5, b > 0.5
  return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize("spec", ["rotate(40)", "shift_scale_rotate(0.1, 0.2, 30, p=1.0)",
                                  "random_resized_crop(40, scale=(0.3, 0.8))", "center_crop(30)",
                                  "random_crop(30, 36)", "resize(20, 36)", "resize(20, interpolation='bicubic')", "flip_lr(1.0)|flip_ud(1.0)"])
def test_masks_follow_the_image(spec):
  """Transform an image whose content *is* its mask: the warped image and warped mask agree."""
  ex = _example()
  mask = ex["lung_mask"].astype(np.float32)
  out = _apply(spec, {"image": mask.copy(), "lung_mask": ex["lung_mask"]}, seed=3)
  assert out["image"].shape[:2] == out["lung_mask"].shape[:2]
  assert set(np.unique(out["lung_mask"])) <= {0, 1}
  assert _iou(out["image"][..., 0], out["lung_mask"][..., 0]) > 0.9


def test_geometric_ops_really_move_pixels():
  ex = _example()
  for spec in ["rotate(40)", "shift_scale_rotate(0.1, 0.2, 30, p=1.0)", "random_resized_crop(48, scale=(0.3, 0.5))"]:
    out = _apply(spec, ex, seed=3)
    assert not np.allclose(out["image"], ex["image"]) and not np.array_equal(out["lung_mask"], ex["lung_mask"])


def test_rand_augment_has_seed_001_operations_and_keeps_masks_aligned():
  assert set(transforms.RAND_AUGMENT_OPS) == {"rotate", "color", "contrast", "brightness", "sharpness",
                                              "shear_x", "shear_y", "cutout", "translate_x", "translate_y"}
  ex = _example()
  ex["image"] = ex["image"] * np.array([1.0, 0.8, 0.6], np.float32)  # tinted: colour ops act
  mask = ex["lung_mask"].astype(np.float32)
  for op in transforms.RAND_AUGMENT_OPS:
    out = _apply(f"rand_augment(1, 20, ops=('{op}',))", ex, seed=5)
    assert not np.allclose(out["image"], ex["image"]), op
    geometric = op in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
    assert (not np.array_equal(out["lung_mask"], ex["lung_mask"])) == geometric, op
    if geometric:
      moved = _apply(f"rand_augment(1, 20, ops=('{op}',))", {"image": mask, "lung_mask": ex["lung_mask"]}, seed=5)
      assert _iou(moved["image"][..., 0], moved["lung_mask"][..., 0]) > 0.9, op
  assert np.array_equal(_apply("rand_augment(2, 0, ops=('rotate',))", ex)["image"], ex["image"])


def test_random_resized_crop_sizes_and_color_ops():
  ex = _example()
  out = _apply("random_resized_crop(32)|color_jitter(0.4, 0.4, 0.4)|lighting(0.2, p=1.0)", ex)
  assert out["image"].shape == (32, 32, 1) and 0 <= out["image"].min() and out["image"].max() <= 1
  assert np.array_equal(_apply("lighting(0.2, p=0.0)", ex)["image"], ex["image"])


def test_normalizations():
  ex = {"image": np.array([[[0.0], [1.0]]], np.float32)}
  np.testing.assert_allclose(_apply("normalize('xrv')", ex)["image"].ravel(), [-1024, 1024])
  # FLANNEL's Normalize((0.5,), (0.5,)), timm's Inception statistics: [0, 1] → [-1, 1] per channel
  ramp = {"image": np.linspace(0, 1, 6, dtype=np.float32).reshape(1, 2, 3)}
  np.testing.assert_allclose(_apply("normalize('inception')", ramp)["image"].ravel(),
                             np.linspace(-1, 1, 6), atol=1e-6)
  with pytest.raises(ConfigError, match="unknown statistics 'imagenett'.*'inception'"):
    transforms.parse("normalize('imagenett')")
  rgb = _apply("to_rgb|normalize('imagenet')", {"image": np.full((1, 1, 1), 0.5, np.float32)})["image"]
  np.testing.assert_allclose(rgb.ravel(), (0.5 - np.array(transforms.IMAGENET_MEAN)) / transforms.IMAGENET_STD, rtol=1e-6)
  with pytest.raises(ConfigError, match="resolved by the input pipeline"):
    transforms.parse("normalize('dataset')")


def test_resize_interpolation_is_pils_filter_on_float_pixels():
  rng = np.random.default_rng(2)
  img = rng.uniform(size=(17, 23, 2)).astype(np.float32)
  mask = (rng.uniform(size=(17, 23, 1)) > 0.5).astype(np.uint8)
  for name, method in [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC), ("nearest", Image.NEAREST)]:
    out = _apply(f"resize(9, 31, interpolation='{name}')", {"image": img, "lung_mask": mask})
    ref = np.stack([np.asarray(Image.fromarray(img[..., c], mode="F").resize((31, 9), method))
                    for c in range(2)], -1)
    np.testing.assert_array_equal(out["image"], ref)
    assert out["image"].shape == (9, 31, 2) and set(np.unique(out["lung_mask"])) <= {0, 1}
  assert np.array_equal(_apply("resize(9, 31)", {"image": img})["image"],  # bilinear by default
                        _apply("resize(9, 31, interpolation='bilinear')", {"image": img})["image"])
  assert not np.allclose(_apply("resize(9, 31, interpolation='bicubic')", {"image": img})["image"],
                         _apply("resize(9, 31)", {"image": img})["image"])
  with pytest.raises(ConfigError, match="interpolation must be one of bilinear, bicubic, nearest, got 'cubic'"):
    transforms.parse("resize(8, interpolation='cubic')")


def test_random_crop_takes_an_unscaled_window_at_every_position():
  img = np.arange(8 * 10, dtype=np.float32).reshape(8, 10, 1)
  corners = set()
  for seed in range(200):
    out = _apply("random_crop(5, 7)", {"image": img}, seed=seed)["image"]
    top, left = divmod(int(out[0, 0, 0]), 10)
    np.testing.assert_array_equal(out, img[top:top + 5, left:left + 7])  # a window, not resampled
    corners.add((top, left))
  assert corners == {(t, l) for t in range(4) for l in range(4)}  # uniform over all 4 × 4 positions
  small = _apply("random_crop(6)", {"image": np.ones((4, 6, 1), np.float32)})["image"]
  np.testing.assert_array_equal(small[..., 0].sum(1), [0, 6, 6, 6, 6, 0])  # zero-padded, centred


def test_preprocess_is_deterministic_per_element():
  pp = transforms.Preprocess("rand_augment(2, 15)|flip_lr(0.5)|rotate(20)")
  ex = {"image": Phantom("ct", 1, 32)[0]["image"]}
  a = pp.random_map(dict(ex), np.random.default_rng([7, 1]))["image"]
  b = pp.random_map(dict(ex), np.random.default_rng([7, 1]))["image"]
  c = pp.random_map(dict(ex), np.random.default_rng([7, 2]))["image"]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("spec,match", [("rotate(p=2)", "probability"), ("rand_augment(2, 40)", "0 <= m <= 30"),
                                        ("rand_augment(1, 5, ops=('solarize',))", "unknown RandAugment"),
                                        ("random_resized_crop(8, scale=(0.5, 0.2))", "scale")])
def test_bad_arguments_are_config_errors(spec, match):
  with pytest.raises(ConfigError, match=match):
    transforms.parse(spec)


def test_to_gray_equalize_gamma_and_mask_image_pixel_values():
  """The lung-segmentation preprocessing (seed 003: histogram equalisation then gamma) and the
  patch classifier's masking, on pixels whose results are worked out by hand."""
  rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], np.uint8)
  gray = transforms.Preprocess("to_gray").random_map({"image": rgb}, _rng())["image"]
  np.testing.assert_allclose(gray[..., 0], [[0.299, 0.587], [0.114, 1.0]], atol=1e-6)  # ITU-R 601, as PIL's 'L'
  ref = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255
  assert np.abs(gray[..., 0] - ref).max() <= 0.5 / 255  # PIL rounds to 8 bits
  # Equalisation: grey levels 0, 64 (twice), 128, 255 → their cumulative counts 1, 3, 4, 5 of 5,
  # shifted so that the darkest level maps to 0: (c - 1) / 4.
  img = np.array([[0, 64, 64, 128, 255]], np.uint8)[..., None]
  eq = transforms.Preprocess("equalize").random_map({"image": img}, _rng())["image"]
  np.testing.assert_allclose(eq[0, :, 0], [0.0, 0.5, 0.5, 0.75, 1.0], atol=1e-6)
  out = transforms.Preprocess("equalize|gamma(0.5)").random_map({"image": img}, _rng())["image"]
  np.testing.assert_allclose(out[0, :, 0], np.sqrt([0.0, 0.5, 0.5, 0.75, 1.0]), atol=1e-6)
  np.testing.assert_allclose(_apply("gamma(2.0)", {"image": np.array([[[0.5], [-0.1], [1.2]]], np.float32)})
                             ["image"][0, :, 0], [0.25, 0.0, 1.0], atol=1e-6)  # clipped to [0, 1] first
  ex = {"image": np.full((2, 3, 3), 0.8, np.float32), "lung_mask": np.array([[0, 1, 2], [0, 0, 255]], np.uint8)}
  masked = _apply("mask_image", ex)["image"]
  np.testing.assert_allclose(masked[..., 1], [[0, 0.8, 0.8], [0, 0, 0.8]], atol=1e-6)
  assert masked.shape == (2, 3, 3)
  with pytest.raises(ValueError, match="no 'lesion_mask'"):
    _apply("mask_image('lesion_mask')", ex)
