"""``mae export`` (checkpoint -> artifact folder -> ONNX / TensorRT / AOTInductor files, each parity-checked) and
``mae embed``: their flags and handlers. Heavy imports (torch, numpy, the exporters) happen inside the handlers,
so that building ``mae``'s parser stays instant."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from export.formats import BACKEND_CHOICES, INDUCTOR_PRECISIONS, TENSORRT_PRECISIONS  # stdlib only
from mae.flags import add_json_flag


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``embed`` to ``mae``."""
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
    add_json_flag(p)
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
    add_json_flag(p)
    p.set_defaults(handler="export.command:embed")  # torchrun --nnodes N ... -m cli embed: ranks share the work


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
    from mae import artifact

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

    import numpy as np

    from export.runtime import EmbeddedFiles, Embedder
    from mae.dist import barrier, init_distributed, rank_slice, shutdown_distributed, work_folder
    from mae.files import atomic_path, write_json_atomic
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
