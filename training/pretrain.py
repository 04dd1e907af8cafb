"""MAE pretraining: ``mae pretrain`` (one process) or ``torchrun --nproc_per_node=K -m cli pretrain`` (DDP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mae.config import Config
from mae.dist import Dist
from mae.errors import UsageError
from mae.images import Preprocessing
from mae.model import MaskedAutoencoder
from mae.sources import Source
from mae.visualize import reconstruction_grid
from training.augment import PretrainTransform
from training.data import eval_loader, training_data
from training.loop import Trainer
from training.run import resumed_config, run_training
from training.rundir import RunDir

VIS_IMAGES = 8
VAL_IMAGES = 512  # cap on the images scored for val_loss at each periodic evaluation


class Pretrainer(Trainer):
    """Masked-patch reconstruction; every ``vis_every`` steps: val loss on fixed masks and a reconstruction grid."""

    log_name = "pretrain"

    def __init__(self, cfg: Config, run: RunDir, dist: Dist, data: str | Path | Source):
        """``data``: a ``--data`` spec, or a ``mae.sources.Source`` (split as a folder would be)."""
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
            with self.autocast():
                loss, _, _ = self.model(self.normalize(images, self.dist.device), noise=noise)
            total += loss.item() * len(images)
            count += len(images)
        self.model.train()
        self.val_skipped = skipped
        return total / count if count else None

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        out = {"val_loss": last.get("val_loss"), "val_skipped_images": self.val_skipped}
        if self.dist.is_main:
            pictures = sorted((self.run.path / "reconstructions").glob("*.png"))
            out["reconstruction"] = str(pictures[-1]) if pictures else None
        return out

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
            with self.autocast():
                grid = reconstruction_grid(self.model, images, self.preprocessing.mean, self.preprocessing.std,
                                           noise=noise.to(self.dist.device))
            if self.dist.is_main:
                out = self.run.path / "reconstructions"
                out.mkdir(exist_ok=True)
                grid.save(out / f"step_{step:07d}.png")
        return row if self.dist.is_main else {}


def pretrain(cfg: Config, out: str | Path, data: str, resume: bool = False) -> dict[str, Any]:
    """Pretrain from ``cfg`` into the run folder ``out``; returns a summary (paths, steps, losses, time)."""
    return run_training(out, lambda run, dist: Pretrainer(cfg, run, dist, data), resume=resume,
                        record={"data_source": data})


def main(args) -> dict[str, Any]:
    """``mae pretrain``: presets listing, config from flags, or the saved config when resuming."""
    from mae.config import config_from_args, describe_presets

    if args.list_presets:
        rows = describe_presets()
        lines = [f"{r['name']:<26} {r['params_m']:>8.2f}M  {r['img_size'][0]}x{r['img_size'][1]}/{r['patch_size']}  "
                 f"enc {r['encoder']:<24} dec {r['decoder']:<22} {r['summary']}" for r in rows]
        return {"presets": rows, "text": "\n".join(lines)}
    if not args.data or not args.out:
        raise UsageError("--data and --out are required (or --list-presets)")
    asked = args.overrides or args.epochs is not None or args.steps is not None or args.batch_size is not None
    cfg = resumed_config(args.out, config_from_args(args), resume=args.resume, asked=bool(asked))
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
