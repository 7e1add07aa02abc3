"""Builds one of cxflax's TFDS datasets from a manual directory (see cxflax.data.tfds_builders).

    python -m cxflax.data.build_tfds --dataset covidx --config four_class \
        --manual_dir /data/COVIDx --data_dir /data/tfds
"""

from __future__ import annotations

import argparse

from cxflax.data import tfds_builders


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m cxflax.data.build_tfds", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", required=True, choices=sorted(tfds_builders.BUILDERS))
  parser.add_argument("--manual_dir", required=True, help="the dataset as unpacked")
  parser.add_argument("--data_dir", required=True, help="where the ArrayRecord files go")
  parser.add_argument("--config", default=None, help="covidx: three_class or four_class")
  args = parser.parse_args(argv)
  builder = tfds_builders.build(args.dataset, args.manual_dir, args.data_dir, args.config)
  print(f"built {builder.name} into {builder.data_dir}: {dict(builder.info.splits)}")


if __name__ == "__main__":
  main()
