"""MAE pretraining: ``mae pretrain`` (one process) or ``torchrun --nproc_per_node=K -m cli pretrain`` (DDP)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mae.config import Config
from mae.data import Preprocessing, PretrainTransform
from mae.files import write_json_atomic
from mae.model import MaskedAutoencoder
from mae.visualize import loss_curve, reconstruction_grid
from training.loop import (
    Dist,
    RunDir,
    Trainer,
    eval_loader,
    init_distributed,
    resume_config,
    shutdown_distributed,
    training_data,
)

VIS_IMAGES = 8
VAL_IMAGES = 512  # cap on the images scored for val_loss at each periodic evaluation


class Pretrainer(Trainer):
    """Masked-patch reconstruction; every ``vis_every`` steps: val loss on fixed masks and a reconstruction grid."""

    log_name = "pretrain"

    def __init__(self, cfg: Config, run: RunDir, dist: Dist, data: str | Any):
        """``data``: a ``--data`` spec, or a ``mae.data.Source`` (split as a folder would be)."""
        transform = PretrainTransform(cfg)
        sets = training_data(data, cfg, dist, transform, cfg.optim.batch_size, val_limit=VAL_IMAGES,
                             val_fallback=VIS_IMAGES)
        torch.manual_seed(cfg.run.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        model = MaskedAutoencoder(cfg.model)
        super().__init__(cfg, run, dist, model, sets.train, normalize=transform.normalizer())
        self.preprocessing = Preprocessing.from_config(cfg)
        self.val_set = sets.val
        self.val_skipped = 0

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, _, _ = model(images, mask_ratio=self.cfg.model.mask_ratio)
        return loss, {}

    @torch.no_grad()
    def val_loss(self) -> float | None:
        """Reconstruction loss on the held-out images with masks fixed by the seed (comparable across steps);
        None when no held-out image could be read (they are counted in ``val_skipped_images``)."""
        self.model.eval()
        gen = torch.Generator().manual_seed(self.cfg.run.seed)
        total, count, skipped = 0.0, 0, 0
        for images, _, bad in eval_loader(self.val_set, self.cfg.optim.batch_size, 0):
            skipped += bad
            if len(images) == 0:
                continue
            noise = torch.rand(len(images), self.cfg.model.num_patches, generator=gen).to(self.dist.device)
            with self._autocast():
                loss, _, _ = self.model(self.normalize(images, self.dist.device), noise=noise)
            total += loss.item() * len(images)
            count += len(images)
        self.model.train()
        self.val_skipped = skipped
        return total / count if count else None

    def periodic(self, step: int, final: bool) -> dict[str, float]:
        if not (self.dist.is_main or self.fsdp):  # a sharded model's forward needs every rank
            return {}
        val = self.val_loss()
        row: dict[str, Any] = {"val_skipped_images": self.val_skipped}
        if val is not None:
            row["val_loss"] = val
        picks = np.linspace(0, len(self.val_set) - 1, min(VIS_IMAGES, len(self.val_set))).round().astype(int)
        good = [x for x in (self.val_set[int(i)] for i in picks) if x is not None]  # spread over the classes
        if good:
            images = self.normalize(torch.stack([g[0] for g in good]), self.dist.device)
            noise = torch.rand(len(good), self.cfg.model.num_patches, generator=torch.Generator().manual_seed(0))
            with self._autocast():
                grid = reconstruction_grid(self.model, images, self.preprocessing.mean, self.preprocessing.std,
                                           noise=noise.to(self.dist.device))
            if self.dist.is_main:
                out = self.run.path / "reconstructions"
                out.mkdir(exist_ok=True)
                grid.save(out / f"step_{step:07d}.png")
        return row if self.dist.is_main else {}


def pretrain(cfg: Config, out: str | Path, data: str, resume: bool = False) -> dict[str, Any]:
    """Pretrain from ``cfg`` into the run folder ``out``; returns a summary (paths, steps, losses, time)."""
    dist = init_distributed()
    trainer = None
    try:
        run = RunDir(out, dist)
        if run.checkpoint.exists() and not resume:
            raise FileExistsError(
                f"{run.checkpoint} exists: pass --resume to continue that run, or choose another --out")
        trainer = Pretrainer(cfg, run, dist, data)
        resumed_from = None
        if resume and run.checkpoint.exists():
            trainer.resume()
            resumed_from = trainer.step
        run.write_config(cfg, {"data_source": data, "world_size": dist.world,
                               "effective_batch": trainer.effective_batch, "lr": trainer.base_lr})
        started = time.perf_counter()
        last = trainer.fit()
        seconds = time.perf_counter() - started
        summary = {
            "run": str(run.path),
            "checkpoint": str(run.checkpoint),
            "steps": trainer.step,
            "total_steps": trainer.total_steps,
            "steps_per_epoch": trainer.steps_per_epoch,
            "effective_batch": trainer.effective_batch,
            "lr": trainer.base_lr,
            "resumed_from_step": resumed_from,
            "loss": last.get("loss"),
            "val_loss": last.get("val_loss"),
            "skipped_images": trainer.skipped_images,
            "val_skipped_images": trainer.val_skipped,
            "seconds": round(seconds, 1),
            "world_size": dist.world,
            "rank": dist.rank,
            "device": str(dist.device),
        }
        if dist.is_main:
            summary["loss_curve"] = str(loss_curve(run.metrics, run.path / "loss_curve.png", ("loss", "val_loss")))
            recon = sorted((run.path / "reconstructions").glob("*.png"))
            summary["reconstruction"] = str(recon[-1]) if recon else None
            write_json_atomic(run.path / "summary.json", summary)
        return summary
    finally:
        trainer = None  # the wrapped model goes before its process group (see shutdown_distributed)
        shutdown_distributed()


def main(args) -> dict[str, Any]:
    """``mae pretrain``: presets listing, config from flags, or the saved config when resuming."""
    from mae.config import config_from_args, describe_presets

    if args.list_presets:
        rows = describe_presets()
        lines = [f"{r['name']:<26} {r['params_m']:>8.2f}M  {r['img_size'][0]}x{r['img_size'][1]}/{r['patch_size']}  "
                 f"enc {r['encoder']:<24} dec {r['decoder']:<22} {r['summary']}" for r in rows]
        return {"presets": rows, "text": "\n".join(lines)}
    if not args.data or not args.out:
        raise ValueError("--data and --out are required (or --list-presets)")
    cfg = config_from_args(args)
    checkpoint = Path(args.out) / "checkpoint.pt"
    if args.resume and checkpoint.exists():
        asked = args.overrides or args.epochs is not None or args.steps is not None or args.batch_size is not None
        cfg = resume_config(checkpoint, cfg, asked=bool(asked))
    summary = pretrain(cfg, args.out, args.data, resume=args.resume)
    if summary["rank"] != 0:
        return 0  # under torchrun only rank 0 reports
    skipped = summary["skipped_images"] + summary["val_skipped_images"]
    summary["text"] = (
        f"pretrained {summary['steps']} steps in {summary['seconds']} s on {summary['device']} "
        f"(x{summary['world_size']}): loss {_fmt(summary['loss'])}, val_loss {_fmt(summary['val_loss'])}"
        + (f"; skipped {skipped} unreadable image(s) (named in the warnings above)" if skipped else "") + "\n"
        f"  checkpoint      {summary['checkpoint']}\n  metrics         {Path(summary['run']) / 'metrics.jsonl'}\n"
        f"  loss curve      {summary.get('loss_curve')}\n  reconstruction  {summary.get('reconstruction')}"
    )
    return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
