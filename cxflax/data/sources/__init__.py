"""Data sources: the datasets of the papers as they sit on disk, and the built-in phantom.

The Source interface and the sources built from others are in base.py; label tables and the
bad-data policy in tables.py; ``make_source`` (registry.py) opens the layout that
``config.data.source`` names, rooted at ``config.data.root``. One module per layout, each
registered under its name with ``@register(name)``:

  per_covid19  Per-COVID-19 challenge (Train/, Val/, Train.csv) or original release (Images/ and
               Database_new.xlsx / .csv): infection percentages.
  covidx       COVID-Net: train/, test/ and "patientid filename label [source]" files; 3 or 4 classes.
  covid_ct     UCSD-AI4H COVID-CT: CT_COVID/, CT_NonCOVID/ and its Data-split lists.
  flannel      FLANNEL's data: covid-chestxray-dataset/ AP/PA X-rays and Kaggle's chest_xray/.
  folder       one folder per class (root/<class>/, or root/<split>/<class>/).
  csv          a CSV of path,label[,subject] per split (config.data.train_file, ...).
  tfds         a cxflax TFDS build of one of the above (ArrayRecord, read without TensorFlow).
  phantom      the built-in procedural data.

A new layout is a new module here that registers its factory and is imported below.

Bad entries — a listed file that is missing, a percentage outside 0..100, an unknown class — are
errors that name the file and line, or, with config.data.on_bad_data='skip', are left out and
counted in the log.
"""

from cxflax.data.sources.base import (SEGMENTATION_CLASSES, SPLITS, TASKS, ConcatSource, Entry,
                                      FileSource, RelabeledSource, SegmentationTarget, Source,
                                      WithMasks, WrappedSource, image_folder, mask_file, read_mask)
from cxflax.data.sources.registry import known_sources, make_source, register
from cxflax.data.sources.tables import pick_columns, read_table, verify_images

# The layouts: importing each module registers it.
from cxflax.data.sources import covid_ct, covidx, csv, flannel, folder, per_covid19, phantom, tfds
from cxflax.data.sources.covid_ct import COVID_CT_CLASSES
from cxflax.data.sources.covidx import COVIDX3_CLASSES, COVIDX4_CLASSES
from cxflax.data.sources.flannel import FLANNEL_CLASSES
from cxflax.data.sources.per_covid19 import SEVERITY_NAMES, severity_class
from cxflax.data.sources.phantom import PhantomSource
from cxflax.data.sources.tfds import TfdsSource

__all__ = [
    "SEGMENTATION_CLASSES", "SPLITS", "TASKS", "ConcatSource", "Entry", "FileSource",
    "RelabeledSource", "SegmentationTarget", "Source", "WithMasks", "WrappedSource",
    "image_folder", "mask_file", "read_mask",
    "known_sources", "make_source", "register",
    "pick_columns", "read_table", "verify_images",
    "covid_ct", "covidx", "csv", "flannel", "folder", "per_covid19", "phantom", "tfds",
    "COVID_CT_CLASSES", "COVIDX3_CLASSES", "COVIDX4_CLASSES", "FLANNEL_CLASSES", "PhantomSource",
    "SEVERITY_NAMES", "TfdsSource", "severity_class",
]
