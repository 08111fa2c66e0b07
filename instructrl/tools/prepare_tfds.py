"""Prepare a TFDS (array_record) dataset from public-format files (data/readers.py reads them).

  python -m instructrl.tools.prepare_tfds --kind=demo --name=alpaca --data_dir=tfds \
      --split=train=alpaca_data.json
  python -m instructrl.main --config=configs/public.py --workdir=runs/a \
      --config.data.demos=tfds/alpaca/1.0.0 ...

Each --split is read, converted and validated whole before anything is written; a bad record stops
the command with its file:line (--on_invalid=skip drops bad records instead, logging each one).
"""

from __future__ import annotations

import argparse
import logging
import sys

from instructrl.data import readers, tfds_io
from instructrl.data.records import RecordError


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m instructrl.tools.prepare_tfds", description=__doc__.split("\n")[0])
  p.add_argument("--kind", required=True, choices=sorted(tfds_io.FIELDS))
  p.add_argument("--name", required=True, help="dataset name (directory under --data_dir)")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--schema", default="auto", help="reader schema (data/readers.py), default: detected")
  p.add_argument("--on_invalid", default="raise", choices=("raise", "skip"))
  p.add_argument("--split", action="append", required=True, metavar="NAME=FILE")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  splits = {}
  try:
    for s in args.split:
      name, _, path = s.partition("=")
      if not path:
        p.error(f"--split={s!r}: expected NAME=FILE")
      splits[name] = readers.read(path, args.schema, kind=args.kind, on_invalid=args.on_invalid)
  except (RecordError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(tfds_io.write(splits, args.kind, args.name, args.data_dir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
