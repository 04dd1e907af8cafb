"""The ``mae`` command. Each subcommand imports its folder lazily, so ``mae --help`` stays instant.

A handler takes the parsed arguments and returns a dict: with ``--json`` it is printed as one JSON object on
stdout; otherwise its ``"text"`` entry (or a key: value listing) is printed for people.
Errors a user can fix (bad path, bad config key, corrupt file) print one line on stderr and exit 1;
``MAE_DEBUG=1`` shows the traceback. Warnings (a backend skipped, files skipped) are one line each too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 1
DATA_HELP = ("mnist5k | digits | photos | a folder of images (class subfolders optional) | a .txt list of image "
             "paths (PATH<TAB>LABEL for labels) | WebDataset shards: a folder written by mae data pack, or "
             "'DIR/train-{000000..000127}.tar' (any URL or pipe: that webdataset opens)")


def _add_config_args(p: argparse.ArgumentParser, preset_default: str | None, required: bool = True) -> None:
    p.add_argument("--data", required=required, help=DATA_HELP)
    p.add_argument("--preset", default=preset_default, help="a preset name (mae pretrain --list-presets)")
    p.add_argument("--out", required=required, help="run folder: checkpoint.pt, config.json, metrics.jsonl, pictures")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the training split")
    length.add_argument("--steps", type=int, help="total optimiser steps (overrides epochs)")
    p.add_argument("--batch-size", type=int, help="images per device per micro-step (optim.batch_size)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (starts fresh when there is none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.mask_ratio=0.8 (repeatable)")


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object on stdout")


def build_parser() -> argparse.ArgumentParser:
    from export.formats import BACKEND_CHOICES, INDUCTOR_PRECISIONS, TENSORRT_PRECISIONS  # stdlib only: instant

    parser = argparse.ArgumentParser(
        prog="mae", description="Masked Autoencoders: pretrain, finetune, export, index, serve.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pretrain a masked autoencoder")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    _add_config_args(p, "mae_vit_tiny_patch4_32", required=False)
    _json_flag(p)
    p.set_defaults(handler="training.pretrain:main")

    # -- finetune / evaluate (issue 3) ----------------------------------------------------------------
    p = sub.add_parser("finetune", help="finetune (or linear-probe) a pretrained encoder for classification")
    p.add_argument("--init", required=True, help="RUN/checkpoint.pt of a pretraining run, or official MAE weights")
    p.add_argument("--data", required=True, help="a labelled source: mnist5k | digits | a folder with class "
                                                 "subfolders | a labelled .txt list | shards packed from one")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, best.pt, config.json, metrics.jsonl")
    p.add_argument("--linear-probe", action="store_true",
                   help="frozen encoder, class token (finetune.probe_pool), BatchNorm1d(affine=False) + Linear, "
                        "crop + flip only")
    p.add_argument("--epochs", type=int, help="epochs (default: finetune.epochs or finetune.probe_epochs)")
    p.add_argument("--batch-size", type=int, help="images per device per micro-step (optim.batch_size)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set finetune.layer_decay=0.65 or optim.blr=1e-3")
    _json_flag(p)
    p.set_defaults(handler="training.finetune:main")

    p = sub.add_parser("evaluate", help="kNN, linear-probe and (finetuned) top-1/top-5 on a labelled split")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a pretraining / finetuning / probe checkpoint, or official weights")
    what.add_argument("--artifact", help="an artifact folder written by mae export")
    p.add_argument("--data", required=True, help="a labelled source: mnist5k | digits | a folder with class "
                                                 "subfolders | a labelled .txt list | shards packed by mae data pack")
    p.add_argument("--pooling", choices=("token", "avg"), help="embedding pooling of a pretrained --checkpoint")
    p.add_argument("--out", help="folder for the embeddings cache, eval.json and confusion_matrix.png "
                                 "(default: RUN/eval or ARTIFACT/eval)")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes for decoding images")
    _json_flag(p)
    p.set_defaults(handler="training.evaluate:main")
    # -------------------------------------------------------------------------------------------------

    p = sub.add_parser("export", help="write a deployable artifact (safetensors, ONNX, TensorRT, AOTInductor) from a "
                                      "checkpoint")
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt, or official / timm MAE weights")
    p.add_argument("--out", required=True, help="artifact folder")
    p.add_argument("--pooling", choices=("token", "avg"),
                   help="embedding pooling (default: avg of the normed patch tokens when pretrained; a finetuned "
                        "model keeps the pooling its head was trained on)")
    g = p.add_argument_group("formats (each file is checked against PyTorch on real images; see config.json)")
    g.add_argument("--onnx", action="store_true", help="encoder.onnx: fp32, dynamic batch, opset 18")
    g.add_argument("--fp16", action="store_true",
                   help="encoder.fp16.onnx for onnxruntime on GPUs: fused attention, fp32 LayerNorm (implies --onnx)")
    g.add_argument("--int8", action="store_true",
                   help="encoder.int8.onnx for CPUs: static QDQ int8 calibrated on real images (implies --onnx)")
    g.add_argument("--tokens", action="store_true", help="add a 'tokens' (N, L, D) output for dense use")
    g.add_argument("--tensorrt", action="store_true",
                   help="encoder.plan for this GPU (implies --onnx); needs CUDA and tensorrt")
    g.add_argument("--inductor", action="store_true",
                   help="encoder.pt2: AOTInductor-compiled for this torch version and device (the GPU when there "
                        "is one), dynamic batch 1..--batch-max")
    g.add_argument("--inductor-device", choices=("cuda", "cpu"),
                   help="device encoder.pt2 is compiled for (default: cuda when a GPU is visible)")
    g.add_argument("--inductor-precision", choices=INDUCTOR_PRECISIONS,
                   help="encoder.pt2 precision (default: bf16 on cuda, fp32 on cpu)")
    g.add_argument("--trt-precision", choices=TENSORRT_PRECISIONS, default="fp16",
                   help="TensorRT precision (bf16 only with TensorRT 10)")
    g.add_argument("--batch-min", type=int, default=1, help="TensorRT profile: smallest batch")
    g.add_argument("--batch-opt", type=int, default=32, help="TensorRT profile: batch the kernels are tuned for")
    g.add_argument("--batch-max", type=int, default=256,
                   help="TensorRT profile / AOTInductor: largest batch (more is sliced)")
    g.add_argument("--timing-cache", help="TensorRT timing cache file (default: ARTIFACT/tensorrt.timing.cache)")
    g.add_argument("--parity-data", default="mnist5k,photos",
                   help="comma-separated bundled sets or folders of real images for parity and int8 calibration")
    g.add_argument("--parity-images", type=int, default=512,
                   help="real images drawn: half judge parity, the other half calibrate int8")
    _json_flag(p)
    p.set_defaults(handler="export.command:main")

    p = sub.add_parser("embed", help="embed images with an artifact (any backend) into a .npy file")
    p.add_argument("--artifact", required=True, help="artifact folder (mae export)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, folders (recursive), .txt lists of paths, or WebDataset shards (one spec)")
    p.add_argument("--out", required=True, help="vectors.npy: (N, D) float32, L2-normalised, rows in input order")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"),
                   help="onnx file to run (default fp32 on CPU, fp16 on CUDA when exported)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (0: in-process)")
    _json_flag(p)
    p.set_defaults(handler="export.command:embed")  # torchrun --nnodes N ... -m cli embed: ranks share the work
    # -- retrieval: mae index build|add|remove|info, mae search (retrieval/command.py)
    p = sub.add_parser("index", help="build and change a FAISS similarity index over an image collection")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    i = isub.add_parser("build", help="embed a collection with an artifact and index it")
    i.add_argument("--artifact", required=True, help="artifact folder (mae export)")
    i.add_argument("--images", required=True, nargs="+",
                   help="folders (class subfolders become labels), files, .txt lists, or WebDataset shards (one spec)")
    i.add_argument("--out", required=True, help="index folder to write")
    i.add_argument("--factory", default="auto",
                   help="auto (exact, HNSW, IVF or IVF-PQ by collection size) or any faiss factory string")
    i.add_argument("--shards", type=int, default=1,
                   help="> 1: train the IVF once, fill this many shards in worker processes, merge on disk (mmap)")
    i.add_argument("--max-memory", type=float, metavar="GIB", help="memory the index may use (default: half the RAM)")
    i.add_argument("--recall", type=float, default=0.95, help="recall@10 the search parameters are tuned to reach")
    i.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto", help="train and search on GPUs (faiss-gpu)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    for q in (i, ia := isub.add_parser("add", help="add images (files already indexed, by sha256, are skipped)")):
        q.add_argument("--metadata", metavar="FILE",
                       help="labels and tags by path: items.jsonl ({\"path\": ..., \"label\": ..., \"tags\": {...}}) "
                            "or items.csv (path,label,TAG...)")
        q.add_argument("--batch-size", type=int, default=64, help="images per embedding batch")
        q.add_argument("--workers", type=int, default=2, help="DataLoader processes reading and decoding images")
        q.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="embedding backend")
        q.add_argument("--device", help="torch device for the embedder (default: cuda when available)")
        _json_flag(q)
    i.set_defaults(handler="retrieval.command:index_build")
    ia.add_argument("--index", required=True, help="index folder")
    ia.add_argument("images", nargs="+", metavar="DIR_OR_FILE", help="folders or image files to add")
    ia.add_argument("--artifact", help="artifact (default: the one recorded in the index manifest)")
    ia.set_defaults(handler="retrieval.command:index_add")
    i = isub.add_parser("remove", help="remove items by path or id")
    i.add_argument("--index", required=True, help="index folder")
    i.add_argument("items", nargs="+", metavar="PATH_OR_ID", help="image paths or catalogue ids")
    _json_flag(i)
    i.set_defaults(handler="retrieval.command:index_remove")
    i = isub.add_parser("info", help="what an index holds and how it searches")
    i.add_argument("--index", required=True, help="index folder")
    _json_flag(i)
    i.set_defaults(handler="retrieval.command:index_info")
    i = isub.add_parser("duplicates", help="group near-copies (resized, cropped, re-encoded) of the same image")
    i.add_argument("--index", required=True, help="index folder")
    i.add_argument("--threshold", type=float,
                   help="cosine at or above which two items are candidates (default 0.80 with the pixel check, "
                        "0.998 without: both measured, see README)")
    i.add_argument("--pixel-threshold", type=float,
                   help="keep a candidate pair when its grey thumbnails, once aligned (scale, rotation, shift), "
                        "correlate at or above this (default 0.9875, measured)")
    i.add_argument("--no-pixel-check", action="store_true",
                   help="group by the cosine alone (no file is read; precise only at a high --threshold)")
    i.add_argument("--show", metavar="PNG", help="write a picture: one row per group")
    _json_flag(i)
    i.set_defaults(handler="retrieval.command:index_duplicates")
    i = isub.add_parser("check", help="check that the parts of an index agree; --repair rebuilds what survives")
    i.add_argument("--index", required=True, help="index folder")
    i.add_argument("--repair", action="store_true",
                   help="keep what the surviving parts agree on, commit it, and list what was dropped")
    i.add_argument("--artifact", help="with --repair: the artifact that built the index (to embed images again "
                                      "when index.faiss is lost, or to name the model when the manifest is)")
    _json_flag(i)
    i.set_defaults(handler="retrieval.command:index_check")

    p = sub.add_parser("search", help="nearest images of an image (or of an indexed item) in an index")
    p.add_argument("--index", required=True, help="index folder (mae index build)")
    p.add_argument("image", nargs="?", help="query image file (or --id)")
    p.add_argument("--id", type=int, help="more like this: the item with this id is the query (and left out)")
    p.add_argument("-k", type=int, default=10, help="neighbours to return (at most the size of the index)")
    p.add_argument("--where", action="append", metavar="FILTER",
                   help="only items that match, e.g. label=cat, path^=photos/2024/, added>=2026-01-01, "
                        "tag.camera=X100 (repeat: all must hold; operators = != ^= < <= > >=)")
    p.add_argument("--min-score", type=float, help="leave out neighbours with a cosine below this")
    p.add_argument("--show", metavar="PNG", help="write a contact sheet: the query and its neighbours with scores")
    p.add_argument("--artifact", help="artifact (default: the one recorded in the index manifest)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="embedding backend")
    p.add_argument("--device", help="torch device for the embedder")
    _json_flag(p)
    p.set_defaults(handler="retrieval.command:search")

    p = sub.add_parser("serve", help="serve /embed, /classify, /search and a page to try them (BentoML)")
    from serving.command import add_arguments as add_serve_arguments  # argparse and stdlib only: stays instant

    add_serve_arguments(p)
    _json_flag(p)
    p.set_defaults(handler="serving.command:main")

    p = sub.add_parser("data", help="bundled datasets and WebDataset shards")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = dsub.add_parser("pack", help="write any source as WebDataset shards (train-*.tar, val-*.tar, index.json)")
    d.add_argument("--data", required=True, help="mnist5k | digits | photos | a folder | a .txt list")
    d.add_argument("--out", required=True, help="folder for the shards and their index.json")
    d.add_argument("--shard-size", default="512MB", help="bytes per shard before a new one starts (512MB, 1GiB)")
    d.add_argument("--val-fraction", type=float, help="share held out as val-*.tar (default: data.val_fraction, "
                                                      "the split every stage computes for this source)")
    d.add_argument("--split-seed", type=int, help="seed of the stratified split (default: data.split_seed)")
    _json_flag(d)
    d.set_defaults(handler="cli.main:data_pack")
    d = dsub.add_parser("export", help="write a bundled dataset as PNG files (class subfolders) to index or serve")
    d.add_argument("--data", required=True, help="mnist5k | digits | photos")
    d.add_argument("--out", required=True)
    d.add_argument("--split", choices=("all", "train", "val"), default="all")
    d.add_argument("--limit", type=int, help="at most this many images (spread evenly over the set)")
    _json_flag(d)
    d.set_defaults(handler="cli.main:data_export")

    p = sub.add_parser("demo", help="a small real run of every stage on a bundled dataset")
    p.add_argument("--out", default="demo", help="folder for the demo's runs, artifact and index")
    p.add_argument("--data", default="mnist5k", help="bundled dataset to use")
    p.add_argument("--epochs", type=int, default=15, help="pretraining epochs (15 take about 3 minutes on 2 cores)")
    p.add_argument("--no-serve", action="store_true", help="stop before starting the HTTP server")
    _json_flag(p)
    p.set_defaults(handler="cli.demo:main")
    return parser


def main(argv: list[str] | None = None) -> int:
    from mae.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    if args.command in ("index", "search"):  # before torch loads OpenMP: see retrieval/__init__.py
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    handler = _resolve(args.handler)
    show = warnings.showwarning
    if not os.environ.get("MAE_DEBUG"):
        warnings.showwarning = _one_line_warning(args.command)
    try:
        result = handler(args)
    except KeyboardInterrupt:
        print("mae: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, KeyError, OSError, RuntimeError, ImportError) as e:
        if os.environ.get("MAE_DEBUG"):
            raise
        msg = one_line(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
        print(f"mae {args.command}: error: {msg}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": msg, "type": type(e).__name__}))
        return EXIT_USER_ERROR
    finally:
        warnings.showwarning = show
    if isinstance(result, int):  # a handler with nothing to print (e.g. a non-zero torchrun rank)
        return result
    if result is not None:
        _print_result(result, getattr(args, "json", False))
    return 0


def one_line(message: object) -> str:
    """A message as one line: libraries (onnxruntime, torch's unpickler) put advice on further lines."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _one_line_warning(command: str) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        print(f"mae {command}: warning: {one_line(message)}", file=file or sys.stderr)

    return show


def _resolve(spec: str) -> Callable[[argparse.Namespace], Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "text"}, default=str))
        return
    if "text" in result:
        print(result["text"])
        return
    width = max((len(k) for k in result), default=0)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")


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
    from mae.shards import pack, parse_size
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


if __name__ == "__main__":
    sys.exit(main())
