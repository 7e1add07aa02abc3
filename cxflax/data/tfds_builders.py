"""TFDS dataset builders for the papers' datasets, from a manual directory, into ArrayRecord.

Nothing is downloaded: put the dataset as it unpacks (the layouts of cxflax.data.sources) in a
folder and build it once,

    python -m cxflax.data.build_tfds --dataset per_covid19 --manual_dir /data/Per-COVID-19 \
        --data_dir /data/tfds

then train from the ArrayRecord files, read through ``tfds.data_source`` (no TensorFlow on the
read path):

    python -m cxflax.main ... --config.data.source=tfds --config.data.tfds_name=per_covid19 \
        --config.data.root=/data/tfds

Images are stored as 8-bit grayscale PNG (the papers' images are 8-bit; 16-bit files are scaled,
colour is converted to luminance); each example carries its label, subject and file name.
Building uses TensorFlow (a cxflax dependency); reading does not.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from cxflax.data import sources as sources_lib
from cxflax.errors import DataError

_INSTRUCTIONS = """Unpack the dataset into the manual directory as it comes (see the layouts in
cxflax/data/sources/); nothing is downloaded."""


def to_gray8(image: np.ndarray) -> np.ndarray:
  """(H, W, 1) uint8: luminance of RGB, 16-bit scaled to 8, float in [0, 1] scaled by 255."""
  if image.dtype == np.uint16:
    image = (image.astype(np.float32) / 257.0)
  elif image.dtype != np.uint8:
    image = np.clip(image.astype(np.float32), 0, 1) * 255.0
  image = image.astype(np.float32)
  if image.shape[-1] == 3:
    image = image @ np.array([0.299, 0.587, 0.114], np.float32)
    image = image[..., None]
  return np.round(image).clip(0, 255).astype(np.uint8)


class _LayoutBuilder(tfds.core.GeneratorBasedBuilder):
  """Builds the splits of one of cxflax's source layouts found in the manual directory."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  LAYOUT = ""
  TASK = "classification"
  CLASS_NAMES: tuple[str, ...] = ()

  def _info(self):
    label = (tfds.features.ClassLabel(names=list(self._class_names())) if self.TASK == "classification"
             else tfds.features.Scalar(dtype=np.float32))
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
            "label": label,
            "subject": tfds.features.Text(),
            "name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        description=f"cxflax's {self.LAYOUT} layout ({self.TASK}).")

  def _class_names(self) -> tuple[str, ...]:
    return self.CLASS_NAMES

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    splits = {}
    for split in sources_lib.SPLITS:
      try:
        source = sources_lib.make_source(_DataConfig(self.LAYOUT, root, self._class_names()), split)
      except DataError as e:
        if split == "train":
          raise
        print(f"{self.LAYOUT}: no {split} split ({e})")
        continue
      if source.class_names and tuple(source.class_names) != tuple(self._class_names()):
        raise DataError(f"{root} holds classes {source.class_names}; builder config "
                        f"{self.builder_config.name if self.builder_config else ''} expects "
                        f"{self._class_names()}")
      splits[split] = self._generate_examples(source)
    return splits

  def _generate_examples(self, source):
    subjects = source.subjects()
    for i in range(len(source)):
      ex = source.load(i)
      yield i, {"image": to_gray8(np.asarray(ex["image"])), "label": ex["label"],
                "subject": subjects[i], "name": os.path.basename(source.paths[i])}


class _DataConfig(dict):
  """The minimal config.data a source needs (attribute and .get access)."""

  def __init__(self, source: str, root: str, class_names=()):
    super().__init__(source=source, root=root, window="", on_bad_data="error", verify_images=False,
                     class_names=tuple(class_names) if source in ("covidx",) else (),
                     train_file="", val_file="", test_file="")

  __getattr__ = dict.__getitem__


class CxflaxPerCovid19(_LayoutBuilder):
  LAYOUT, TASK = "per_covid19", "regression"


class CxflaxCovidx(_LayoutBuilder):
  """COVIDx: config 'three_class' (normal, pneumonia, COVID-19) or 'four_class' (v1's normal,
  bacteria, viral, COVID-19), matching the label files in the manual directory."""
  LAYOUT = "covidx"
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="three_class"), tfds.core.BuilderConfig(name="four_class")]

  def _class_names(self):
    return (sources_lib.COVIDX4_CLASSES if self.builder_config.name == "four_class"
            else sources_lib.COVIDX3_CLASSES)


class CxflaxCovidCt(_LayoutBuilder):
  LAYOUT, CLASS_NAMES = "covid_ct", sources_lib.COVID_CT_CLASSES


class CxflaxFlannel(_LayoutBuilder):
  LAYOUT, CLASS_NAMES = "flannel", sources_lib.FLANNEL_CLASSES


BUILDERS = {"per_covid19": CxflaxPerCovid19, "covidx": CxflaxCovidx, "covid_ct": CxflaxCovidCt,
            "flannel": CxflaxFlannel}


def build(dataset: str, manual_dir: str, data_dir: str, config: str | None = None
          ) -> tfds.core.DatasetBuilder:
  """Builds `dataset` (and builder `config`, for covidx) from `manual_dir` into ArrayRecord
  files under `data_dir`."""
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(BUILDERS)}")
  kwargs = {"config": config} if config else {}
  builder = BUILDERS[dataset](data_dir=data_dir, file_format="array_record", **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
