"""The built-in phantom data (cxflax.data.phantom) as a source: CT slices with their infection
percentage (or COVID / non-COVID), or X-rays of four classes; nothing is read from disk."""

from __future__ import annotations

import numpy as np

# The generator imports the Per-COVID-19 reader of this package; used only when a source is
# made, so either may be imported first (tests/test_sources.py: test_modules_load_in_any_order).
from cxflax.data import phantom as phantom_lib

from cxflax.data.sources.base import SPLITS, Source
from cxflax.data.sources.covid_ct import COVID_CT_CLASSES
from cxflax.data.sources.registry import register
from cxflax.errors import ConfigError


@register("phantom")
def _from_config(data_config, split, unlabeled_ok):
  p = data_config.phantom
  return PhantomSource(p.kind, p.num_subjects, data_config.image_size, p.slices_per_subject,
                       p.seed + 1_000_003 * SPLITS.index(split), p.get("covid_labels", False),
                       p.get("covid_min_percentage", 0.0))


class PhantomSource(Source):
  """The built-in procedural data (see cxflax.data.phantom): CT regression or CXR classes."""

  def __init__(self, kind: str = "ct", num_subjects: int = 64, image_size: int = 512,
               slices_per_subject=(3, 6), seed: int = 0, covid_labels: bool = False,
               covid_min_percentage: float = 0.0):
    self.phantom = phantom_lib.Phantom(kind, num_subjects, image_size, tuple(slices_per_subject), seed)
    self._labels = None
    self.covid_labels = covid_labels and kind == "ct"
    self.covid_min_percentage = float(covid_min_percentage)
    if not 0.0 <= self.covid_min_percentage < 100.0:
      raise ConfigError(f"phantom covid_min_percentage must be in [0, 100), got {covid_min_percentage}")
    if kind == "cxr":
      self.task, self.class_names = "classification", phantom_lib.CXR_CLASS_NAMES
    elif self.covid_labels:  # COVID-CT-like: a slice is COVID when lesions cover > min % of its lung
      self.task, self.class_names = "classification", COVID_CT_CLASSES

  def __len__(self):
    return len(self.phantom)

  def subjects(self):
    return [f"phantom{self.phantom.subject(i):05d}" for i in range(len(self))]

  def labels(self):
    if self._labels is None:  # CT labels come from rendering the masks: compute them once
      if self.phantom.kind == "cxr":
        self._labels = np.array([self.phantom.subject_class(self.phantom.subject(i))
                                 for i in range(len(self))], np.int32)
      else:
        pct = np.array([self.phantom.percentage(i) for i in range(len(self))], np.float32)
        self._labels = self._covid(pct).astype(np.int32) if self.covid_labels else pct
    return self._labels

  def load(self, i):
    ex = self.phantom[i]
    if self.phantom.kind == "cxr":
      label = ex["label"]
    else:
      label = np.int32(self._covid(ex["percentage"])) if self.covid_labels else ex["percentage"]
    return dict(image=ex["image"], label=label, lung_mask=ex["lung_mask"],
                lesion_mask=ex["lesion_mask"])

  def _covid(self, percentage):
    return np.asarray(percentage) > self.covid_min_percentage

  def describe(self, i):
    return f"phantom sample {i} ({self.phantom.kind}, seed {self.phantom.seed})"

  def example_name(self, i):
    return f"Image_{i:05d}.png"  # the name export.py gives it

