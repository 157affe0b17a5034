#!/usr/bin/env python
"""Download R-CNN's published selective-search boxes for VOC 2007 and 2012 (as republished by
Fast R-CNN, 460 MB), check the archive's MD5 and unpack it into data/selective_search_data/.

    python data/scripts/fetch_selective_search.py

then, in Python: ``detection.proposals.load_rcnn_mat("data/selective_search_data/voc_2007_test.mat",
VOCDataset("data/VOCdevkit/VOC2007", "test"))``.

A rerun skips the archive when it is already downloaded and verified.
"""
import argparse
import sys
from pathlib import Path

from detection.cli import run_tool
from detection.data.download import fetch


def main(args: argparse.Namespace) -> int:
    (folder,) = fetch(["selective-search"], args.data, args.base_url)
    print(f"ready: {folder}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1]), help="data folder (default: data/)")
    p.add_argument("--base-url", help="a mirror holding the same file (the archive name is appended)")
    sys.exit(run_tool(main, p))
