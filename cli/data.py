"""``mae data pack`` (any source as WebDataset shards) and ``mae data export`` (a bundled set as PNG files)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mae.flags import add_json_flag


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``data`` (pack, export) to ``mae``."""
    p = sub.add_parser("data", help="bundled datasets and WebDataset shards")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = dsub.add_parser("pack", help="write any source as WebDataset shards (train-*.tar, val-*.tar, index.json)")
    d.add_argument("--data", required=True, help="mnist5k | digits | photos | a folder | a .txt list")
    d.add_argument("--out", required=True, help="folder for the shards and their index.json")
    d.add_argument("--shard-size", default="512MB", help="bytes per shard before a new one starts (512MB, 1GiB)")
    d.add_argument("--val-fraction", type=float, help="share held out as val-*.tar (default: data.val_fraction, "
                                                      "the split every stage computes for this source)")
    d.add_argument("--split-seed", type=int, help="seed of the stratified split (default: data.split_seed)")
    add_json_flag(d)
    d.set_defaults(handler="cli.data:data_pack")
    d = dsub.add_parser("export", help="write a bundled dataset as PNG files (class subfolders) to index or serve")
    d.add_argument("--data", required=True, help="mnist5k | digits | photos")
    d.add_argument("--out", required=True)
    d.add_argument("--split", choices=("all", "train", "val"), default="all")
    d.add_argument("--limit", type=int, help="at most this many images (spread evenly over the set)")
    add_json_flag(d)
    d.set_defaults(handler="cli.data:data_export")


def data_export(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from mae.sources import export_source, load_source, split_data

    source = load_source(args.data)
    split = split_data(source)
    indices = {"all": np.arange(len(source)), "train": split.train, "val": split.val}[args.split]
    if args.limit is not None and args.limit < len(indices):
        indices = indices[np.linspace(0, len(indices) - 1, args.limit).round().astype(int)]
    paths = export_source(source, args.out, indices)
    return {"out": args.out, "images": len(paths), "classes": source.classes,
            "text": f"wrote {len(paths)} {args.data} images ({args.split}) to {args.out}"}


def data_pack(args: argparse.Namespace) -> dict[str, Any]:
    from mae.config import DataConfig
    from mae.errors import UsageError
    from mae.packing import pack, parse_size
    from mae.sources import load_source, split_data

    d = DataConfig()
    val_fraction = d.val_fraction if args.val_fraction is None else args.val_fraction
    seed = d.split_seed if args.split_seed is None else args.split_seed
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    source = load_source(args.data)
    split = split_data(source, val_fraction, seed)
    splits = {"train": split.train, "val": split.val} if split.val_size else {"train": split.train}
    index = pack(source, args.out, splits, shard_size=parse_size(args.shard_size),
                 split_info={"val_fraction": val_fraction, "split_seed": seed})
    counts = {k: sum(e["count"] for e in v) for k, v in index["splits"].items()}
    shards = {k: len(v) for k, v in index["splits"].items()}
    lines = [f"packed {args.data} into {args.out}: " + ", ".join(f"{k} {counts[k]} images in {shards[k]} shard(s)"
                                                                 for k in counts)]
    if index["skipped"]:
        lines.append(f"  skipped {len(index['skipped'])} unreadable file(s): " + "; ".join(index["skipped"][:5]))
    lines.append(f"  train with --data {args.out}  (or a pattern such as "
                 f"'{Path(args.out) / 'train'}-{{000000..{shards['train'] - 1:06d}}}.tar')")
    return {"out": args.out, "counts": counts, "shards": shards, "classes": index["classes"],
            "skipped": index["skipped"], "text": "\n".join(lines)}
