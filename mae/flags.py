"""Command-line flags that several stages' commands share (``<stage>/command.py`` adds its own).

Standard library only: building ``mae``'s parser imports every stage's command module, and ``mae --help`` or a
torch-free ``mae search`` must not pay for torch, timm or faiss to print a flag.
"""

from __future__ import annotations

import argparse

DATA_HELP = ("mnist5k | digits | photos | a folder of images (class subfolders optional) | a .txt list of image "
             "paths (PATH<TAB>LABEL for labels) | WebDataset shards: a folder written by mae data pack, or "
             "'DIR/train-{000000..000127}.tar' (any URL or pipe: that webdataset opens)")
LABELLED_DATA_HELP = ("a labelled source: mnist5k | digits | a folder with class subfolders | a labelled .txt list | "
                      "shards packed from one by mae data pack")


def add_json_flag(p: argparse.ArgumentParser) -> None:
    """``--json``: the handler's result as one JSON object on stdout (its ``text`` left out)."""
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object on stdout")


def add_overrides_flag(p: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable): config overrides; unknown keys are refused with the valid ones listed."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. --set {example} (repeatable; unknown keys are refused)")
