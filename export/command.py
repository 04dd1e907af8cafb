"""``mae export`` (checkpoint -> artifact folder -> ONNX / TensorRT files, each parity-checked) and ``mae embed``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from mae import artifact
from mae.files import atomic_path, write_json_atomic


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.tensorrt:  # say so before writing anything, not after minutes of ONNX work
        from export.tensorrt import unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"--tensorrt: TensorRT cannot run here: {reason}")
    if getattr(args, "inductor", False):
        from export.inductor import unavailable_reason as inductor_reason

        reason = inductor_reason()
        if reason:
            raise RuntimeError(f"--inductor: {reason}")
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
    """Run the requested exports on an artifact folder; adds figures to ``result`` and lines to ``lines``."""
    tensorrt = getattr(args, "tensorrt", False)
    if getattr(args, "inductor", False):
        _export_inductor(out, args, result, lines)
    if not (args.onnx or args.fp16 or args.int8 or args.tokens or tensorrt):
        return
    from export.onnx import export_onnx, summary_lines

    data = [d for d in args.parity_data.split(",") if d]
    record = export_onnx(out, fp16=args.fp16, int8=args.int8, tokens=args.tokens, data=data,
                         parity_images=args.parity_images)
    result["export"] = {**result.get("export", {}), **record}
    lines.append(f"ONNX ({record['onnx']['exporter']} exporter, opset {record['onnx']['opset']}); parity vs "
                 f"PyTorch on {record['parity_data']['images']} real images "
                 f"({', '.join(record['parity_data']['sources'])}):")
    lines += summary_lines(record)
    if tensorrt:
        from export.tensorrt import build_engine, tensorrt_parity

        build_engine(out, precision=args.trt_precision, min_batch=args.batch_min, opt_batch=args.batch_opt,
                     max_batch=args.batch_max, timing_cache=args.timing_cache)
        trt_record = tensorrt_parity(out, data, args.parity_images)
        result["export"]["tensorrt"] = trt_record
        emb = trt_record["parity"]["embedding"]
        lines.append(f"  encoder.plan       TensorRT {trt_record['tensorrt']} {trt_record['precision']} on "
                     f"{trt_record['gpu']} (sm {trt_record['compute_capability']}): cos min "
                     f"{emb['cosine_min']:.6f}, top-10 nbr overlap {emb['top10_neighbour_overlap']:.3f}")


def _export_inductor(out: Path, args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    """``--inductor``: encoder.pt2 compiled for this torch and device, parity-checked (export.inductor)."""
    from export.inductor import export_inductor, summary_line

    data = [d for d in args.parity_data.split(",") if d]
    record = export_inductor(out, device=args.inductor_device, precision=args.inductor_precision, data=data,
                             parity_images=args.parity_images, max_batch=args.batch_max)
    result.setdefault("export", {})["inductor"] = record
    lines.append(summary_line(record))


def embed(args: argparse.Namespace) -> dict[str, Any] | int:
    """``mae embed``: stream images through the artifact; write vectors.npy and the row -> path list beside it.

    Inputs are image files, folders, ``.txt`` lists, or WebDataset shards. Under torchrun every rank embeds its
    share (whole shards, or a contiguous run of files) into a work folder beside ``--out`` (which must be on a
    filesystem every node sees) and rank 0 writes the result, rows in input order.
    """
    import os

    from export.runtime import EmbeddedFiles, Embedder
    from mae.dist import barrier, init_distributed, rank_slice, shutdown_distributed, work_folder
    from mae.shards import is_shard_spec, open_shards

    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out must be a .npy file, got {out}")
    shard_specs = [i for i in args.inputs if is_shard_spec(i)]
    if shard_specs and len(args.inputs) > 1:
        raise ValueError("give WebDataset shards as the only input (a packed folder, or a pattern such as "
                         "'DIR/train-{000000..000127}.tar')")
    shards, files = None, []
    if shard_specs:
        source = open_shards(shard_specs[0])
        shards = type(source.train)(source.name, source.train.shards + (source.val.shards if source.val else []))
        total = shards.total
    else:
        from mae.sources import list_images

        files, _ = list_images(args.inputs)
        total = len(files)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    dist = init_distributed(getattr(args, "device", None), timeout_minutes=24 * 60) if distributed else None
    try:
        rank, world = (dist.rank, dist.world) if dist else (0, 1)
        device = str(dist.device) if dist and dist.device.type == "cuda" else None
        embedder = Embedder.load(args.artifact, backend=args.backend, batch_size=args.batch_size,
                                 precision=args.precision, device=device)
        if shards is not None:
            done = embedder.embed_shards(shards, rank=rank, world=world, workers=args.workers, progress=rank == 0)
        else:
            a, b = rank_slice(len(files), rank, world)
            done = embedder.embed_files(files[a:b], workers=args.workers, progress=rank == 0, first=a)
        if dist:
            work = work_folder(out, "embed")
            done.save(work / f"rank{rank}")
            barrier(dist)
            if rank == 0:
                try:
                    done = EmbeddedFiles.concat([EmbeddedFiles.load(work / f"rank{r}") for r in range(world)])
                finally:
                    import shutil

                    shutil.rmtree(work, ignore_errors=True)
            barrier(dist)
            if rank != 0:
                return 0  # under torchrun only rank 0 writes and reports
    finally:
        if dist:
            shutdown_distributed()
    errors = [s["error"] for s in done.skipped]
    if not done.positions:
        raise ValueError(f"none of the {total} images could be decoded; first error: {errors[0] if errors else '-'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, done.vectors)
    paths_file = out.with_suffix(".json")
    names = [str(Path(n).resolve()) if shards is None else n for n in done.names]
    write_json_atomic(paths_file, {"artifact_sha256": embedder.sha256, "backend": embedder.backend_name,
                                   "dim": embedder.dim, "paths": names, "skipped": errors,
                                   "world_size": world})
    text = (f"embedded {len(names)} images with {embedder.backend_name} -> {out} {tuple(done.vectors.shape)}"
            + (f" on {world} ranks" if world > 1 else "") + f"; row paths in {paths_file}")
    if errors:
        text += f"\nskipped {len(errors)} unreadable: " + "; ".join(errors[:5])
    return {"out": str(out), "paths": str(paths_file), "count": len(names), "dim": embedder.dim,
            "backend": embedder.backend_name, "skipped": errors, "world_size": world, "text": text}
