"""Benchmark the input pipeline (issue 10): images/s per core of the pretraining transform, against plain torchvision.

``python bench/input.py`` generates photo-like JPEGs (quality 90) at three sizes (500x375, 1024x768, 3000x2000)
and times, per image, the ViT-B/16 pretraining transform (RandomResizedCrop to 224, scale 0.2-1, flip):

- **torchvision** (the named baseline): ``PIL.Image.open(p).convert("RGB")``, v2 RandomResizedCrop and flip on the
  PIL image, to float, normalise;
- **e59484f** (the path before this issue): decode the whole image, convert the whole image to float, crop and
  resize in float, normalise;
- **uint8** (``training.augment.PretrainTransform``): crop box from the header, JPEG decoded at 1/2-1/8 scale when
  the box allows (``draft``), crop + resize in uint8, no normalisation (it happens on the device);
- **gpu-prep**: what a worker does under ``data.decode=gpu`` (read the bytes, parse the header, draw the box).

Each is timed in one process with one thread (what one DataLoader worker costs: img/s per core), in rounds that
interleave the pipelines, and the median of the rounds is printed with its ratio to torchvision. Then the uint8
path in a DataLoader with 1 and 2 workers (the scaling that the 16-core extrapolation uses), WebDataset shards
against a folder (the same images, and small 32 px PNGs where per-file costs dominate), the bytes each sample
ships between processes, and the cold start of ``mae search`` (one image, Flat index, onnxruntime backend).
``--gpu``: nvjpeg decode of batches on the GPU (``data.decode=gpu``), img/s.

Goals: uint8 >= 2x torchvision per core at 500x375 and >= 3x at 3000x2000; 16 cores feed >= 5,000 img/s to a
ViT-B/16 step; shards no slower than a folder, faster when files are small; ``mae search`` cold start <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae.config import get_preset  # noqa: E402
from mae.datasets import ImageDataset, ShardTrainStream, collate_skipping_bad, normalize, sample_rng  # noqa: E402
from mae.hardware import cpu_isa  # noqa: E402
from mae.images import read_image, to_channels  # noqa: E402
from mae.sources import load_source  # noqa: E402
from training.augment import PretrainTransform  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"500x375": (375, 500), "1024x768": (768, 1024), "3000x2000": (2000, 3000)}
IMAGES = {"500x375": 96, "1024x768": 48, "3000x2000": 12}
VIT_B_STEP_IMG_S = 5000  # MAE ViT-B/16 on one H200 (bf16, 75% masking): 56 GFLOP per image at 40% of 790 TFLOP/s


# ----------------------------------------------------------------------------------------------- images


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: smooth gradients and blobs plus fine texture, so JPEG sizes are realistic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(0.5, 6) / w, rng.uniform(0.5, 6) / h
            out[..., c] += np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 6))
    out = (out - out.min()) / (out.max() - out.min()) * 200 + 20
    small = rng.normal(0, 12, (h // 4 + 1, w // 4 + 1, 3)).astype(np.float32)
    out += np.kron(small, np.ones((4, 4, 1), np.float32))[:h, :w] + rng.normal(0, 4, (h, w, 3))
    return out.clip(0, 255).astype(np.uint8)


def make_folder(root: Path, size: tuple[int, int], n: int, fmt: str = "JPEG") -> Path:
    for i in range(n):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = photo(*size, seed=i)
        name = folder / f"{i:05d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.fromarray(arr).save(name, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return root


# ----------------------------------------------------------------------------------------------- pipelines


def pipelines(cfg: Any) -> dict[str, Callable[[Path, int], Any]]:
    from torchvision.transforms import InterpolationMode, v2

    mean, std = cfg.data.channel_stats(3)
    size = tuple(cfg.model.img_size)
    scale = tuple(cfg.data.crop_scale)
    bicubic = InterpolationMode.BICUBIC
    tv = v2.Compose([v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True),
                     v2.RandomHorizontalFlip(), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(mean, std)])
    old_ops = v2.Compose([v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True),
                          v2.RandomHorizontalFlip()])
    new = PretrainTransform(cfg)
    gpu_prep = PretrainTransform(cfg.override(["data.decode=gpu"]))

    def torchvision(path: Path, i: int) -> Any:
        with Image.open(path) as im:
            return tv(im.convert("RGB"))

    def previous(path: Path, i: int) -> Any:  # e59484f: mae.data.ImageDataset + PretrainTransform
        x = old_ops(to_channels(read_image(path), 3)).clamp_(0.0, 1.0)
        return normalize(x, mean, std)

    return {
        "torchvision": torchvision,
        "e59484f": previous,
        "uint8": lambda path, i: new(path, sample_rng(0, 0, i)),
        "gpu-prep": lambda path, i: gpu_prep(path, sample_rng(0, 0, i)),
    }


def per_core(fns: dict[str, Callable[[Path, int], Any]], files: list[Path], rounds: int, seconds: float
             ) -> dict[str, float]:
    """Median img/s of each pipeline on one thread, rounds interleaving the pipelines."""
    torch.set_num_threads(1)
    results: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns)
        random.Random(r).shuffle(order)
        for name in order:
            fn, done, started = fns[name], 0, time.perf_counter()
            while True:
                fn(files[done % len(files)], done)
                done += 1
                elapsed = time.perf_counter() - started
                if elapsed >= seconds and done >= 4:
                    break
            results[name].append(done / elapsed)
    return {name: statistics.median(v) for name, v in results.items()}


def loader_rate(dataset: Any, workers: int, batches: int, batch_size: int = 32) -> float:
    """Steady-state img/s of a DataLoader (the first batch, the workers' start, is not counted)."""
    kwargs = {"sampler": [(i % len(dataset), 0) for i in range(batch_size * (batches + 1))]} \
        if isinstance(dataset, ImageDataset) else {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_skipping_bad, **kwargs)
    it = iter(loader)
    next(it)
    started, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)[0])
    rate = n / (time.perf_counter() - started)
    del it
    return rate


def loader_rates(make: dict[str, Callable[[], Any]], workers: list[int], rounds: int, batches: int
                 ) -> dict[tuple[str, int], float]:
    results: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        keys = [(name, w) for name in make for w in workers]
        random.Random(100 + r).shuffle(keys)
        for name, w in keys:
            results.setdefault((name, w), []).append(loader_rate(make[name](), w, batches))
    return {k: statistics.median(v) for k, v in results.items()}


# ----------------------------------------------------------------------------------------------- mae search


def cold_start(tmp: Path, rounds: int) -> dict[str, Any]:
    """Wall and CPU seconds of ``python -m cli search`` (a fresh process: imports, artifact, ORT session, index)
    for one image against a Flat index, onnxruntime backend."""
    from export.onnx import export_onnx
    from mae import artifact
    from mae.sources import export_source
    from retrieval.build import build_index

    art = artifact.from_random_init(tmp / "art", get_preset("mae_vit_tiny_patch4_32"))
    export_onnx(art, parity_images=16)
    images = tmp / "collection"
    export_source(load_source("digits"), images, list(range(200)))
    build_index(art, [images], tmp / "index", workers=0, progress=False)
    query = sorted(images.rglob("*.png"))[7]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "cli", "search", "--index", str(tmp / "index"), str(query), "-k", "5",
           "--backend", "onnx", "--json"]
    walls, cpus = [], []
    for _ in range(rounds):
        before = os.times()
        started = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        walls.append(time.perf_counter() - started)
        after = os.times()
        cpus.append((after.children_user - before.children_user) + (after.children_system - before.children_system))
    probe = subprocess.run([sys.executable, "-X", "importtime", *cmd[1:]], cwd=ROOT, env=env, capture_output=True,
                           text=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in probe.stderr.splitlines() if line.startswith("import time")}
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "rounds": rounds,
            "imports_torch": "torch" in imported}


# ----------------------------------------------------------------------------------------------- GPU


def gpu_decode(files: list[Path], cfg: Any, batch: int = 64, seconds: float = 5.0) -> float:
    """img/s of ``data.decode=gpu`` on the device: nvjpeg batch decode, crop, resize, flip (worker prep excluded)."""
    from mae.datasets import decode_on_device

    prep = PretrainTransform(cfg.override(["data.decode=gpu"]))
    items = [prep(files[i % len(files)], sample_rng(0, 0, i)) for i in range(batch)]
    device = torch.device("cuda")
    decode_on_device(items, tuple(cfg.model.img_size), 3, "bicubic", device)
    torch.cuda.synchronize()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        decode_on_device(items, tuple(cfg.model.img_size), 3, "bicubic", device)
        done += batch
    torch.cuda.synchronize()
    return done / (time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each figure is their median")
    p.add_argument("--seconds", type=float, default=1.5, help="seconds per pipeline per round (per-core timing)")
    p.add_argument("--workers", type=int, default=max(2, min(os.cpu_count() or 2, 16)),
                   help="the N of the 1-and-N-workers DataLoader figures")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated image sizes to time")
    p.add_argument("--gpu", action="store_true", help="also time nvjpeg decoding on the GPU (data.decode=gpu)")
    p.add_argument("--no-search", action="store_true", help="skip the mae search cold start")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    cfg = get_preset("mae_vit_base_patch16").override(["data.num_workers=0"])
    fns = pipelines(cfg)
    isa = cpu_isa()
    report: dict[str, Any] = {"cpu": isa["cpu"], "isa": isa["isa"], "cores": isa["cores"],
                              "python": platform.python_version(), "torch": torch.__version__,
                              "per_core": {}, "loader": {}, "bytes": {}}
    print(f"# input pipeline on {isa['cpu']} ({isa['isa']}, {isa['cores']} cores): one thread per pipeline, "
          f"{args.rounds} interleaved rounds, medians")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folders = {}
        for name in args.sizes.split(","):
            folders[name] = make_folder(tmp / name, SIZES[name], IMAGES[name])
        print("\n| image | torchvision img/s | e59484f img/s | uint8 img/s | uint8 / torchvision | "
              "uint8 / e59484f | gpu-prep img/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, folder in folders.items():
            files = sorted(folder.rglob("*.jpg"))
            r = per_core(fns, files, args.rounds, args.seconds)
            report["per_core"][name] = r
            print(f"| {name} JPEG | {r['torchvision']:.0f} | {r['e59484f']:.0f} | {r['uint8']:.0f} | "
                  f"{r['uint8'] / r['torchvision']:.2f}x | {r['uint8'] / r['e59484f']:.2f}x | {r['gpu-prep']:.0f} |",
                  flush=True)

        # Bytes per sample between processes, and JPEG bytes for the GPU path.
        files = sorted(folders[next(iter(folders))].rglob("*.jpg"))
        uint8 = fns["uint8"](files[0], 0)
        old = fns["e59484f"](files[0], 0)
        report["bytes"] = {"uint8": int(uint8.nbytes), "e59484f_float32": int(old.element_size() * old.nelement()),
                           "jpeg_mean": int(np.mean([f.stat().st_size for f in files]))}
        b = report["bytes"]
        print(f"\nbytes per sample shipped from a worker: uint8 {b['uint8']:,} vs float32 {b['e59484f_float32']:,} "
              f"({b['e59484f_float32'] / b['uint8']:.0f}x fewer); data.decode=gpu ships the JPEG: "
              f"{b['jpeg_mean']:,} on average at {next(iter(folders))}")

        # DataLoader: 1 and N workers; shards against a folder (these JPEGs, and small PNGs).
        from mae.packing import pack
        from mae.shards import open_shards

        small = make_folder(tmp / "small", (32, 32), 2048, fmt="PNG")
        sources = {"500x375 JPEG": folders.get("500x375") or next(iter(folders.values())), "32x32 PNG": small}
        make: dict[str, Callable[[], Any]] = {}
        for label, folder in sources.items():
            source = load_source(folder)
            shard_dir = tmp / f"shards-{label.split()[0]}"
            pack(source, shard_dir, {"train": np.arange(len(source))}, shard_size=4 * 2**20, progress=False)
            shards = open_shards(shard_dir).train
            make[f"folder {label}"] = lambda s=source: ImageDataset(s, range(len(s)), PretrainTransform(cfg))
            make[f"shards {label}"] = lambda s=shards: ShardTrainStream(s, PretrainTransform(cfg), 0, 0, 1, 256, 32)
        workers = sorted({1, args.workers})
        rates = loader_rates(make, workers, max(3, args.rounds // 2), batches=12)
        report["loader"] = {f"{k[0]} x{k[1]}": v for k, v in rates.items()}
        print(f"\n| DataLoader (uint8 path, batch 32) | {' | '.join(f'{w} worker(s) img/s' for w in workers)} | "
              f"scaling {workers[0]}->{workers[-1]} |")
        print("|---|" + "---:|" * (len(workers) + 1))
        for name in make:
            row = [rates[(name, w)] for w in workers]
            print(f"| {name} | {' | '.join(f'{v:.0f}' for v in row)} | {row[-1] / row[0]:.2f}x |")
        for label in sources:
            f1, s1 = rates[(f"folder {label}", 1)], rates[(f"shards {label}", 1)]
            print(f"shards / folder, 1 worker, {label}: {s1 / f1:.2f}x")

        # 16 cores: per-core uint8 rate x 16 x the measured 1 -> N scaling efficiency.
        if "500x375" in report["per_core"] and workers[-1] > 1:
            per = report["per_core"]["500x375"]["uint8"]
            eff = rates[("folder 500x375 JPEG", workers[-1])] / rates[("folder 500x375 JPEG", 1)] / workers[-1]
            est = per * 16 * min(eff, 1.0)
            report["estimate_16_cores"] = est
            print(f"\n16 cores (500x375, extrapolated: {per:.0f} img/s per core x 16 x {min(eff, 1.0):.2f} scaling "
                  f"efficiency measured 1 -> {workers[-1]} workers): {est:,.0f} img/s, "
                  f"{est / VIT_B_STEP_IMG_S:.2f}x the {VIT_B_STEP_IMG_S:,} img/s of a ViT-B/16 step on one H200")

        if not args.no_search:
            cs = cold_start(tmp / "search", max(3, args.rounds))
            report["search_cold_start"] = cs
            print(f"\nmae search cold start (one image, Flat index, onnxruntime): {cs['wall_s']:.2f} s wall, "
                  f"{cs['cpu_s']:.2f} s CPU (median of {cs['rounds']}); imports torch: {cs['imports_torch']}")

        if args.gpu:
            if not torch.cuda.is_available():
                raise SystemExit("--gpu: no CUDA GPU here")
            report["gpu_decode"] = {}
            for name, folder in folders.items():
                rate = gpu_decode(sorted(folder.rglob("*.jpg")), cfg)
                report["gpu_decode"][name] = rate
                print(f"GPU decode (nvjpeg, batch 64, crop + resize on {torch.cuda.get_device_name()}), {name}: "
                      f"{rate:,.0f} img/s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
