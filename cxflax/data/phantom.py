"""Procedurally generated chest CT slices and chest X-rays: the built-in "phantom" data.

No dataset can be downloaded where cxflax is developed and tested, so cxflax makes its own. A
phantom is a deterministic function of (seed, subject, slice): any sample of any size can be
rendered on the fly, in any process, without files.

CT slices (axial, lung window) show a body outline with subcutaneous fat, two lungs with vessels,
the heart, the spine, and COVID-19-like lesions: ground-glass opacities (faint, textured, soft
edges) and consolidations (dense, sharper edges), of random count, size and intensity. Lesions are
ellipsoids in 3-D, so the several slices of one subject cut the same lesions at different heights
and are correlated, as real slices of one scan are. Scanner-like variation (pose, field of view,
gain, offset, blur, noise) is drawn per subject.

The chest-X-ray variant is a frontal projection whose class decides where and how lesions
appear: ``normal`` has none; ``bacterial`` a dense lobar consolidation in one lung; ``viral``
bilateral perihilar haze with interstitial streaks; ``covid19`` bilateral, peripheral,
lower-zone ground-glass patches.

Every sample carries its image (uint8, as read from an 8-bit PNG), the lung mask, the lesion
mask, the exact infection percentage (lesion pixels inside the lungs / lung pixels x 100, on the
rendered masks), the subject id, the severity class of the percentage and, for X-rays, the class.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

from cxflax.data.sources.per_covid19 import severity_class

KINDS = ("ct", "cxr")
CXR_CLASS_NAMES = ("normal", "bacterial", "viral", "covid19")


@dataclasses.dataclass(frozen=True)
class _Shape:
  """A lobulated ellipse in normalised image coordinates ([-1, 1], x to the right, y down)."""
  cx: float
  cy: float
  a: float
  b: float
  angle: float = 0.0
  harmonics: tuple[tuple[int, float, float], ...] = ()  # (order, amplitude, phase)

  def posed(self, pose: "_Pose") -> "_Shape":
    c, s = math.cos(pose.angle), math.sin(pose.angle)
    return dataclasses.replace(
        self, cx=pose.zoom * (c * self.cx - s * self.cy) + pose.dx,
        cy=pose.zoom * (s * self.cx + c * self.cy) + pose.dy,
        a=self.a * pose.zoom, b=self.b * pose.zoom, angle=self.angle + pose.angle)

  def rho(self, size: int):
    """(window, rho): the normalised radius on the pixels of its bounding box; inside is rho < 1.

    Returns None when the shape misses the image. Evaluating only the bounding box keeps the
    cost of many small shapes (vessels, streaks) low at 512 px.
    """
    extent = max(self.a, self.b) * (1.0 + sum(abs(h[1]) for h in self.harmonics))
    to_px = lambda t: (t + 1.0) * 0.5 * size - 0.5
    c0, c1 = max(0, math.floor(to_px(self.cx - extent))), min(size, math.ceil(to_px(self.cx + extent)) + 1)
    r0, r1 = max(0, math.floor(to_px(self.cy - extent))), min(size, math.ceil(to_px(self.cy + extent)) + 1)
    if c0 >= c1 or r0 >= r1:
      return None
    xs = (np.arange(c0, c1, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0 - self.cx
    ys = (np.arange(r0, r1, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0 - self.cy
    c, s = math.cos(self.angle), math.sin(self.angle)
    u = (c * xs[None, :] + s * ys[:, None]) / self.a
    v = (-s * xs[None, :] + c * ys[:, None]) / self.b
    rho = np.hypot(u, v)
    if self.harmonics:
      theta = np.arctan2(v, u)
      rho /= 1.0 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in self.harmonics)
    return (slice(r0, r1), slice(c0, c1)), rho


@dataclasses.dataclass(frozen=True)
class _Pose:
  """Patient placement and field of view, drawn per subject: rotation, zoom and shift."""
  angle: float = 0.0
  zoom: float = 1.0
  dx: float = 0.0
  dy: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Lesion:
  """A lesion in lung-relative coordinates: an ellipsoid in (u, v, z) of one lung."""
  side: int  # 0: lung on the image's left, 1: on its right
  u: float
  v: float
  z: float
  ru: float
  rv: float
  rz: float
  angle: float
  harmonics: tuple
  amplitude: float
  edge: float  # width of the soft edge, in units of rho
  textured: bool  # ground glass is mottled, consolidation is uniform

  def section(self, z: float, lung: _Shape) -> _Shape | None:
    """The lesion's cross-section at height z, placed in the given lung outline."""
    dz = (z - self.z) / self.rz
    if abs(dz) >= 1.0:
      return None
    k = math.sqrt(1.0 - dz * dz)
    return _Shape(lung.cx + self.u * lung.a, lung.cy + self.v * lung.b, self.ru * lung.a * k,
                  self.rv * lung.b * k, self.angle, self.harmonics)


def _harmonics(rng: np.random.Generator, orders, scale: float) -> tuple:
  return tuple((k, float(rng.uniform(0, scale) / k), float(rng.uniform(0, 2 * math.pi))) for k in orders)


def _smoothstep(t):
  t = np.clip(t, 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """Low-frequency noise of unit-ish amplitude: a coarse random grid upsampled bicubically."""
  coarse = rng.standard_normal((cells, cells)).astype(np.float32)
  return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))


def _blur(img: np.ndarray, passes: int) -> np.ndarray:
  """Separable [1, 2, 1] / 4 blur, applied `passes` times (a scanner's point spread)."""
  for _ in range(passes):
    p = np.pad(img, 1, mode="edge")
    img = 0.25 * p[:-2, 1:-1] + 0.5 * p[1:-1, 1:-1] + 0.25 * p[2:, 1:-1]
    p = np.pad(img, 1, mode="edge")
    img = 0.25 * p[1:-1, :-2] + 0.5 * p[1:-1, 1:-1] + 0.25 * p[1:-1, 2:]
  return img


def _fill(img, mask, shape: _Shape, size: int, value=None, add=None, within=None):
  """Paints a shape: sets `value` and/or adds `add` where rho < 1 (and `within`, if given)."""
  hit = shape.rho(size)
  if hit is None:
    return
  win, rho = hit
  inside = rho < 1.0
  if within is not None:
    inside &= within[win]
  if value is not None:
    img[win][inside] = value
  if add is not None:
    img[win][inside] += add
  if mask is not None:
    mask[win] |= inside


def _mottle(rng, size) -> np.ndarray:
  """Multiplicative texture around 1 that makes ground glass look mottled."""
  return np.clip(0.85 + 0.3 * _smooth_noise(rng, size, 40), 0.3, 1.5)


@dataclasses.dataclass
class _Geometry:
  """The posed shapes that decide a sample's masks: lungs, the heart cut out of them, lesions."""
  lungs: list
  heart: _Shape | None
  lesions: list  # (_Lesion, its posed cross-section)

  def masks(self, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(lung, lesion) boolean masks; the lesion mask lies inside the lung mask by construction."""
    lung = np.zeros((size, size), bool)
    lesion = np.zeros((size, size), bool)
    for l in self.lungs:
      _fill(None, lung, l, size)
    if self.heart is not None and (hit := self.heart.rho(size)) is not None:
      win, rho = hit
      lung[win] &= rho >= 1.0
    for _, sec in self.lesions:
      _fill(None, lesion, sec, size, within=lung)
    return lung, lesion

  def paint_lesions(self, img, lung, mottle, size: int):
    """Adds each lesion's opacity inside the lung: dense and uniform, or faint and mottled."""
    for les, sec in self.lesions:
      if (hit := sec.rho(size)) is None:
        continue
      win, rho = hit
      opacity = les.amplitude * _smoothstep((1.0 - rho) / les.edge)
      if les.textured:
        opacity = opacity * mottle[win]
      img[win] += np.where((rho < 1.0) & lung[win], opacity, 0.0).astype(np.float32)


@dataclasses.dataclass
class _Scanner:
  gain: float
  offset: float
  noise: float
  blur: int


def _draw_scanner(rng) -> _Scanner:
  return _Scanner(gain=float(rng.uniform(0.85, 1.15)), offset=float(rng.uniform(-0.05, 0.05)),
                  noise=float(rng.uniform(0.008, 0.035)), blur=int(rng.integers(0, 3)))


def _draw_pose(rng) -> _Pose:
  return _Pose(angle=float(rng.uniform(-0.12, 0.12)), zoom=float(rng.uniform(0.88, 1.08)),
               dx=float(rng.uniform(-0.05, 0.05)), dy=float(rng.uniform(-0.05, 0.05)))


def _finish(img, scanner: _Scanner, rng, size) -> np.ndarray:
  img = _blur(img, scanner.blur) if scanner.blur else img
  img = img * scanner.gain + scanner.offset
  img = img + rng.normal(0.0, scanner.noise, img.shape).astype(np.float32)
  return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# CT


def _ct_subject(rng: np.random.Generator) -> dict[str, Any]:
  """Anatomy, disease and scanner of one CT subject."""
  healthy = rng.uniform() < 0.22
  burden = 0.0 if healthy else float(rng.uniform(0.05, 1.0) ** 1.3)
  lesions = []
  for _ in range(0 if healthy else 1 + rng.poisson(1.0 + 12.0 * burden)):
    side = int(rng.integers(0, 2))
    # COVID-19 lesions favour the periphery and the dependent (posterior) lung.
    r = math.sqrt(rng.uniform(0.15, 1.0)) * 0.8
    t = rng.uniform(0, 2 * math.pi)
    u, v = r * math.cos(t), abs(r * math.sin(t)) * (1.0 if rng.uniform() < 0.7 else -1.0)
    size = rng.uniform(0.12, 0.3 + 0.9 * burden)
    consolidation = rng.uniform() < 0.3
    lesions.append(_Lesion(
        side=side, u=u, v=v, z=float(rng.uniform(-0.9, 0.9)),
        ru=size * rng.uniform(0.7, 1.3), rv=size * rng.uniform(0.7, 1.3),
        rz=float(rng.uniform(0.15, 0.45 + 0.5 * burden)), angle=float(rng.uniform(0, math.pi)),
        harmonics=_harmonics(rng, (2, 3, 5), 0.5),
        amplitude=float(rng.uniform(0.42, 0.58) if consolidation else rng.uniform(0.14, 0.32)),
        edge=float(rng.uniform(0.05, 0.12) if consolidation else rng.uniform(0.2, 0.45)),
        textured=not consolidation))
  return dict(
      pose=_draw_pose(rng), scanner=_draw_scanner(rng),
      body=_Shape(0.0, 0.05, rng.uniform(0.8, 0.92), rng.uniform(0.58, 0.72), 0.0,
                  _harmonics(rng, (2, 3), 0.05)),
      fat=float(rng.uniform(0.04, 0.09)),
      tissue=float(rng.uniform(0.5, 0.6)),
      lung_level=float(rng.uniform(0.05, 0.11)),
      lungs=[_Shape(-0.37 + rng.uniform(-0.03, 0.03), 0.0, rng.uniform(0.26, 0.31),
                    rng.uniform(0.4, 0.47), rng.uniform(-0.1, 0.1), _harmonics(rng, (2, 3), 0.06)),
             _Shape(0.36 + rng.uniform(-0.03, 0.03), 0.0, rng.uniform(0.25, 0.3),
                    rng.uniform(0.4, 0.47), rng.uniform(-0.1, 0.1), _harmonics(rng, (2, 3), 0.06))],
      heart=_Shape(0.12, -0.12, rng.uniform(0.2, 0.26), rng.uniform(0.17, 0.22), 0.3),
      lesions=lesions)


def _lung_at(lung: _Shape, z: float) -> _Shape:
  """The lung outline at height z in [-1, 1] (apex to base): narrow at the apex."""
  s = 0.45 + 0.55 * math.sqrt(max(0.0, 1.0 - (z / 1.15) ** 2))
  return dataclasses.replace(lung, a=lung.a * s, b=lung.b * s, cy=lung.cy + 0.04 * z)


def _ct_geometry(subj, z: float) -> _Geometry:
  pose = subj["pose"]
  lungs = [_lung_at(l, z) for l in subj["lungs"]]
  heart = None
  if z > -0.35:  # the heart sits between the lower lungs and indents the left one
    grow = 0.6 + 0.4 * (z + 0.35) / 1.35
    heart = dataclasses.replace(subj["heart"], a=subj["heart"].a * grow,
                                b=subj["heart"].b * grow).posed(pose)
  lesions = [(les, les.section(z, lungs[les.side])) for les in subj["lesions"]]
  return _Geometry(lungs=[l.posed(pose) for l in lungs], heart=heart,
                   lesions=[(les, sec.posed(pose)) for les, sec in lesions if sec is not None])


def _render_ct(subj, z: float, size: int, rng: np.random.Generator):
  pose = subj["pose"]
  geo = _ct_geometry(subj, z)
  lung, lesion = geo.masks(size)
  img = np.zeros((size, size), np.float32)
  _fill(img, None, subj["body"].posed(pose), size, value=subj["tissue"] - subj["fat"])
  inner = dataclasses.replace(subj["body"], a=subj["body"].a - 0.06, b=subj["body"].b - 0.06)
  _fill(img, None, inner.posed(pose), size, value=subj["tissue"])
  img[lung] = subj["lung_level"] + 0.015 * _smooth_noise(rng, size, 24)[lung]
  for _ in range(int(rng.integers(20, 45))):  # vessels: bright dots denser near the hilum
    l = geo.lungs[int(rng.integers(0, 2))]
    r, t = rng.uniform(0, 0.9) ** 1.5, rng.uniform(0, 2 * math.pi)
    rad = rng.uniform(0.006, 0.018) * (1.3 - r)
    dot = _Shape(l.cx + r * math.cos(t) * l.a, l.cy + r * math.sin(t) * l.b, rad,
                 rad * rng.uniform(0.6, 1.0), float(t))
    _fill(img, None, dot, size, add=float(rng.uniform(0.2, 0.4)), within=lung)
  geo.paint_lesions(img, lung, _mottle(rng, size), size)
  _fill(img, None, _Shape(0.0, 0.56, 0.085, 0.08).posed(pose), size, value=0.9)  # vertebra
  if z < -0.3:  # trachea in the upper slices
    _fill(img, None, _Shape(0.0, -0.22, 0.045, 0.04).posed(pose), size, value=0.0)
  return _finish(img, subj["scanner"], rng, size), lung, lesion


# ---------------------------------------------------------------------------------------------
# Chest X-ray


def _cxr_lesions(rng: np.random.Generator, cls: int) -> list[_Lesion]:
  """Lesions (in lung-relative coordinates, z unused) typical of each class."""
  def les(side, u, v, ru, rv, angle, amplitude, edge, textured, harm=0.4):
    return _Lesion(side, u, v, 0.0, ru, rv, 1.0, angle, _harmonics(rng, (2, 3, 5), harm),
                   amplitude, edge, textured)
  out = []
  name = CXR_CLASS_NAMES[cls]
  if name == "bacterial":  # lobar consolidation, one lung, dense, well defined
    side = int(rng.integers(0, 2))
    for _ in range(1 if rng.uniform() < 0.7 else 2):
      out.append(les(side, rng.uniform(-0.4, 0.4), rng.uniform(0.0, 0.6), rng.uniform(0.5, 0.8),
                     rng.uniform(0.3, 0.5), rng.uniform(-0.4, 0.4), rng.uniform(0.3, 0.42),
                     rng.uniform(0.05, 0.12), False, 0.25))
  elif name == "viral":  # bilateral perihilar haze and interstitial streaks
    for side in (0, 1):
      medial = 0.45 if side == 0 else -0.45
      out.append(les(side, medial, rng.uniform(-0.1, 0.15), rng.uniform(0.3, 0.45),
                     rng.uniform(0.3, 0.5), 0.0, rng.uniform(0.08, 0.13), 0.6, True, 0.2))
      for _ in range(int(rng.integers(8, 16))):
        t = rng.uniform(-math.pi / 2.5, math.pi / 2.5) + (0.0 if side == 1 else math.pi)
        r = rng.uniform(0.25, 0.7)
        out.append(les(side, medial + r * math.cos(t), r * math.sin(t), rng.uniform(0.18, 0.32),
                       rng.uniform(0.025, 0.05), t, rng.uniform(0.12, 0.2), 0.3, False, 0.0))
  elif name == "covid19":  # bilateral, peripheral, lower zones, ground glass
    for side in (0, 1):
      lateral = -1.0 if side == 0 else 1.0
      for _ in range(int(rng.integers(2, 5))):
        out.append(les(side, lateral * rng.uniform(0.45, 0.8), rng.uniform(0.1, 0.75),
                       rng.uniform(0.18, 0.35), rng.uniform(0.18, 0.35), rng.uniform(0, math.pi),
                       rng.uniform(0.15, 0.26), rng.uniform(0.3, 0.5), True))
  return out


def _cxr_subject(rng: np.random.Generator, cls: int) -> dict[str, Any]:
  return dict(
      cls=cls, pose=_draw_pose(rng), scanner=_draw_scanner(rng),
      body=_Shape(0.0, 0.1, rng.uniform(0.82, 0.95), rng.uniform(1.0, 1.1), 0.0),
      tissue=float(rng.uniform(0.38, 0.48)),
      lung_level=float(rng.uniform(0.12, 0.2)),
      lungs=[_Shape(-0.34 + rng.uniform(-0.03, 0.03), -0.02, rng.uniform(0.2, 0.25),
                    rng.uniform(0.5, 0.58), rng.uniform(-0.06, 0.0), _harmonics(rng, (2, 3), 0.05)),
             _Shape(0.33 + rng.uniform(-0.03, 0.03), -0.02, rng.uniform(0.19, 0.24),
                    rng.uniform(0.48, 0.56), rng.uniform(0.0, 0.06), _harmonics(rng, (2, 3), 0.05))],
      heart=_Shape(0.1, 0.3, rng.uniform(0.24, 0.3), rng.uniform(0.18, 0.23), 0.2),
      rib_phase=float(rng.uniform(0, 2 * math.pi)),
      rib_frequency=float(rng.uniform(5.5, 7.0)),
      lesions=_cxr_lesions(rng, cls))


def _cxr_geometry(subj, z: float) -> _Geometry:
  """z in [-1, 1] varies the depth of inspiration between views of one subject."""
  pose = subj["pose"]
  lungs = [dataclasses.replace(l, b=l.b * (1.0 + 0.04 * z)) for l in subj["lungs"]]
  return _Geometry(lungs=[l.posed(pose) for l in lungs], heart=subj["heart"].posed(pose),
                   lesions=[(les, les.section(0.0, lungs[les.side]).posed(pose))
                            for les in subj["lesions"]])


def _render_cxr(subj, z: float, size: int, rng: np.random.Generator):
  """A frontal chest radiograph."""
  pose = subj["pose"]
  geo = _cxr_geometry(subj, z)
  lung, lesion = geo.masks(size)
  img = np.full((size, size), 0.03, np.float32)
  _fill(img, None, subj["body"].posed(pose), size, value=subj["tissue"])
  img[lung] = subj["lung_level"]
  _fill(img, None, geo.heart, size, value=subj["tissue"] + 0.12)
  _fill(img, None, _Shape(0.0, -0.1, 0.09, 0.8).posed(pose), size, value=subj["tissue"] + 0.1)
  ys = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
  ribs = np.sin(2 * math.pi * subj["rib_frequency"] * (ys[:, None] * 0.5 + 0.12 * ys[None, :] ** 2)
                + subj["rib_phase"])
  img += np.where(lung, 0.06 * _smoothstep((ribs - 0.3) / 0.4), 0.0).astype(np.float32)
  img += np.where(lung, 0.02 * _smooth_noise(rng, size, 20), 0.0).astype(np.float32)
  geo.paint_lesions(img, lung, _mottle(rng, size), size)
  return _finish(img, subj["scanner"], rng, size), lung, lesion


# ---------------------------------------------------------------------------------------------


class Phantom:
  """A deterministic collection of phantom samples; ``phantom[i]`` renders sample i.

  Args:
    kind: "ct" (axial slices, regression of the infection percentage) or "cxr" (frontal
      radiographs, four classes).
    num_subjects: number of subjects; each contributes several correlated slices (CT) or views.
    image_size: side of the square images, any size from 16 px up.
    slices_per_subject: (min, max) slices per subject, drawn per subject.
    seed: everything follows from it.
    class_probs: CXR only, the prior over CXR_CLASS_NAMES (uniform by default).
  """

  def __init__(self, kind: str = "ct", num_subjects: int = 64, image_size: int = 512,
               slices_per_subject: tuple[int, int] = (3, 6), seed: int = 0,
               class_probs: tuple[float, ...] | None = None):
    if kind not in KINDS:
      raise ValueError(f"phantom kind must be one of {KINDS}, got {kind!r}")
    if image_size < 16:
      raise ValueError(f"phantom image_size must be at least 16, got {image_size}")
    if num_subjects < 1:
      raise ValueError(f"phantom num_subjects must be at least 1, got {num_subjects}")
    lo, hi = slices_per_subject
    if not 1 <= lo <= hi:
      raise ValueError(f"slices_per_subject must be (min, max) with 1 <= min <= max, got {slices_per_subject}")
    self.kind, self.num_subjects, self.image_size, self.seed = kind, num_subjects, image_size, seed
    self._kind_code = KINDS.index(kind)
    if class_probs is None:
      class_probs = (1.0 / len(CXR_CLASS_NAMES),) * len(CXR_CLASS_NAMES)
    if len(class_probs) != len(CXR_CLASS_NAMES) or min(class_probs) < 0 or sum(class_probs) <= 0:
      raise ValueError(f"class_probs must be {len(CXR_CLASS_NAMES)} non-negative weights, got {class_probs}")
    self._class_probs = np.asarray(class_probs, np.float64) / sum(class_probs)
    self._subject_cache: dict[int, dict] = {}
    # (subject, slice index, z) for every sample; cheap, so the sample count is known up front.
    self._index = []
    for s in range(num_subjects):
      rng = self._rng(s, "slices")
      n = int(rng.integers(lo, hi + 1))
      zs = np.sort(rng.uniform(-0.75, 0.75, n)) if kind == "ct" else rng.uniform(-1, 1, n)
      self._index.extend((s, j, float(z)) for j, z in enumerate(zs))

  def _rng(self, subject: int, *stream) -> np.random.Generator:
    words = [self.seed & 0xFFFFFFFF, self._kind_code, subject] + [
        int.from_bytes(str(t).encode()[:8].ljust(8, b"\0"), "little") if isinstance(t, str) else int(t)
        for t in stream]
    return np.random.default_rng(words)

  def __len__(self) -> int:
    return len(self._index)

  def subject(self, i: int) -> int:
    return self._index[i][0]

  def subject_class(self, subject: int) -> int:
    """CXR class of a subject, drawn from the class prior without rendering anything."""
    return int(self._rng(subject, "class").choice(len(CXR_CLASS_NAMES), p=self._class_probs))

  def _subject(self, s: int) -> dict:
    if s not in self._subject_cache:
      if len(self._subject_cache) > 4096:
        self._subject_cache.clear()
      rng = self._rng(s, "anatomy")
      self._subject_cache[s] = (_ct_subject(rng) if self.kind == "ct"
                                else _cxr_subject(rng, self.subject_class(s)))
    return self._subject_cache[s]

  def _locate(self, i: int):
    if not 0 <= i < len(self._index):
      raise IndexError(f"phantom sample {i} out of range [0, {len(self._index)})")
    return self._index[i]

  def percentage(self, i: int) -> float:
    """Infection percentage of sample i, from its masks alone (no image is rendered)."""
    s, _, z = self._locate(i)
    geometry = (_ct_geometry if self.kind == "ct" else _cxr_geometry)(self._subject(s), z)
    return _percentage(*geometry.masks(self.image_size), where=f"phantom sample {i}")

  def __getitem__(self, i: int) -> dict[str, Any]:
    s, j, z = self._locate(i)
    subj = self._subject(s)
    render = _render_ct if self.kind == "ct" else _render_cxr
    image, lung, lesion = render(subj, z, self.image_size, self._rng(s, "render", j))
    percentage = _percentage(lung, lesion, where=f"phantom sample {i}")
    out = dict(image=image[..., None], lung_mask=lung.astype(np.uint8)[..., None],
               lesion_mask=lesion.astype(np.uint8)[..., None], percentage=np.float32(percentage),
               severity=np.int32(severity_class(percentage)), subject=f"phantom{s:05d}",
               name=f"Image_{i:05d}.png")
    if self.kind == "cxr":
      out["label"] = np.int32(subj["cls"])
    return out


def _percentage(lung: np.ndarray, lesion: np.ndarray, where: str) -> float:
  lung_px = int(lung.sum())
  if lung_px == 0:  # cannot happen with the anatomy above; guard against a silent NaN label
    raise RuntimeError(f"{where} was rendered without lungs")
  return 100.0 * float((lesion & lung).sum()) / lung_px
