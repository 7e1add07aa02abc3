"""Augmentations: reference behaviour (PIL, torchvision semantics), masks following the image,
and per-element determinism."""

import math

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
                                  "random_crop(30, 36)", "resize(20, 36)", "resize(20, interpolation='bicubic')",
                                  "flip_lr(1.0)|flip_ud(1.0)", "zoom(1.5, p=1.0)"])
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


def _reflect_101(i, n):
  """OpenCV's BORDER_REFLECT_101 index: ... 2 1 | 0 1 ... n-1 | n-2 ..., however far out."""
  period = 2 * (n - 1)
  i = np.mod(i, period)
  return np.where(i < n, i, period - i)


def test_shift_scale_rotate_reflects_the_border_as_albumentations_default():
  """A whole-pixel shift moves every pixel exactly; what enters at the border is the image
  mirrored about its edge pixels (albumentations' default cv2.BORDER_REFLECT_101), for the
  image and, nearest, for its masks; border='constant' fills zeros."""
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 1, (40, 52, 3)).astype(np.float32)
  mask = (rng.uniform(size=(40, 52, 1)) > 0.5).astype(np.uint8)
  dx, dy = 13, -7  # pixels: 0.25 of the width, -0.175 of the height
  out = transforms.shift_scale_rotate({"image": image, "lung_mask": mask}, 0.0, 1.0, (dx / 52, dy / 40))
  rows, cols = _reflect_101(np.arange(40) - dy, 40), _reflect_101(np.arange(52) - dx, 52)
  np.testing.assert_allclose(out["image"], image[rows][:, cols], atol=1e-6)
  np.testing.assert_array_equal(out["lung_mask"], mask[rows][:, cols])
  assert not np.allclose(out["image"][:, :dx], 0)  # the border is filled, not black
  constant = transforms.shift_scale_rotate({"image": image}, 0.0, 1.0, (dx / 52, dy / 40), border="constant")
  np.testing.assert_array_equal(constant["image"][:, :dx], 0)
  np.testing.assert_allclose(constant["image"][:40 + dy, dx:], image[-dy:, :52 - dx], atol=1e-6)
  # The registered op takes the border and defaults to reflect_101.
  spec_out = transforms.Preprocess("shift_scale_rotate(0.1, 0.1, 30, p=1.0)").random_map(
      {"image": image}, np.random.default_rng(5))
  assert (spec_out["image"] == 0).mean() < 0.01
  with pytest.raises(ConfigError, match="border"):
    transforms.parse("shift_scale_rotate(border='wrap')")


@pytest.mark.parametrize("angle,scale,dx,dy", [(0, 1.0, 0.25, -0.05), (20, 0.9, 0.0, 0.0),
                                               (-30, 1.1, 0.25, -0.05), (25, 0.92, -1 / 13, 0.05)])
def test_shift_scale_rotate_matches_albumentations(angle, scale, dx, dy):
  """albumentations' ShiftScaleRotate at fixed parameters with the border the papers' version
  defaulted to (reflect-101). Shifts are whole pixels (52 × 40 image): albumentations 2 rounds
  them, 1.x did not. Its angle turns counter-clockwise as displayed, ours clockwise."""
  import albumentations as A
  import cv2
  image = np.random.default_rng(1).uniform(0, 1, (40, 52, 3)).astype(np.float32)
  ref = A.ShiftScaleRotate(shift_limit_x=(dx, dx), shift_limit_y=(dy, dy), scale_limit=(scale - 1, scale - 1),
                           rotate_limit=(angle, angle), border_mode=cv2.BORDER_REFLECT_101, p=1.0)(image=image)["image"]
  ours = transforms.shift_scale_rotate({"image": image}, -angle, scale, (dx, dy))["image"]
  np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_rand_augment_has_seed_001_operations_and_keeps_masks_aligned():
  assert set(transforms.RAND_AUGMENT_OPS) == {"rotate", "color", "contrast", "brightness", "sharpness",
                                              "shear_x", "shear_y", "cutout", "translate_x", "translate_y"}
  ex = _example()
  ex["image"] = ex["image"] * np.array([1.0, 0.8, 0.6], np.float32)  # tinted: colour ops act
  mask = ex["lung_mask"].astype(np.float32)
  for op in transforms.RAND_AUGMENT_OPS:
    # 48 px: translation and cutout scaled from a 512-px image (the paper's size)
    out = _apply(f"rand_augment(1, 20, ops=('{op}',), ref_size=512)", ex, seed=5)
    assert not np.allclose(out["image"], ex["image"]), op
    geometric = op in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
    assert (not np.array_equal(out["lung_mask"], ex["lung_mask"])) == geometric, op
    if geometric:
      moved = _apply(f"rand_augment(1, 20, ops=('{op}',), ref_size=512)",
                     {"image": mask, "lung_mask": ex["lung_mask"]}, seed=5)
      assert _iou(moved["image"][..., 0], moved["lung_mask"][..., 0]) > 0.9, op
  assert np.array_equal(_apply("rand_augment(2, 0, ops=('rotate',))", ex)["image"], ex["image"])


def _x_ramp(h, w):
  """An image whose value is each pixel centre's x / w: bilinear sampling reads off coordinates."""
  return np.broadcast_to(((np.arange(w) + 0.5) / w)[None, :, None], (h, w, 1)).astype(np.float32).copy()


@pytest.mark.parametrize("ref_size,shift", [(None, 100.0), (600, 50.0)])
def test_rand_augment_translation_and_cutout_are_ildoonets_pixels(ref_size, shift):
  """At m = 30, TranslateXabs moves the image by 100 px and CutoutAbs paints a 41-px square (PIL's
  rectangle from x0 to x0 + 40, both included) of (125, 123, 114); with ref_size=600 a 300-px
  image gets half of each (20 px: a 21-px square)."""
  extra = f", ref_size={ref_size}" if ref_size else ""
  img = _x_ramp(300, 300)
  out = _apply(f"rand_augment(1, 30, ops=('translate_x',){extra})", {"image": img}, seed=2)["image"]
  inside = out[150, 120:180, 0]  # away from the uncovered border either way
  moved = (inside - img[150, 120:180, 0]) * 300  # pixels the content came from, signed
  np.testing.assert_allclose(np.abs(moved), shift, atol=1e-3)
  side = int(40 * shift / 100) + 1
  for seed in range(6):
    rgb = np.zeros((300, 300, 3), np.float32)
    cut = _apply(f"rand_augment(1, 30, ops=('cutout',){extra})", {"image": rgb}, seed=seed)["image"]
    painted = np.all(cut == np.array([125, 123, 114], np.float32) / 255, axis=-1)
    rows, cols = np.nonzero(painted.any(1))[0], np.nonzero(painted.any(0))[0]
    assert painted.sum() == len(rows) * len(cols)  # one rectangle
    for idx in (rows, cols):  # `side` long, or cut by the far border
      assert len(idx) == side or (idx[-1] == 299 and len(idx) < side)


def test_dihedral_draws_the_eight_symmetries_of_the_square():
  ex = _example()
  img, mask = ex["image"][..., 0], ex["lung_mask"][..., 0]
  d4 = lambda a: [np.rot90(f, k) for f in (a, a.T) for k in range(4)]  # built another way
  expected, expected_mask = d4(img), d4(mask)
  seen = set()
  for seed in range(60):
    out = _apply("dihedral()", ex, seed=seed)
    match = [i for i, e in enumerate(expected) if np.array_equal(out["image"][..., 0], e)]
    assert len(match) == 1
    seen.add(match[0])
    assert np.array_equal(out["lung_mask"][..., 0], expected_mask[match[0]])  # the mask follows
  assert seen == set(range(8))
  with pytest.raises(ValueError, match="square"):
    _apply("dihedral()", {"image": np.zeros((4, 6, 1), np.float32)})


def test_zoom_is_fastais_rand_zoom():
  """zoom(1.5, p=1): the output samples input = output / scale + c in fastai's [-1, 1]
  coordinates, c = (1 - 1/scale)(2 pct - 1), with scale, row_pct, col_pct drawn in that order."""
  img = _x_ramp(40, 40)
  for seed in range(4):
    out = _apply("zoom(1.5, p=1.0)", {"image": img}, seed=seed)["image"][..., 0]
    rng = _rng(seed)
    rng.uniform()  # p
    scale, _, col_pct = rng.uniform(1.0, 1.5), rng.uniform(), rng.uniform()
    x_out = 2 * (np.arange(40) + 0.5) / 40 - 1
    x_in = x_out / scale + (1 - 1 / scale) * (2 * col_pct - 1)
    # rows are all the same ramp; the edge columns may read the ramp's clamped border
    np.testing.assert_allclose(out[20, 1:-1], ((x_in + 1) / 2)[1:-1], atol=2e-3)
    assert 1.0 <= scale <= 1.5 and np.abs(x_in).max() <= 1
  assert np.array_equal(_apply("zoom(1.5, p=0.0)", {"image": img})["image"], img)


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


# --- agreement with the libraries the papers used, at fixed parameters --------------------------


def _test_images(h=48, w=64):
  """A random uint8 RGB image (every pixel differs from its neighbours: interpolation shows at
  full strength) and a smooth gradient (interpolation differences stay small)."""
  noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
  y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
  smooth = np.stack([x, y, 0.5 + 0.4 * np.sin(3 * x + 2 * y)], -1)
  return {"noise": noise, "smooth": np.round(255 * smooth).astype(np.uint8)}


class _TorchDraws:
  """A stand-in for cxflax's numpy rng whose draws are torch's, in the calls torchvision makes:
  the same torch seed then gives cxflax's sampler the very numbers torchvision's gets."""

  def uniform(self, lo, hi):
    import torch
    return torch.empty(1).uniform_(lo, hi).item()

  def integers(self, lo, hi):
    import torch
    return torch.randint(lo, hi, size=(1,)).item()


@pytest.mark.parametrize("hw,scale,ratio", [((48, 64), (0.08, 1.0), (3 / 4, 4 / 3)),
                                            ((64, 48), (0.5, 0.9), (0.5, 2.0)),
                                            ((60, 90), (0.44, 0.44), (1.0, 1.0)),  # flannel's square crops
                                            ((20, 80), (0.9, 1.0), (2 / 3, 1.5))])  # mostly the fallback
def test_random_resized_crop_box_is_torchvisions_get_params(hw, scale, ratio):
  """Fed torch's draws, cxflax's box sampler returns torchvision's box, including the fallback to
  the central crop when ten tries fail (a 20 × 80 image with near-square crops of ≥ 90% area)."""
  import torch
  from torchvision.transforms import RandomResizedCrop
  fallbacks = 0
  for seed in range(200):
    torch.manual_seed(seed)
    ref = RandomResizedCrop.get_params(torch.empty(3, *hw), list(scale), list(ratio))
    torch.manual_seed(seed)
    ours = transforms.random_resized_crop_box(*hw, scale, ratio, _TorchDraws())
    assert ours == tuple(ref), seed
    fallbacks += ours[:2] == ((hw[0] - ours[2]) // 2, (hw[1] - ours[3]) // 2)
  if hw == (20, 80):
    assert fallbacks > 100  # the fallback was exercised


@pytest.mark.parametrize("kind", ["noise", "smooth"])
@pytest.mark.parametrize("box,size", [((5, 7, 30, 40), (24, 24)),  # shrink
                                      ((10, 3, 20, 18), (56, 40))])  # enlarge
def test_resized_crop_matches_torchvision(kind, box, size):
  """The crop and bilinear resize at a fixed box against torchvision's resized_crop on the PIL
  image (what the papers' ImageFolder loaders gave it: resized by PIL in 8 bits), and on a float
  tensor (torch's antialiased bilinear, which imitates PIL's)."""
  import torch
  import torchvision.transforms.functional as TF
  img = _test_images()[kind]
  ours = transforms._crop({"image": img.astype(np.float32) / 255}, *box, out_hw=size)["image"]
  ref_pil = np.asarray(TF.resized_crop(Image.fromarray(img), *box, list(size), TF.InterpolationMode.BILINEAR),
                       np.float32) / 255
  assert ours.shape == ref_pil.shape
  # PIL's 8-bit resampling rounds its result (and its fixed-point weights): within a grey level.
  assert np.abs(ours - ref_pil).max() <= 1.01 / 255
  tensor = torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1)
  ref_t = TF.resized_crop(tensor, *box, list(size), TF.InterpolationMode.BILINEAR, antialias=True)
  np.testing.assert_allclose(ours, ref_t.permute(1, 2, 0).numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["noise", "smooth"])
@pytest.mark.parametrize("angle", [12.5, -15.0, 90.0])
def test_rotate_matches_torchvision(kind, angle):
  """rotate at a fixed angle against torchvision's rotate with RandomRotation's defaults (nearest,
  fill 0: seed 004's rotation) on the PIL image, and bilinear against torchvision on a float
  tensor. Nearest: the same sample points, so the same pixels (a sample within rounding of a
  pixel edge could pick the other neighbour; none does here); bilinear to float precision."""
  import torch
  import torchvision.transforms.functional as TF
  img = _test_images()[kind]
  x = img.astype(np.float32) / 255
  ours = transforms.rotate({"image": x}, angle, nearest=True)["image"]
  ref = np.asarray(TF.rotate(Image.fromarray(img), angle), np.float32) / 255
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  ours_bl = transforms.rotate({"image": x}, angle)["image"]
  ref_bl = TF.rotate(torch.from_numpy(x).permute(2, 0, 1), angle, TF.InterpolationMode.BILINEAR)
  ref_bl = ref_bl.permute(1, 2, 0).numpy()
  # Where every bilinear neighbour lies inside the image (torch's rotation of ones is 1 there), to
  # float precision; along the rotated image's edges torch blends the zero fill in where PIL
  # gives the fill outright: a one-pixel seam.
  inside = TF.rotate(torch.ones(1, *img.shape[:2]), angle, TF.InterpolationMode.BILINEAR)[0].numpy() > 1 - 1e-6
  assert inside.mean() > 0.5
  np.testing.assert_allclose(ours_bl[inside], ref_bl[inside], atol=1e-5)
  assert np.abs(ours_bl - ref_bl).mean() < 0.01
  # The registered op draws the angle and defaults to p = 1.
  drawn = transforms.parse("rotate(15, interpolation='nearest')")[0]({"image": x}, _rng(3))["image"]
  rng = _rng(3)
  rng.uniform()
  np.testing.assert_array_equal(drawn, transforms.rotate({"image": x}, rng.uniform(-15, 15), nearest=True)["image"])


@pytest.mark.parametrize("kind", ["noise", "smooth"])
@pytest.mark.parametrize("factor", [0.8, 1.2, 0.35])
def test_color_jitter_adjustments_match_torchvision(kind, factor):
  """adjust_brightness / contrast / saturation at a fixed factor against torchvision's on the PIL
  image (its ColorJitter on the papers' PIL images: ImageEnhance, 8-bit, contrast about the
  rounded mean grey) and on a float tensor (contrast about the mean of the grayscale image, with
  torchvision's 0.2989 red weight against PIL's 0.299)."""
  import torch
  import torchvision.transforms.functional as TF
  img = _test_images()[kind]
  x = img.astype(np.float32) / 255
  tensor = torch.from_numpy(x).permute(2, 0, 1)
  for name in ("brightness", "contrast", "saturation"):
    ours = getattr(transforms, f"adjust_{name}")(x, factor)
    ref_pil = np.asarray(getattr(TF, f"adjust_{name}")(Image.fromarray(img), factor), np.float32) / 255
    assert np.abs(ours - ref_pil).max() <= 1.51 / 255, name  # 8-bit rounding, and of the mean
    ref_t = getattr(TF, f"adjust_{name}")(tensor, factor).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, ref_t, atol=1e-4, err_msg=name)
    assert np.abs(ours - x).mean() > 0.01, name  # the adjustment did something


def test_color_jitter_op_chains_torchvisions_adjustments():
  """color_jitter(b, c, s): each factor uniform in [1 - x, 1 + x], the adjustments in a random
  order, as torchvision's ColorJitter; checked by composing torchvision's own adjustments with
  the order and factors the rng gives."""
  import torch
  import torchvision.transforms.functional as TF
  x = _test_images()["smooth"].astype(np.float32) / 255
  fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
  widths = (0.2, 0.3, 0.4)
  orders = set()
  for seed in range(8):
    out = transforms.parse("color_jitter(0.2, 0.3, 0.4)")[0]({"image": x}, _rng(seed))["image"]
    rng = _rng(seed)
    rng.uniform()  # p
    ref = torch.from_numpy(x).permute(2, 0, 1)
    order = rng.permutation(3)
    for k in order:
      f = rng.uniform(1 - widths[k], 1 + widths[k])
      ref = fns[k](ref, f)
    orders.add(tuple(order))
    np.testing.assert_allclose(out, ref.permute(1, 2, 0).numpy(), atol=2e-4)
  assert len(orders) > 2


def _fastai_v1_lighting(x, change, scale):
  """fastai v1's lighting written out from its source, in torch: Image.logit_px is logit_(px)
  (clamp_(1e-7, 1 - 1e-7), then -(1/x - 1).log()), _brightness adds scipy.special.logit(change),
  _contrast multiplies by scale (brightness first: both order 8, listed first), px is
  logit_px.sigmoid_()."""
  import torch
  t = torch.from_numpy(np.array(x)).clamp_(1e-7, 1 - 1e-7)
  t = t.reciprocal_().sub_(1).log_().neg_()
  t.add_(math.log(change / (1 - change)))
  t.mul_(scale)
  return t.sigmoid_().numpy()


@pytest.mark.parametrize("kind", ["noise", "smooth"])
@pytest.mark.parametrize("change,scale", [(0.4, 1.25), (0.6, 0.8), (0.45, 1.0), (0.5, 1.1)])
def test_lighting_is_fastai_v1s_brightness_and_contrast(kind, change, scale):
  x = _test_images()[kind].astype(np.float32) / 255
  x[0, :4] = [[0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 1]]  # the clamped extremes
  ours = transforms.lighting(x, change, scale)
  np.testing.assert_allclose(ours, _fastai_v1_lighting(x, change, scale), atol=2e-6)
  assert np.abs(ours - x).mean() > 0.005  # it changed the image
  # The op draws each with probability p, change uniform and scale log-uniform, in that order.
  out = transforms.parse("lighting(0.2, p=1.0)")[0]({"image": x}, _rng(4))["image"]
  rng = _rng(4)
  rng.uniform()
  drawn_change = rng.uniform(0.4, 0.6)
  rng.uniform()
  drawn_scale = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
  np.testing.assert_allclose(out, _fastai_v1_lighting(x, drawn_change, drawn_scale), atol=2e-6)


def _ildoonet_pil_op(img, name, v, centre=None):
  """The PIL call each of ildoonet's RandAugment operations makes on a PIL image, at value v
  (after its random sign flip), written here from its description."""
  from PIL import ImageDraw
  pil = Image.fromarray(img)
  if name == "rotate":
    return pil.rotate(v)
  coeffs = {"shear_x": (1, v, 0, 0, 1, 0), "shear_y": (1, 0, 0, v, 1, 0),
            "translate_x": (1, 0, v, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, v)}
  if name in coeffs:
    return pil.transform(pil.size, Image.AFFINE, coeffs[name])
  if name == "cutout":
    w, h = pil.size
    x0, y0 = int(max(0, centre[0] - v / 2.0)), int(max(0, centre[1] - v / 2.0))
    ImageDraw.Draw(pil).rectangle((x0, y0, min(w, x0 + v), min(h, y0 + v)), (125, 123, 114))
    return pil
  enhancer = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
              "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}[name]
  return enhancer(pil).enhance(v)


@pytest.mark.parametrize("kind", ["noise", "smooth"])
@pytest.mark.parametrize("name,v", [("rotate", 9.0), ("rotate", -27.5), ("shear_x", 0.09), ("shear_x", -0.3),
                                    ("shear_y", 0.21), ("shear_y", -0.09), ("translate_x", 30.0),
                                    ("translate_x", -12.5), ("translate_y", 30.0), ("translate_y", -7.25),
                                    ("color", 0.64), ("color", 1.6), ("contrast", 0.64), ("contrast", 1.6),
                                    ("brightness", 0.64), ("brightness", 1.6), ("sharpness", 0.64),
                                    ("sharpness", 1.6)])
def test_rand_augment_operations_match_ildoonets_pil_calls(kind, name, v):
  """Each operation at a fixed signed value (m = 9 and others) against the PIL call ildoonet's
  operation makes. Geometry is nearest neighbour in both, at the same sample points: the same
  pixels (one within rounding of a pixel edge could pick the other neighbour; none does here).
  The enhancements agree within PIL's 8-bit rounding (and its rounded mean grey for contrast)."""
  img = _test_images()[kind]
  x = img.astype(np.float32) / 255
  ours = transforms.rand_augment_op({"image": x}, name, v)["image"]
  ref = np.asarray(_ildoonet_pil_op(img, name, v), np.float32) / 255
  assert ours.shape == ref.shape
  diff = np.abs(ours - ref)
  if name in ("color", "contrast", "brightness", "sharpness"):
    assert diff.max() <= 1.51 / 255
  else:
    assert diff.max() <= 1e-6
  if not (name == "sharpness" and kind == "smooth"):  # (a gradient is its own blur)
    assert np.abs(ours - x).mean() > 0.005  # the operation did something


@pytest.mark.parametrize("v,centre", [(12.0, (20.3, 30.9)), (12.5, (3.2, 1.5)), (40.0, (60.0, 47.5)),
                                      (0.0, (10.0, 10.0))])
def test_rand_augment_cutout_matches_ildoonets_rectangle(v, centre):
  """CutoutAbs at a fixed size and centre: PIL's rectangle includes both corners (int(v) + 1 px a
  side, one pixel at v = 0) and is clipped by the image."""
  img = _test_images()["noise"]
  ours = transforms.rand_augment_op({"image": img.astype(np.float32) / 255}, "cutout", v, centre)["image"]
  ref = np.asarray(_ildoonet_pil_op(img, "cutout", v, centre), np.float32) / 255
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  assert (np.abs(ours - img / 255) > 1e-6).any(axis=-1).sum() > 0
