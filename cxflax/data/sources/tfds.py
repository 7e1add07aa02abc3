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
from cxflax.errors import ConfigError, DataError

# config.data.tfds_name → the registered builder name (and builder config).
NAMES = {"per_covid19": "cxflax_per_covid19", "covidx": "cxflax_covidx/three_class",
         "covidx3": "cxflax_covidx/three_class", "covidx4": "cxflax_covidx/four_class",
         "covid_ct": "cxflax_covid_ct", "flannel": "cxflax_flannel"}


@register("tfds")
def _from_config(data_config, split, unlabeled_ok):
  return TfdsSource(data_config.tfds_name, split, data_config.root)


class TfdsSource(Source):
  """A split of a cxflax TFDS build under data_dir; labels and subjects are read once, without
  decoding images."""

  def __init__(self, name: str, split: str, data_dir: str):
    import tensorflow_datasets as tfds
    if name not in NAMES:
      raise ConfigError(f"config.data.tfds_name must be one of {sorted(NAMES)}, got {name!r}")
    if not data_dir or not os.path.isdir(data_dir):
      raise DataError(f"tfds: config.data.root {data_dir!r} (the TFDS data_dir) is not a directory; "
                      "build it with python -m cxflax.data.build_tfds")
    self.name, self.split, self.data_dir = name, split, data_dir
    kwargs = dict(split=split, data_dir=data_dir, download=False,
                  builder_kwargs={"file_format": "array_record"})
    try:
      self._data = tfds.data_source(NAMES[name], **kwargs)
      meta = tfds.data_source(NAMES[name], decoders={"image": tfds.decode.SkipDecoding()}, **kwargs)
      info = tfds.builder(NAMES[name], data_dir=data_dir).info
    except Exception as e:  # tfds raises several types for a missing build or split
      raise DataError(f"tfds: cannot open {NAMES[name]} split {split!r} in {data_dir} "
                      f"({type(e).__name__}: {e})") from None
    label = info.features["label"]
    if hasattr(label, "names"):
      self.task, self.class_names = "classification", tuple(label.names)
    else:
      self.task, self.class_names = "regression", None
    records = [meta[i] for i in range(len(meta))]
    self._labels = label_array([r["label"] for r in records], self.task)
    self._subjects = [_text(r["subject"]) for r in records]
    self._names = [_text(r["name"]) for r in records]

  def __len__(self):
    return len(self._labels)

  def subjects(self):
    return list(self._subjects)

  def labels(self):
    return self._labels

  def load(self, i):
    ex = self._data[i]
    return {"image": np.asarray(ex["image"]), "label": self._labels[i]}

  def describe(self, i):
    return f"{self._names[i]} (tfds {self.name} {self.split}, record {i})"

  def example_name(self, i):
    return self._names[i]


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)
