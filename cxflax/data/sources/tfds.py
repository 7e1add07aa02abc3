"""config.data.source='tfds': training data read from cxflax's TFDS builds (ArrayRecord)
through tfds.data_source.

No TensorFlow is imported on this path: tfds.data_source reads ArrayRecord files and decodes
examples with numpy and PIL.
"""

from __future__ import annotations

import os

import numpy as np

from cxflax.data.sources.base import Source, label_array
from cxflax.data.sources.registry import register
from cxflax.data.sources.tables import Problems, parse_percentage
from cxflax.errors import ConfigError, DataError

# config.data.tfds_name → the registered builder name (and builder config).
NAMES = {"per_covid19": "cxflax_per_covid19", "covidx": "cxflax_covidx/three_class",
         "covidx3": "cxflax_covidx/three_class", "covidx4": "cxflax_covidx/four_class",
         "covid_ct": "cxflax_covid_ct", "flannel": "cxflax_flannel"}


@register("tfds")
def _from_config(data_config, split, unlabeled_ok):
  return TfdsSource(data_config.tfds_name, split, data_config.root, data_config.on_bad_data)


class TfdsSource(Source):
  """A split of a cxflax TFDS build under data_dir; labels and subjects are read once, without
  decoding images, and range-checked as the file layouts check theirs (a build made by other
  code, or a ClassLabel's -1 'no label', must not train silently): a bad record is an error, or
  under on_bad_data='skip' is left out and counted."""

  def __init__(self, name: str, split: str, data_dir: str, on_bad_data: str = "error"):
    import tensorflow_datasets as tfds
    if name not in NAMES:
      raise ConfigError(f"config.data.tfds_name must be one of {sorted(NAMES)}, got {name!r}")
    if not data_dir or not os.path.isdir(data_dir):
      raise DataError(f"tfds: config.data.root {data_dir!r} (the TFDS data_dir) is not a directory; "
                      "build it with python -m cxflax.data.build_tfds")
    self.name, self.split, self.data_dir = name, split, data_dir
    problems = Problems(f"tfds {name} {split}", on_bad_data)
    kwargs = dict(split=split, data_dir=data_dir, download=False,
                  builder_kwargs={"file_format": "array_record"})
    try:
      self._data = tfds.data_source(NAMES[name], **kwargs)
      meta = tfds.data_source(NAMES[name], decoders={"image": tfds.decode.SkipDecoding()}, **kwargs)
      info = tfds.builder(NAMES[name], data_dir=data_dir).info
      records = [meta[i] for i in range(len(meta))]
    except Exception as e:  # tfds raises several types for a missing build or split
      raise DataError(f"tfds: cannot open {NAMES[name]} split {split!r} in {data_dir} "
                      f"({type(e).__name__}: {e})") from None
    label = info.features["label"]
    if hasattr(label, "names"):
      self.task, self.class_names = "classification", tuple(label.names)
    else:
      self.task, self.class_names = "regression", None
    self._records, labels, self._subjects, self._names = [], [], [], []
    for i, r in enumerate(records):
      value = self._check_label(r["label"], f"{_text(r['name'])} (tfds {name} {split}, record {i})", problems)
      if value is not None:
        self._records.append(i)
        labels.append(value)
        self._subjects.append(_text(r["subject"]))
        self._names.append(_text(r["name"]))
    problems.report()
    if not self._records:
      raise DataError(f"tfds {name} {split}: the split has no examples")
    self._labels = label_array(labels, self.task)

  def _check_label(self, value, where: str, problems: Problems):
    """The record's label, or None after reporting one out of range: a class index outside the
    build's classes, or (the regression builds are Per-COVID-19's) a percentage outside 0..100."""
    if self.task == "regression":
      return parse_percentage(value, where, problems)
    if not 0 <= int(value) < len(self.class_names):
      problems(f"{where}: label {int(value)} is not a class index 0..{len(self.class_names) - 1} "
               f"({', '.join(self.class_names)})")
      return None
    return int(value)

  def __len__(self):
    return len(self._labels)

  def subjects(self):
    return list(self._subjects)

  def labels(self):
    return self._labels

  def load(self, i):
    try:
      image = np.asarray(self._data[self._records[i]]["image"])
    except Exception as e:  # the record's PNG is decoded here: a damaged file fails in many ways
      raise DataError(f"{self.describe(i)}: cannot decode the image ({type(e).__name__}: {e})") from None
    return {"image": image, "label": self._labels[i]}

  def describe(self, i):
    return f"{self._names[i]} (tfds {self.name} {self.split}, record {self._records[i]})"

  def example_name(self, i):
    return self._names[i]


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)
