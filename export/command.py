"""``mae export`` (checkpoint -> artifact folder -> the exported files it asks for, each parity-checked) and ``mae
embed``, with their flags.

Light to import (argparse, the registry): the CLI builds its parser from ``add_export_arguments`` and
``add_embed_arguments`` and stays instant; the commands import torch and friends when they run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.formats import (
    BACKEND_CHOICES,
    BACKEND_HELP,
    EXPORT_FLAGS,
    FORMATS,
    PRECISION_CHOICES,
    BackendUnavailable,
    requested,
    resolve,
)
from mae.artifact_config import POOLINGS
from mae.errors import UsageError
from mae.files import atomic_path, write_json_atomic
from mae.flags import add_json_flag

if TYPE_CHECKING:
    from mae.shards import ShardSet


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``embed`` to ``mae``."""
    p = sub.add_parser("export", help="write a deployable artifact (safetensors, ONNX, TensorRT, AOTInductor) from a "
                                      "checkpoint")
    add_export_arguments(p)
    add_json_flag(p)
    p.set_defaults(handler="export.command:main")
    p = sub.add_parser("embed", help="embed images with an artifact (any backend) into a .npy file")
    add_embed_arguments(p)
    add_json_flag(p)
    p.set_defaults(handler="export.command:embed")  # torchrun --nnodes N ... -m cli embed: ranks share the work


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """The ``mae export`` flags (``register``): each format's come from its row of ``export.formats``."""
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt, or official / timm MAE weights")
    p.add_argument("--out", required=True, help="artifact folder")
    p.add_argument("--pooling", choices=POOLINGS,
                   help="embedding pooling (default: avg of the normed patch tokens when pretrained; a finetuned "
                        "model keeps the pooling its head was trained on)")
    g = p.add_argument_group("formats (each file is checked against PyTorch on real images; see config.json)")
    for flag in [f for spec in FORMATS for f in spec.flags] + list(EXPORT_FLAGS):
        g.add_argument(flag.name, help=flag.help, **flag.options)


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    """The ``mae embed`` flags (``register``)."""
    p.add_argument("--artifact", required=True, help="artifact folder (mae export)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, folders (recursive), .txt lists of paths, or WebDataset shards (one spec)")
    p.add_argument("--out", required=True, help="vectors.npy: (N, D) float32, L2-normalised, rows in input order")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help=BACKEND_HELP)
    p.add_argument("--precision", choices=PRECISION_CHOICES,
                   help="precision of the exported file to run (default: an ONNX fp16 file on CUDA when exported, "
                        "else fp32; an engine or package runs the precision it was built for)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (0: in-process)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """``mae export``: the artifact of a checkpoint, then each format asked for, exported and proven."""
    from mae import artifact

    for spec in requested(args):  # say so before writing anything, not after minutes of ONNX work
        reason = resolve(spec.preflight)() if spec.preflight else None
        if reason:
            raise BackendUnavailable(f"--{spec.name}: {spec.title} cannot run here: {reason}")
    out = artifact.from_checkpoint(args.checkpoint, args.out, pooling=args.pooling)
    art = artifact.load(out)
    result: dict[str, Any] = {
        "artifact": str(out),
        "sha256": art.sha256,
        "embed_dim": art.embed_dim,
        "pooling": art.pooling,
        "labels": art.labels,
    }
    lines = [f"wrote artifact {out} (sha256 {art.sha256[:12]}, {art.embed_dim}-d, {art.pooling} pooling)"]
    export_formats(out, args, result, lines)
    result["files"] = sorted(p.name for p in out.iterdir())
    result["text"] = "\n".join(lines)
    return result


def export_formats(out: Path, args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    """Run the exports ``args`` asks for on an artifact folder, in the registry's order (a format after those it
    needs); adds their records to ``result["export"]`` and their summary lines to ``lines``."""
    data = [d for d in args.parity_data.split(",") if d]
    for spec in requested(args):
        records, summary = resolve(spec.exporter)(out, args, data)
        result["export"] = {**result.get("export", {}), **records}
        lines += summary


def embed(args: argparse.Namespace) -> dict[str, Any] | int:
    """``mae embed``: stream images through the artifact; write vectors.npy and the row -> path list beside it.

    Inputs are image files, folders, ``.txt`` lists, or WebDataset shards. Under torchrun every rank embeds its
    share (whole shards, or a contiguous run of files) into a work folder beside ``--out`` (which must be on a
    filesystem every node sees) and rank 0 writes the result, rows in input order.
    """
    import os

    import numpy as np

    from export.runtime import EmbeddedFiles, Embedder, embed_across_ranks, load_parts
    from mae.dist import barrier, init_distributed, shutdown_distributed, work_folder
    from mae.images import ImageError

    out = Path(args.out)
    if out.suffix != ".npy":
        raise UsageError(f"--out must be a .npy file, got {out}")
    collection = inputs_collection(args.inputs)
    total = len(collection) if isinstance(collection, list) else collection.total
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    dist = init_distributed(getattr(args, "device", None), timeout_minutes=24 * 60) if distributed else None
    try:
        world = dist.world if dist else 1
        device = str(dist.device) if dist and dist.device.type == "cuda" else None
        embedder = Embedder.load(args.artifact, backend=args.backend, batch_size=args.batch_size,
                                 precision=args.precision, device=device)
        work = work_folder(out, "embed") if dist else None
        done = embed_across_ranks(embedder, collection, dist, work, workers=args.workers,
                                  progress=dist is None or dist.is_main)
        if dist:
            if dist.is_main:
                try:
                    done = EmbeddedFiles.concat(load_parts(work, world))
                finally:
                    import shutil

                    shutil.rmtree(work, ignore_errors=True)
            barrier(dist)
            if not dist.is_main:
                return 0  # under torchrun only rank 0 writes and reports
    finally:
        if dist:
            shutdown_distributed()
    errors = [s["error"] for s in done.skipped]
    if not done.positions:
        raise ImageError(f"none of the {total} images could be decoded; first error: {errors[0] if errors else '-'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, done.vectors)
    paths_file = out.with_suffix(".json")
    names = [str(Path(n).resolve()) if isinstance(collection, list) else n for n in done.names]
    write_json_atomic(paths_file, {"artifact_sha256": embedder.sha256, "backend": embedder.backend_name,
                                   "dim": embedder.dim, "paths": names, "skipped": errors,
                                   "world_size": world})
    text = (f"embedded {len(names)} images with {embedder.backend_name} -> {out} {tuple(done.vectors.shape)}"
            + (f" on {world} ranks" if world > 1 else "") + f"; row paths in {paths_file}")
    if errors:
        text += f"\nskipped {len(errors)} unreadable: " + "; ".join(errors[:5])
    return {"out": str(out), "paths": str(paths_file), "count": len(names), "dim": embedder.dim,
            "backend": embedder.backend_name, "skipped": errors, "world_size": world, "text": text}


def inputs_collection(inputs: list[str]) -> list[Path] | ShardSet:
    """``mae embed``'s inputs as a collection: the image files they name, in order, or the samples of the
    WebDataset shards one spec names (both splits of a packed folder)."""
    from mae.shards import is_shard_spec, open_shards

    shard_specs = [i for i in inputs if is_shard_spec(i)]
    if shard_specs and len(inputs) > 1:
        raise UsageError("give WebDataset shards as the only input (a packed folder, or a pattern such as "
                         "'DIR/train-{000000..000127}.tar')")
    if shard_specs:
        source = open_shards(shard_specs[0])
        return type(source.train)(source.name, source.train.shards + (source.val.shards if source.val else []))
    from mae.sources import list_images

    files, _ = list_images(inputs)
    return list(files)
