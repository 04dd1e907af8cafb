"""What several stages share in the work folder: photo-like JPEGs, the size of the pretraining run and the checkpoint
the finetuning stages start from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.device.stage import TOY


def photo_folder(work: Path, dry: bool) -> Path:
    """Photo-like JPEGs in class folders: crops of scikit-image's photographs, resized to 500x375 (or 375x500),
    flipped and brightness-jittered, saved at quality 90. Real image content, so decoding costs what photos
    cost (noise JPEGs would be larger and slower). Made once per work folder."""
    out = work / ("jpegs-dry" if dry else "jpegs")
    done = out / ".done"
    if done.exists():
        return out
    count, size, classes = (48, (100, 75), 4) if dry else (4000, (500, 375), 8)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, i, size, classes) for i in range(count)]
    workers = 1 if dry else max(1, min(14, (os.cpu_count() or 2) - 2))
    if workers == 1:
        for job in jobs:
            write_jpeg(job)
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(write_jpeg, jobs, chunksize=64)
    done.write_text(str(count))
    return out


PHOTOS: list[Any] = []
"""scikit-image's photographs, read once per process that writes JPEGs."""


def write_jpeg(job: tuple[Path, int, tuple[int, int], int]) -> None:
    import numpy as np
    from PIL import Image

    from mae.sources import load_source

    out, i, (w, h), classes = job
    if not PHOTOS:
        source = load_source("photos")
        PHOTOS.extend(source.read(k) for k in range(len(source)))
    rng = np.random.default_rng(i)
    k = i % len(PHOTOS)
    arr = PHOTOS[k]
    im = Image.fromarray(arr if arr.ndim == 2 or arr.shape[2] in (3, 4) else arr[..., :3]).convert("RGB")
    scale = rng.uniform(0.4, 1.0)
    cw, ch = max(8, int(im.width * scale)), max(8, int(im.height * scale))
    x0, y0 = int(rng.integers(0, im.width - cw + 1)), int(rng.integers(0, im.height - ch + 1))
    size = (w, h) if rng.random() < 0.7 else (h, w)  # mostly landscape, like a photo collection
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im = Image.fromarray(np.clip(np.asarray(im, np.float32) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8))
    folder = out / f"class{k % classes}"
    folder.mkdir(exist_ok=True)
    im.save(folder / f"{i:05d}.jpg", quality=90)


def loop_plan(dry: bool) -> dict[str, Any]:
    """The pretraining run's size: a few hundred ViT-B steps on the GPU; a few dozen toy steps on the CPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    if dry:
        return {"preset": "mae_vit_tiny_patch4_32", "sets": TOY, "batch": 8, "steps": 40, "ckpt_every": 10,
                "log_every": 2, "workers": 1, "model": "toy ViT (32 px, 2+1 blocks)"}
    return {"preset": "mae_vit_base_patch16", "sets": [], "batch": 128, "steps": 240, "ckpt_every": 120,
            "log_every": 10, "workers": max(1, min(14, cores - 2)), "model": "ViT-B/16"}



def init_checkpoint(work: Path, plan: dict[str, Any]) -> tuple[Path, str]:
    """The checkpoint a finetuning stage starts from, and where it came from: the pretrain_loop stage's when it left
    one of ``plan``'s model (``loop_plan``), else a fresh MAE of that config written to ``work`` (so that a failed
    pretraining run fails alone)."""
    import torch

    from mae.checkpoint import save_checkpoint
    from mae.config import Config, get_preset
    from mae.model import MaskedAutoencoder

    cfg = get_preset(plan["preset"]).override(plan["sets"])
    pretrained = work / "pretrain" / "checkpoint.pt"
    if pretrained.exists():
        saved = torch.load(pretrained, map_location="cpu", weights_only=True, mmap=True).get("config") or {}
        if Config.from_dict({"model": saved.get("model", {})}).model == cfg.model:
            return pretrained, "the pretrain_loop stage's checkpoint"
        why = f"the pretrain_loop stage's checkpoint is not a {plan['model']}"
    else:
        why = "the pretrain_loop stage left no checkpoint"
    init = work / "init.pt"
    torch.manual_seed(0)
    save_checkpoint(init, {"model": MaskedAutoencoder(cfg.model).state_dict(), "step": 0, "epoch": 0,
                           "config": cfg.to_dict()})
    return init, f"random-init MAE ({why})"
