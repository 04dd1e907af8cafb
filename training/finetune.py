"""Finetuning and linear probing of a pretrained MAE encoder: ``mae finetune [--linear-probe]``.

The classifier is a plain timm ``VisionTransformer`` loaded from the MAE checkpoint's encoder keys (ours, or
an official ``mae_pretrain_vit_*.pth``), so a finetuned checkpoint has the official finetuned layout
(``fc_norm``, ``head``) and ``mae export`` turns it into an artifact with label names.

- **finetune** (official ``main_finetune.py``): global average pooling + ``fc_norm`` (class token as an option),
  head initialised with trunc_normal(std=2e-5), layer-wise lr decay, drop path, RandAugment, random erasing,
  mixup/cutmix with soft-target cross-entropy (label smoothing otherwise), warmup + cosine, AdamW.
- **linear probe** (``main_linprobe.py``): frozen encoder (no parameter of it requires a gradient, so none is
  computed), class-token feature (``finetune.probe_pool=avg``: mean of the normed patch tokens),
  ``head = Sequential(BatchNorm1d(affine=False, eps=1e-6), Linear)`` with the Linear initialised N(0, 0.01),
  weight decay 0, LARS (``finetune.probe_optimizer=lars``, the paper's choice for
  its 16,384-image batches) or SGD with momentum 0.9 (``sgd``: at a few hundred images per batch LARS's trust
  ratio mostly slows the head down), crop + flip only.

Both keep the best-on-val weights in ``RUN/best.pt`` beside the resumable ``RUN/checkpoint.pt``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mae import artifact as artifact_lib
from mae.checkpoint import load_checkpoint, load_weights_and_meta, save_checkpoint
from mae.config import PRESETS, Config, DataConfig, FinetuneConfig, OptimConfig, length_overrides
from mae.dist import Dist
from mae.errors import UsageError
from mae.images import Preprocessing
from mae.model import DECODER_PREFIXES, infer_model_config
from mae.sources import DataError, Source
from training.augment import FinetuneTransform
from training.data import eval_loader, training_data
from training.loop import Trainer
from training.run import resumed_config, run_training
from training.rundir import CHECKPOINT, RunDir

FINETUNE_HEAD_STD = 2e-5  # official main_finetune.py: trunc_normal_(model.head.weight, std=2e-5)
PROBE_HEAD_STD = 0.01  # official main_linprobe.py: trunc_normal_(model.head.weight, std=0.01)
EVAL_EVERY_EPOCHS = 1


# ----------------------------------------------------------------------------------------------- config


def init_config(init: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The config a finetune of ``init`` starts from, and the init's weights.

    Our checkpoints carry their config (a pretraining run from before the finetune section existed gets its
    preset's recipe, or the defaults); official weights get their shape-inferred architecture, ImageNet
    preprocessing and the official ViT-B recipe.
    """
    state, saved, _ = load_weights_and_meta(init)
    if saved:
        sections = {k: v for k, v in saved.items()
                    if k in ("model", "data", "optim", "run", "finetune", "contrastive", "preset")}
        cfg = Config.from_dict(sections)
        if "finetune" not in saved and cfg.preset in PRESETS:
            cfg = dataclasses.replace(cfg, finetune=PRESETS[cfg.preset]().finetune)
        if "contrastive" not in saved and cfg.preset in PRESETS:
            cfg = dataclasses.replace(cfg, contrastive=PRESETS[cfg.preset]().contrastive)
    else:
        cfg = Config(model=infer_model_config(state), data=DataConfig(), finetune=FinetuneConfig(), preset="official")
    return cfg, state


FINETUNE_BETAS = (0.9, 0.999)  # official main_finetune.py: AdamW's defaults, not pretraining's (0.9, 0.95)
# ``--set optim.X`` on ``mae finetune`` names the finetune field that X is read from (finetune, probe).
_OPTIM_TO_FINETUNE = {
    "batch_size": ("batch_size", "probe_batch_size"), "blr": ("blr", "probe_blr"),
    "weight_decay": ("weight_decay", None), "warmup_epochs": ("warmup_epochs", "probe_warmup_epochs"),
    "min_lr": ("min_lr", None), "accum_iter": ("accum_iter", None), "clip_grad": ("clip_grad", None),
}


def recipe(cfg: Config, linear_probe: bool) -> tuple[OptimConfig, int]:
    """The optimiser and epochs of a finetune (or linear-probe) run, read from ``cfg.finetune`` alone."""
    ft = cfg.finetune
    if linear_probe:  # weight decay 0 and a zero floor, as main_linprobe.py; LARS/SGD ignore betas
        return OptimConfig(batch_size=ft.probe_batch_size, blr=ft.probe_blr, weight_decay=0.0,
                           warmup_epochs=ft.probe_warmup_epochs, min_lr=0.0), ft.probe_epochs
    return OptimConfig(batch_size=ft.batch_size, accum_iter=ft.accum_iter, blr=ft.blr, weight_decay=ft.weight_decay,
                       betas=FINETUNE_BETAS, warmup_epochs=ft.warmup_epochs, min_lr=ft.min_lr,
                       clip_grad=ft.clip_grad), ft.epochs


def finetune_config(base: Config, linear_probe: bool, overrides: Sequence[str] = ()) -> Config:
    """The config of a finetune run: the init's, with its ``run.steps`` cleared (a new run) and ``overrides``.

    The recipe is ``finetune.*``; ``optim.*`` describes the pretraining, so setting it here is refused with the
    finetune field to set instead.
    """
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith("optim."):
            field = _OPTIM_TO_FINETUNE.get(key[len("optim."):], (None, None))[1 if linear_probe else 0]
            hint = f"--set finetune.{field}=..." if field else "the finetune section (mae finetune --help)"
            raise UsageError(f"mae finetune reads its optimiser from finetune.*, not {key}: use {hint}")
    return base.replace(run={"steps": None}).override(overrides)


# ----------------------------------------------------------------------------------------------- model


def build_classifier(cfg: Config, num_classes: int, linear_probe: bool) -> nn.Module:
    """A timm VisionTransformer for ``cfg.model`` with a fresh head (the official initialisations)."""
    from timm.layers import trunc_normal_

    ft = cfg.finetune
    pool = ft.probe_pool if linear_probe else ft.global_pool
    # the probe reads the frozen encoder's own final norm; a finetune with avg pooling learns fc_norm instead
    fc_norm = pool == "avg" and not linear_probe
    kwargs = artifact_lib.vit_kwargs(dataclasses.asdict(cfg.model), pool, fc_norm, num_classes)
    kwargs["drop_path_rate"] = 0.0 if linear_probe else ft.drop_path
    vit = artifact_lib.build_vit(kwargs)
    if linear_probe:
        trunc_normal_(vit.head.weight, std=PROBE_HEAD_STD)
        vit.head = nn.Sequential(nn.BatchNorm1d(vit.head.in_features, affine=False, eps=1e-6), vit.head)
    else:
        trunc_normal_(vit.head.weight, std=FINETUNE_HEAD_STD)
    nn.init.zeros_(vit.head[-1].bias if linear_probe else vit.head.bias)
    return vit


def load_encoder(vit: nn.Module, state: dict[str, torch.Tensor], source_grid: tuple[int, int] | None = None
                 ) -> list[str]:
    """Load MAE encoder weights into a classifier ViT; returns the keys left at their fresh init.

    The decoder, a previous head and (for avg pooling, which uses fc_norm instead) the final norm are dropped;
    position embeddings are resampled (bicubic, timm's ``resample_abs_pos_embed``) when the grid differs.
    Anything else missing means the init is another architecture: an error that names the keys.
    """
    from timm.layers import resample_abs_pos_embed

    own = vit.state_dict()
    drop = ("head.", "fc_norm.", "nnclr.") + DECODER_PREFIXES  # nnclr.: a contrastive run's heads
    weights = {k: v for k, v in state.items()
               if not k.startswith(drop) and not (k.startswith("norm.") and k not in own)}
    pos = weights.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape:
        new_grid = vit.patch_embed.grid_size
        weights["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(new_grid),
                                                      old_size=list(source_grid) if source_grid else None,
                                                      num_prefix_tokens=vit.num_prefix_tokens)
    unexpected = sorted(set(weights) - set(own))
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
                  if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(weights))
    fresh = {k for k in own if k.startswith(("head.", "fc_norm."))}
    if unexpected or mismatched or set(missing) - fresh:
        raise UsageError("the init weights do not fit this encoder: "
                         f"missing {sorted(set(missing) - fresh)[:6]}, unexpected {unexpected[:6]}, "
                         f"shape mismatches {mismatched[:4]}")
    vit.load_state_dict(weights, strict=False)
    return missing


def freeze_encoder(vit: nn.Module) -> None:
    """Linear probe: only the head trains; nothing before it requires (or receives) a gradient."""
    for name, p in vit.named_parameters():
        p.requires_grad_(name.startswith("head."))


def layer_decay_groups(vit: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """timm's BEiT/MAE parameter groups: ``lr_scale = layer_decay ** (num_layers - layer_id)`` with the stem
    (patch_embed, cls_token, pos_embed) at layer 0, block i at i + 1 and norm/fc_norm/head at the top (scale 1);
    no weight decay on 1-d parameters, cls_token and pos_embed. Identical to the official ``param_groups_lrd``."""
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(vit, weight_decay=weight_decay, no_weight_decay_list=vit.no_weight_decay(),
                                    layer_decay=layer_decay)


# ----------------------------------------------------------------------------------------------- training


class Finetuner(Trainer):
    """Classification on top of the encoder; every epoch: top-1 on the val split, best weights to best.pt."""

    def __init__(self, cfg: Config, run: RunDir, dist: Dist, data: str | Source, state: dict[str, torch.Tensor],
                 source_grid: tuple[int, int] | None, linear_probe: bool):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        self.linear_probe = linear_probe
        self.pooling = cfg.finetune.probe_pool if linear_probe else cfg.finetune.global_pool
        ft = cfg.finetune
        transform = FinetuneTransform(cfg, linear_probe)
        optim, epochs = recipe(cfg, linear_probe)
        sets = training_data(data, cfg, dist, transform, optim.batch_size)
        if not sets.labelled:
            raise DataError(f"{sets.name} has no class labels: finetuning needs a labelled set (mnist5k, digits), "
                            "a folder with one subfolder per class, or shards packed from one")
        self.labels = list(sets.classes)
        torch.manual_seed(cfg.run.seed)
        vit = build_classifier(cfg, len(self.labels), linear_probe)
        self.fresh_keys = load_encoder(vit, state, source_grid)
        if linear_probe:
            freeze_encoder(vit)
            groups = [{"params": [vit.head[1].weight], "weight_decay": 0.0, "lr_scale": 1.0, "always_adapt": True},
                      {"params": [vit.head[1].bias], "weight_decay": 0.0, "lr_scale": 1.0, "always_adapt": False}]
            self.mixup = None
            self.criterion: nn.Module = nn.CrossEntropyLoss()
        else:
            groups = layer_decay_groups(vit, ft.weight_decay, ft.layer_decay)
            self.mixup = None
            if ft.mixup > 0 or ft.cutmix > 0:
                if ft.batch_size % 2:
                    raise UsageError(f"mixup/cutmix needs an even batch size, got finetune.batch_size "
                                     f"{ft.batch_size}")
                self.mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.smoothing,
                                   num_classes=len(self.labels))
                self.criterion = SoftTargetCrossEntropy()
            else:
                self.criterion = nn.CrossEntropyLoss(label_smoothing=ft.smoothing)
        super().__init__(cfg, run, dist, vit, sets.train, optimizer_groups=groups, optim=optim, epochs=epochs,
                         normalize=transform.normalizer())
        self.log_name = "linear probe" if linear_probe else "finetune"
        self.periodic_every = self.steps_per_epoch * EVAL_EVERY_EPOCHS
        self.preprocessing = Preprocessing.from_config(cfg)
        self.val_set = sets.val
        self.val_skipped = 0
        self.erase = transform.erasing(dist.device)
        self.best: dict[str, Any] = {"top1": -1.0, "step": 0}

    @property
    def best_path(self) -> Path:
        return self.run.path / "best.pt"

    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if not self.linear_probe:
            return super().make_optimizer(groups)
        if self.cfg.finetune.probe_optimizer == "lars":
            from timm.optim import Lars

            return Lars(groups, lr=self.base_lr, momentum=0.9, weight_decay=0.0)
        for g in groups:
            g.pop("always_adapt")
        return torch.optim.SGD(groups, lr=self.base_lr, momentum=0.9, weight_decay=0.0)

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.erase is not None:  # per image, after normalisation (timm's order), on the device
            images = self.erase(images)
        if self.mixup is not None:
            if images.shape[0] % 2:  # an unreadable image was skipped; mixup pairs the batch with its reverse
                images, labels = images[:-1], labels[:-1]
            images, targets = self.mixup(images, labels)  # soft targets (N, K), smoothing folded in
            return self.criterion(model(images), targets), {}
        logits = model(images)
        return self.criterion(logits, labels), {"train_top1": (logits.argmax(1) == labels).float().mean().item()}

    @torch.no_grad()
    def val_top1(self) -> tuple[float, float]:
        """(top-1, mean cross-entropy) on the val split."""
        self.model.eval()
        correct, loss, count, skipped = 0, 0.0, 0, 0
        for images, labels, bad in eval_loader(self.val_set, 256, 0):
            skipped += bad
            if len(images) == 0:
                continue
            images, labels = self.normalize(images, self.dist.device), labels.to(self.dist.device)
            with self.autocast():
                logits = self.model(images).float()
            correct += int((logits.argmax(1) == labels).sum())
            loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
        self.model.train()
        self.val_skipped = skipped
        return correct / max(count, 1), loss / max(count, 1)

    def periodic(self, step: int, final: bool) -> dict[str, float]:
        if not (self.dist.is_main or self.fsdp):  # a sharded model's forward needs every rank
            return {}
        top1, loss = self.val_top1()
        if top1 > self.best["top1"]:
            self.best = {"top1": top1, "step": step, "epoch": round(step / self.steps_per_epoch, 3)}
            weights = self.model_state()
            if self.dist.is_main:
                save_checkpoint(self.best_path, {"model": weights, "step": step,
                                                 "epoch": step // self.steps_per_epoch, "config": self.cfg.to_dict(),
                                                 **self.checkpoint_extra()})
        return {"epoch": round(step / self.steps_per_epoch, 3), "val_top1": top1, "val_loss": loss,
                "best_val_top1": self.best["top1"], "val_skipped_images": self.val_skipped}

    def run_record(self) -> dict[str, Any]:
        return {"labels": self.labels, "optimiser": dataclasses.asdict(self.optim), "total_steps": self.total_steps}

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        return {"best_checkpoint": str(self.best_path), "val_top1": last.get("val_top1"),
                "best_val_top1": self.best["top1"], "best_step": self.best["step"],
                "val_skipped_images": self.val_skipped}

    def checkpoint_extra(self) -> dict[str, Any]:
        """What an artifact needs besides the weights: class names, and the pooling the head was trained on
        (saved here once, so that export reads it instead of guessing it from the weights)."""
        return {"labels": self.labels, "task": task_name(self.linear_probe),
                "pooling": self.pooling, "best_top1": self.best["top1"], "best_step": self.best["step"]}

    def restore_extra(self, ckpt: dict[str, Any]) -> None:
        if list(ckpt.get("labels", self.labels)) != self.labels:
            raise UsageError(f"the checkpoint was trained on classes {ckpt['labels'][:8]}, this data has "
                             f"{self.labels[:8]}")
        self.best = {"top1": float(ckpt.get("best_top1", -1.0)), "step": int(ckpt.get("best_step", 0))}
        self.best["epoch"] = round(self.best["step"] / self.steps_per_epoch, 3)


def finetune(cfg: Config, init: str | Path, out: str | Path, data: str, state: dict[str, torch.Tensor],
             linear_probe: bool = False, resume: bool = False, source_grid: tuple[int, int] | None = None
             ) -> dict[str, Any]:
    """Finetune (or linear-probe) into the run folder ``out``; returns a summary (paths, best val top-1, time)."""
    return run_training(out, lambda run, dist: Finetuner(cfg, run, dist, data, state, source_grid, linear_probe),
                        resume=resume, record={"task": task_name(linear_probe), "init": str(init), "data_source": data})


RESUME_WITH = {"finetune": "mae finetune (without --linear-probe)", "linear_probe": "mae finetune --linear-probe",
               "contrastive": "mae finetune --contrastive"}


def task_name(linear_probe: bool) -> str:
    """What a finetune run's checkpoint, config and summary call its task."""
    return "linear_probe" if linear_probe else "finetune"


def main(args) -> dict[str, Any]:
    """``mae finetune --init C --data D --out RUN [--linear-probe] [--epochs N] [--resume] [--set k=v]``."""
    if getattr(args, "augment", None):
        raise UsageError("--augment chooses the views of --contrastive; add --contrastive or drop it")
    checkpoint = Path(args.out) / CHECKPOINT
    prefix = "finetune.probe_" if args.linear_probe else "finetune."
    sets = length_overrides(args.epochs, None, args.batch_size, prefix=prefix) + list(args.overrides)
    init_cfg, state = init_config(args.init)
    cfg = finetune_config(init_cfg, args.linear_probe, sets)
    if args.resume and checkpoint.exists():
        task = task_name(args.linear_probe)
        saved_task = load_checkpoint(checkpoint).get("task", task)
        if saved_task != task:
            raise UsageError(f"{checkpoint} is a {saved_task} run; resume it with "
                             f"{RESUME_WITH.get(saved_task, 'the command that made it')}")
    cfg = resumed_config(args.out, cfg, resume=args.resume, asked=bool(sets))
    summary = finetune(cfg, args.init, args.out, args.data, state, linear_probe=args.linear_probe,
                       resume=args.resume, source_grid=init_cfg.model.grid_size)
    what = "linear probe" if args.linear_probe else "finetune"
    summary["text"] = (
        f"{what}: {summary['steps']} steps in {summary['seconds']} s on {summary['device']} "
        f"(x{summary['world_size']}): "
        f"val top-1 {_fmt(summary['val_top1'])}, best {_fmt(summary['best_val_top1'])} at step {summary['best_step']}\n"
        f"  checkpoint      {summary['checkpoint']}\n  best weights    {summary['best_checkpoint']}\n"
        f"  metrics         {Path(summary['run']) / 'metrics.jsonl'}\n  loss curve      {summary.get('loss_curve')}\n"
        f"  export with     mae export --checkpoint {summary['best_checkpoint']} --out ARTIFACT"
    )
    return summary


def _fmt(value: float | None) -> str:
    """A top-1 for people; None on the DDP ranks that do not evaluate."""
    return "n/a" if value is None or value < 0 else f"{value:.4f}"
