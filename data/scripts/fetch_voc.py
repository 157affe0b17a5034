#!/usr/bin/env python
"""Download PASCAL VOC 2007 (trainval + test) and/or VOC 2012 (trainval) into the data folder,
check each archive's published MD5, and unpack it (data/README.md shows the layout).

    python data/scripts/fetch_voc.py                      # VOC 2007 into data/
    python data/scripts/fetch_voc.py --years 2007 2012 --data /big/disk/data

A rerun skips archives already downloaded and verified.
"""
import argparse
import sys
from pathlib import Path

from detection.cli import run_tool
from detection.data.download import fetch

SPLITS = {"2007": ("voc2007-trainval", "voc2007-test"), "2012": ("voc2012-trainval",)}


def main(args: argparse.Namespace) -> int:
    names = [name for year in args.years for name in SPLITS[year]]
    for folder in dict.fromkeys(fetch(names, args.data, args.base_url)):
        print(f"ready: {folder}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--years", nargs="+", choices=sorted(SPLITS), default=["2007"])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1]), help="data folder (default: data/)")
    p.add_argument("--base-url", help="a mirror holding the same files (the archive names are appended)")
    sys.exit(run_tool(main, p))
