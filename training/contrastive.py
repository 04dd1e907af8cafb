"""Contrastive tuning of a pretrained MAE encoder into a search embedding, without labels (MAE-CT).

Lehner et al., "Contrastive Tuning: A Little Help to Make Masked Autoencoders Forget" (arXiv 2304.10520), as the
official code runs it (github.com/ml-jku/MAE-CT; ``contrastive_heads/nnclr_head.py``, ``nnclr_ema_queue_head.py``,
``losses/nnclr_loss.py``, ``freezers/vit_block_freezer.py``, the ``stage2``/``stage3`` yamls):

- **Heads** (NNCLR's): the pooled encoder output (mean of the normed patch tokens, or the class token) goes through
  a projector ``Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN`` and a predictor ``Linear-BN-ReLU, Linear`` (no
  biases before a BN), each view through its own forward so that batch statistics are per view.
- **Queue**: a first-in-first-out support set of L2-normalised projections (the first view's, after each step;
  gathered from every rank, so all ranks hold the same queue). Each view's positive is its nearest neighbour there
  (an image's own earlier projection excluded), the other view's prediction is pulled towards it: InfoNCE over
  the predictions of the whole (all-ranks) batch, temperature ``contrastive.temperature``, symmetrised.
- **Stage 1, the heads** (``contrastive.head_epochs``): the encoder is frozen and runs without autograd; the
  positive is the nearest neighbour; the queue holds the projector's own outputs.
- **Stage 2, tuning** (``contrastive.epochs``): the lower half of the blocks (``frozen_blocks``) and the patch
  embedding stay frozen and run without autograd; the upper blocks train with layer-wise lr decay (0.65) beside
  the heads. The queue is filled and searched with an EMA copy of the projector (momentum 0.99), and the positive
  is drawn from the 20 nearest. The heads and the queue carry over from stage 1.

Each stage has its own AdamW (betas 0.9/0.95) and its own schedule (linear warmup over 20% of its steps, then a
half cosine to 0), lr = blr x 2 x batch / 256. The run folder is one run: ``checkpoint.pt`` holds the current
stage, its step, the model (the encoder under timm's key names, the heads under ``nnclr.``), the optimiser and the
queue, so ``--resume`` continues exactly, across the change of stage too; ``metrics.jsonl`` numbers the steps of
both stages in one sequence (``stage`` and ``stage_step`` say where). ``mae export`` of the checkpoint gives the
tuned encoder with the pooling it was tuned for.

Where this departs from the official code, and why: ``contrastive.positive=view`` (the other view as the
positive) and ``augment=copy`` are additions for copy detection; the heads' BatchNorms are synchronised across
GPUs (as the official ``sync_batchnorm``) but not across CPU processes, which torch cannot do; an EMA of the whole
encoder that the official runs log beside the weights is not kept (the released weights are the trained ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mae import artifact as artifact_lib
from mae.checkpoint import load_checkpoint
from mae.config import Config, ModelConfig, OptimConfig, length_overrides
from mae.dist import Dist, barrier
from mae.errors import UsageError
from training.data import eval_loader, training_data
from training.finetune import init_config, load_encoder
from training.loop import Trainer
from training.nnclr import NeighbourQueue, NNCLRHead, gather, koleo_loss, nnclr_loss
from training.run import resumed_config, run_training
from training.rundir import RunDir
from training.views import TwoViews, describe, indexed, overlay_bank

VIEWS = 2
VAL_IMAGES = 1000  # validation images embedded for the periodic kNN figure and the neighbour sheets
SHEET_QUERIES = 8
SHEET_NEIGHBOURS = 8
KNN_K, KNN_TEMPERATURE = 20, 0.07  # training.evaluate's kNN
STAGES = ("head", "tune")


# ----------------------------------------------------------------------------------------------- config


def contrastive_config(base: Config, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config of a contrastive run: the init's, with its ``run.steps`` cleared (a new run) and ``overrides``.

    The recipe is ``contrastive.*``; ``optim.*`` and ``finetune.*`` describe other stages, so setting ``optim.*``
    here is refused with the field to set instead.
    """
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith("optim."):
            raise UsageError(f"contrastive tuning reads its optimiser from contrastive.*, not {key}: use "
                             "--set contrastive.blr / head_blr / batch_size / weight_decay / betas / warmup")
    return base.replace(run={"steps": None}).override(overrides)


def stage_steps(cfg: Config, steps_per_epoch: int) -> dict[str, int]:
    """Optimiser steps of each stage: ``contrastive.head_epochs`` and ``contrastive.epochs`` epochs, or
    ``run.steps`` in all, shared in the same proportion (at least one tuning step)."""
    c = cfg.contrastive
    if cfg.run.steps is None:
        return {"head": c.head_epochs * steps_per_epoch, "tune": c.epochs * steps_per_epoch}
    total = cfg.run.steps
    if total < 1 + (c.head_epochs > 0):
        raise UsageError(f"run.steps {total} is too few for {'two stages' if c.head_epochs else 'tuning'}")
    head = 0 if c.head_epochs == 0 else min(total - 1, max(1, round(total * c.head_epochs / (c.head_epochs
                                                                                            + c.epochs))))
    return {"head": head, "tune": total - head}


def stage_optim(cfg: Config, stage: str) -> OptimConfig:
    """A stage's optimiser: AdamW at ``contrastive.blr`` (tuning) or ``head_blr`` (heads) x 2 views x batch / 256
    (two views per image make the loss's batch twice the images'); warmup and schedule are the stage's own."""
    c = cfg.contrastive
    return OptimConfig(batch_size=c.batch_size, blr=(c.blr if stage == "tune" else c.head_blr) * VIEWS,
                       weight_decay=c.weight_decay, betas=c.betas, warmup_epochs=0.0, min_lr=0.0)


def frozen_depth(cfg: Config) -> int:
    """Blocks kept frozen while tuning (``contrastive.frozen_blocks``, null = half the depth)."""
    depth = cfg.model.depth
    frozen = depth // 2 if cfg.contrastive.frozen_blocks is None else cfg.contrastive.frozen_blocks
    if frozen > depth:
        raise UsageError(f"contrastive.frozen_blocks {frozen} exceeds the encoder's {depth} blocks")
    return frozen


# ----------------------------------------------------------------------------------------------- model


class ContrastiveViT(VisionTransformer):
    """The encoder (a timm ``VisionTransformer``, so its state dict has timm's and the official MAE's key names)
    with the NNCLR heads attached as ``nnclr``. Blocks below ``frozen`` (and, with block 0, the stem) run without
    autograd: their parameters neither require nor receive a gradient."""

    def __init__(self, model_cfg: ModelConfig, pooling: str, proj_hidden: int, pred_hidden: int, out: int):
        kwargs = artifact_lib.vit_kwargs(dataclasses.asdict(model_cfg), pooling, False, 0)
        kwargs["img_size"] = tuple(kwargs["img_size"])
        super().__init__(**kwargs, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.nnclr = NNCLRHead(self.embed_dim, proj_hidden, pred_hidden, out)
        self.frozen = len(self.blocks)  # set by freeze()
        self.use_target = False

    def freeze(self, frozen: int | None) -> None:
        """``None``: the whole encoder frozen (stage 1); ``k``: blocks ``< k`` (and the stem when k > 0) frozen."""
        depth = len(self.blocks)
        self.frozen = depth if frozen is None else frozen
        encoder_trains = frozen is not None
        for name, p in self.named_parameters():
            if name.startswith("nnclr."):
                p.requires_grad_(not name.startswith("nnclr.target."))
            elif name.startswith("blocks."):
                p.requires_grad_(encoder_trains and int(name.split(".")[1]) >= self.frozen)
            elif name == "pos_embed":
                p.requires_grad_(False)  # MAE's position embeddings are fixed sin-cos
            elif name.startswith(("norm.", "fc_norm.")):
                p.requires_grad_(encoder_trains)
            else:  # stem: patch_embed, cls_token (the official freezer freezes it with block 0)
                p.requires_grad_(encoder_trains and self.frozen == 0)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> the pooled feature (N, D) the artifact embeds (before L2 normalisation)."""
        frozen_all = self.frozen >= len(self.blocks) and not self.norm.weight.requires_grad
        with torch.no_grad() if frozen_all or self.frozen > 0 else contextlib.nullcontext():
            x = self.patch_embed(x)
            x = self._pos_embed(x)
            x = self.patch_drop(x)
            x = self.norm_pre(x)
            for block in self.blocks[: self.frozen]:
                x = block(x)
        upper = self.blocks[self.frozen :]
        with torch.no_grad() if frozen_all else contextlib.nullcontext():
            if self.grad_checkpointing and torch.is_grad_enabled() and len(upper):
                from timm.models import checkpoint_seq

                x = checkpoint_seq(list(upper), x)
            else:
                for block in upper:
                    x = block(x)
            x = self.norm(x)
            return self.forward_head(x, pre_logits=True)

    def forward(self, x: torch.Tensor, embed: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor:
        """Training: views (N, 2, C, H, W) -> (predictions (2, N, P), queue projections (2, N, P), pooled
        features (2, N, D), the embedding before its L2 normalisation).
        ``embed=True``: images (N, C, H, W) -> L2-normalised embeddings (N, D), the artifact's (evaluation goes
        through ``forward`` so that FSDP gathers the parameters)."""
        if embed:
            return F.normalize(self.pooled(x).float(), dim=-1)
        n = x.shape[0]
        both = x.transpose(0, 1).reshape(VIEWS * n, *x.shape[2:])  # (2N, C, H, W), view-major
        pooled = self.pooled(both)  # (2N, D)
        outputs = [self.nnclr(v, self.use_target) for v in pooled.split(n)]  # per view: its own BN statistics
        return (torch.stack([o[0] for o in outputs]), torch.stack([o[1] for o in outputs]),
                pooled.view(VIEWS, n, -1))


def build_model(cfg: Config, state: dict[str, torch.Tensor], source_grid: tuple[int, int] | None) -> ContrastiveViT:
    """The encoder of ``state`` (an MAE, official or finetuned weights; decoder and classifier dropped, position
    embeddings resampled as ``mae finetune`` does) with freshly initialised heads (torch's default init, as the
    official heads)."""
    c = cfg.contrastive
    torch.manual_seed(cfg.run.seed)  # the heads' init, the same on every rank
    model = ContrastiveViT(cfg.model, c.pooling, c.proj_hidden_dim, c.pred_hidden_dim, c.output_dim)
    plain = artifact_lib.build_vit(artifact_lib.vit_kwargs(dataclasses.asdict(cfg.model), c.pooling, False, 0))
    load_encoder(plain, state, source_grid)
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("nnclr.") for k in result.missing_keys), result
    return model


# ----------------------------------------------------------------------------------------------- training


class StageRun(RunDir):
    """The run folder as one stage sees it: metrics rows get the stage and a step counted across both stages
    (``offset``: the steps of the stages before this one)."""

    def __init__(self, path: str | Path, dist: Dist, stage: str):
        super().__init__(path, dist)
        self.stage, self.offset = stage, 0

    def log(self, row: dict[str, Any]) -> None:
        super().log({**row, "step": self.offset + row["step"], "stage": self.stage, "stage_step": row["step"]})

    def truncate_metrics(self, after_step: int) -> None:
        super().truncate_metrics(self.offset + after_step)


class ContrastiveTrainer(Trainer):
    """One stage of contrastive tuning (``stage`` "head" or "tune") over the two-view training set.

    ``model`` holds what the stage starts from: the init's encoder with fresh heads, or stage 1's final weights;
    ``queue``: stage 1's final queue (None: a fresh one). ``resume()`` replaces both with the checkpoint's.
    """

    def __init__(self, cfg: Config, run: StageRun, dist: Dist, train_set: Any, val_set: Any, stage: str,
                 model: ContrastiveViT, queue: dict[str, Any] | None, labelled: bool):
        c = cfg.contrastive
        if cfg.data.decode == "gpu":
            raise UsageError("data.decode=gpu is not used by contrastive tuning (each image's two views are cut and "
                             "edited in the workers); set data.decode=cpu")
        self.stage = stage
        self.tuning = stage == "tune"
        self.labelled = labelled
        self.val_set = val_set
        model.freeze(frozen_depth(cfg) if self.tuning else None)
        model.use_target = self.tuning
        if self.tuning:
            model.nnclr.copy_to_target()  # the official stage 3 starts its target projector from stage 2's
        if dist.device.type == "cuda" and dist.enabled:  # the official sync_batchnorm (torch has none on CPU)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optim = stage_optim(cfg, stage)
        groups = parameter_groups(model, c.weight_decay, c.head_weight_decay, c.layer_decay,
                                  c.head_blr * VIEWS / optim.blr)
        super().__init__(cfg, run, dist, model, train_set, optimizer_groups=groups, optim=optim, epochs=1,
                         normalize=train_set.transform.normalizer())
        self.stage_steps = stage_steps(cfg, self.steps_per_epoch)
        self.total_steps = self.stage_steps[stage]
        self.warmup_steps = min(round(c.warmup * self.total_steps), self.total_steps)
        run.offset = self.stage_steps["head"] if self.tuning else 0
        self.log_name = f"contrastive {'tuning' if self.tuning else 'heads'}"
        if c.queue_size < self.effective_batch:
            raise UsageError(f"contrastive.queue_size {c.queue_size} is smaller than one global batch "
                             f"({self.effective_batch} images): raise it")
        self.queue = NeighbourQueue(c.queue_size, c.output_dim, dist.device, cfg.run.seed)
        if queue is not None:
            self.queue.load(queue)
        self.topk = c.topk if self.tuning else 1
        self.target_updated_at = -1
        self.val_figures: dict[str, float] = {}

    @property
    def net(self) -> ContrastiveViT:
        return self.model  # type: ignore[return-value]

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        c = self.cfg.contrastive
        if self.tuning and self.step > 0 and self.target_updated_at != self.step:
            # the EMA after each optimiser step (official after_update_step), done before the next step's forward
            self.net.nnclr.update_target(c.target_momentum)
            self.target_updated_at = self.step
        y, ids = (labels[:, 0], labels[:, 1]) if labels.ndim == 2 else (labels, torch.full_like(labels, -1))
        predicted, projected, pooled = model(images)  # (2, N, P), (2, N, P), (2, N, D)
        with torch.autocast(self.dist.device.type, enabled=False):  # the lookup and the loss in fp32
            z = F.normalize(projected.float(), dim=-1)
            if c.positive == "neighbour":
                idx0, positive0 = self.queue.nearest(z[0], ids, self.topk)
                _, positive1 = self.queue.nearest(z[1], ids, self.topk)
            else:  # the other view itself (SimCLR / SSCD), still with the predictor
                idx0, positive0, positive1 = None, z[0], z[1]
            loss = (nnclr_loss(predicted[0], positive1, c.temperature, self.dist)
                    + nnclr_loss(predicted[1], positive0, c.temperature, self.dist)) / 2
            metrics: dict[str, float] = {}
            if c.koleo and pooled.requires_grad:  # the head stage's encoder is frozen: nothing to spread
                spread = (koleo_loss(pooled[0].float()) + koleo_loss(pooled[1].float())) / 2
                loss = loss + c.koleo * spread
                metrics["koleo"] = float(spread.detach())
        if self.labelled and idx0 is not None:
            metrics["nn_accuracy"] = float((self.queue.labels[idx0] == y).float().mean())
        all_z, _ = gather(z[0], self.dist)
        all_y, _ = gather(y, self.dist)
        all_ids, _ = gather(ids, self.dist)
        self.queue.push(all_z, all_y, all_ids)
        return loss, metrics

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"task": "contrastive", "stage": self.stage, "pooling": self.cfg.contrastive.pooling,
                "augment": self.cfg.contrastive.augment, "queue": self.queue.state(), **self.val_figures}

    def restore_extra(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("task") != "contrastive" or ckpt.get("stage") != self.stage:
            raise UsageError(f"{self.run.checkpoint} is not a checkpoint of this contrastive stage "
                             f"({ckpt.get('task')} / {ckpt.get('stage')})")
        self.queue.load(ckpt["queue"])

    def periodic(self, step: int, final: bool) -> dict[str, float]:
        """kNN top-1 among the validation images (each against the others; labelled data only)."""
        if not self.labelled or not (self.dist.is_main or self.fsdp):  # a sharded model's forward needs every rank
            return {}
        embedded, labels = embed_images(self.model, self.val_images(), self.dist.device, self.autocast)
        self.val_figures = {"val_knn_top1": leave_one_out_knn(embedded, labels)}
        return self.val_figures if self.dist.is_main else {}

    def val_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation images (at most ``VAL_IMAGES``), normalised, on the CPU, with their labels."""
        if not hasattr(self, "_val_cache"):
            self._val_cache = val_tensors(self.val_set, self.normalize)
        return self._val_cache


def parameter_groups(model: nn.Module, weight_decay: float, head_weight_decay: float, layer_decay: float,
                     head_scale: float) -> list[dict[str, Any]]:
    """AdamW groups of what trains: encoder parameters with the official layer-wise lr decay (stem at
    decay ** (D + 1), block i at decay ** (D - i), the final norm at 1; the official ``LayerwiseLrDecayModifier``)
    and weight decay except on biases, norms and tokens; the heads at ``head_scale`` x lr with their own decay."""
    depth = len(model.blocks)
    skip = set(model.no_weight_decay())
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        if name.startswith("nnclr."):
            key = (head_scale, 0.0 if no_decay else head_weight_decay)
        else:
            if name.startswith("blocks."):
                scale = layer_decay ** (depth - int(name.split(".")[1]))
            elif name.startswith(("norm.", "fc_norm.")):
                scale = 1.0
            else:
                scale = layer_decay ** (depth + 1)
            key = (scale, 0.0 if no_decay else weight_decay)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr_scale": scale, "weight_decay": wd} for (scale, wd), ps in groups.items()]


# ----------------------------------------------------------------------------------------------- evaluation


def val_tensors(val_set: Any, normalize: Any, limit: int = VAL_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``limit`` validation images as one normalised batch (N, C, H, W) on the CPU, and their labels (N,)."""
    images, labels, count = [], [], 0
    for batch, y, _ in eval_loader(val_set, 256, 0):
        if len(batch) == 0:
            continue
        images.append(normalize(batch, "cpu"))
        labels.append(y)
        count += len(y)
        if count >= limit:
            break
    if not images:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]


@torch.no_grad()
def embed_images(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                 autocast: Any = contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised embeddings (N, D) on the CPU, labels (N,)) of a ``val_tensors`` batch."""
    images, labels = batch
    was_training = model.training
    model.eval()
    try:
        out = []
        for chunk in images.split(256):
            with autocast():
                out.append(model(chunk.to(device), embed=True).float().cpu())
    finally:
        model.train(was_training)
    return (torch.cat(out) if out else torch.zeros(0, 1)), labels


def leave_one_out_knn(embedded: torch.Tensor, labels: torch.Tensor, k: int = KNN_K,
                      temperature: float = KNN_TEMPERATURE) -> float:
    """Weighted kNN top-1 (``training.evaluate``'s k and temperature) of each image against all the others."""
    n = len(labels)
    if n < 2:
        return float("nan")
    sim = embedded @ embedded.T
    sim.fill_diagonal_(-float("inf"))
    top, idx = sim.topk(min(k, n - 1), dim=1)
    classes = int(labels.max()) + 1
    votes = torch.zeros(n, classes).scatter_add_(1, labels[idx], (top / temperature).exp())
    return float((votes.argmax(1) == labels).float().mean())


def neighbour_sheet(images: torch.Tensor, rows: list[tuple[str, torch.Tensor]], mean: tuple[float, ...],
                    std: tuple[float, ...], path: Path, queries: int = SHEET_QUERIES,
                    neighbours: int = SHEET_NEIGHBOURS) -> Path:
    """A contact sheet: for a few validation images, their nearest other validation images under each embedding
    (one row per query and embedding, e.g. before and after tuning)."""
    from PIL import Image, ImageDraw

    from mae.visualize import denormalize, thumbnail

    picks = np.linspace(0, len(images) - 1, min(queries, len(images))).round().astype(int)
    pixels = denormalize(images.float(), mean, std)  # (N, C, H, W) in [0, 1]
    cell, label_w, pad = 64, 70, 4
    lines = []
    for q in picks:
        for name, emb in rows:
            sim = emb @ emb[q]
            sim[q] = -float("inf")
            nearest = sim.topk(min(neighbours, len(sim) - 1)).indices.tolist()
            lines.append((name, [int(q)] + nearest))
    width = label_w + (neighbours + 1) * (cell + pad) + pad
    sheet = Image.new("RGB", (width, len(lines) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, idx) in enumerate(lines):
        y = pad + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), name, fill="black")
        for col, i in enumerate(idx):
            arr = (pixels[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = thumbnail(arr[..., 0] if arr.shape[2] == 1 else arr[..., :3], cell)
            x = label_w + col * (cell + pad) + (pad if col else 0)
            sheet.paste(tile, (x, y))
        draw.line([(label_w + cell + pad, y), (label_w + cell + pad, y + cell)], fill="red", width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# ----------------------------------------------------------------------------------------------- the run


class ContrastiveRun:
    """Both stages of one contrastive run, as ``training.run.run_training`` drives a trainer.

    ``fit`` trains the heads, then the upper blocks: each stage is a ``ContrastiveTrainer`` that starts from the
    checkpoint the stage before it left (weights and queue), so a run killed anywhere and resumed computes what it
    would have straight through. ``step``, ``total_steps`` and the metrics count both stages in one sequence.
    """

    def __init__(self, cfg: Config, run: RunDir, dist: Dist, data: str | Any, init_state: dict[str, torch.Tensor],
                 source_grid: tuple[int, int] | None):
        cfg.contrastive.validate()
        self.cfg, self.run, self.dist = cfg, run, dist
        self.init_state, self.source_grid = init_state, source_grid
        c = cfg.contrastive
        transform = TwoViews(cfg)
        self.sets = training_data(data, cfg, dist, transform, c.batch_size, val_limit=VAL_IMAGES, val_fallback=64)
        self.train = indexed(self.sets.train, transform, cfg.run.seed)
        if c.augment == "copy":
            transform.set_overlays(overlay_bank(self.sets.train, cfg))
        self.trainer: ContrastiveTrainer = self._stage("head", None)
        self.stage_steps = self.trainer.stage_steps
        self.total_steps = sum(self.stage_steps.values())
        self.steps_per_epoch, self.effective_batch = self.trainer.steps_per_epoch, self.trainer.effective_batch
        self.tuned_state: dict[str, torch.Tensor] | None = None

    def _stage(self, stage: str, handed_on: dict[str, Any] | None) -> ContrastiveTrainer:
        """The trainer of ``stage``: from the init's encoder with fresh heads, or from ``handed_on`` (the
        checkpoint the heads stage left: its weights, queue and count of skipped images)."""
        model = build_model(self.cfg, self.init_state, self.source_grid)
        if handed_on is not None:
            model.load_state_dict(handed_on["model"])
        trainer = ContrastiveTrainer(self.cfg, StageRun(self.run.path, self.dist, stage), self.dist, self.train,
                                     self.sets.val, stage, model, handed_on and handed_on["queue"],
                                     self.sets.labelled)
        if handed_on is not None:
            trainer.skipped_images = int(handed_on.get("skipped_images", 0))
        return trainer

    @property
    def step(self) -> int:
        return self.trainer.run.offset + self.trainer.step

    @property
    def skipped_images(self) -> int:
        return self.trainer.skipped_images

    @property
    def base_lr(self) -> float:
        return self.trainer.base_lr

    def resume(self) -> None:
        """Continue the checkpoint in the run folder, in the stage it was saved in."""
        saved = load_checkpoint(self.run.checkpoint, map_location="cpu")
        if saved.get("task") != "contrastive" or saved.get("stage") not in STAGES:
            raise UsageError(f"{self.run.checkpoint} is a {saved.get('task', 'pretraining')} run, not a contrastive "
                             "one; choose another --out")
        if saved["stage"] != self.trainer.stage:
            self.trainer = self._stage(saved["stage"], None)
        self.trainer.resume()

    def fit(self) -> dict[str, Any]:
        """Train what is left of both stages; returns the last logged metrics."""
        last: dict[str, Any] = {}
        while True:
            if self.trainer.total_steps > 0:  # contrastive.head_epochs=0: the heads start untrained
                last = self.trainer.fit()
                barrier(self.dist)
                handed_on = load_checkpoint(self.run.checkpoint, map_location="cpu")  # every rank: the next start
            else:
                handed_on = None
            if self.trainer.stage == STAGES[-1]:
                self.tuned_state = handed_on["model"]
                return last
            following = STAGES[STAGES.index(self.trainer.stage) + 1]
            self.trainer = None  # type: ignore[assignment]  # its wrapped model goes before the next is built
            self.trainer = self._stage(following, handed_on)

    def run_record(self) -> dict[str, Any]:
        c = self.cfg.contrastive
        return {"augment": describe(c.augment), "frozen_blocks": frozen_depth(self.cfg),
                "stage_steps": self.stage_steps,
                "stage_lr": {s: stage_optim(self.cfg, s).effective_lr(self.effective_batch) for s in STAGES}}

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        """Where each stage stands and, on rank 0, the untuned and tuned encoders side by side (kNN among the
        validation images, the neighbour sheet)."""
        c = self.cfg.contrastive
        out = {"stage_steps": self.stage_steps, "augment": c.augment, "pooling": c.pooling,
               "nn_accuracy": last.get("nn_accuracy"), "val_knn_top1": last.get("val_knn_top1")}
        if self.dist.is_main and self.tuned_state is not None:
            out.update(before_and_after(self.cfg, self.init_state, self.source_grid, self.tuned_state, self.sets.val,
                                        self.run.path, self.sets.labelled, self.dist.device))
        return out


def tune(cfg: Config, init_checkpoint: str | Path, out: str | Path, data: str | Any, resume: bool = False,
         loaded: tuple[Config, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Contrastive tuning of ``init_checkpoint``'s encoder into the run folder ``out``, both stages; returns the
    run's summary (paths, steps, kNN among the validation images before and after, time).

    ``cfg``: the init's config with the run's overrides (``contrastive_config``); ``data``: a ``--data`` spec or a
    source opened by ``mae.sources.open_data``; ``loaded``: ``init_config(init_checkpoint)`` when the caller has it.
    """
    init_cfg, init_state = loaded or init_config(init_checkpoint)
    grid = init_cfg.model.grid_size
    return run_training(out, lambda run, dist: ContrastiveRun(cfg, run, dist, data, init_state, grid),
                        resume=resume, record={"task": "contrastive", "init": str(init_checkpoint),
                                               "data_source": str(data)})


def before_and_after(cfg: Config, init_state: dict[str, torch.Tensor], source_grid: tuple[int, int] | None,
                     tuned_state: dict[str, torch.Tensor], val_set: Any, folder: Path, labelled: bool,
                     device: torch.device) -> dict[str, Any]:
    """The untuned and the tuned encoder side by side on the validation images: kNN among them (labelled data)
    and the contact sheet ``neighbours.png`` of a few images' nearest neighbours under each."""
    untuned = build_model(cfg, init_state, source_grid).to(device)
    tuned = build_model(cfg, init_state, source_grid).to(device)
    tuned.load_state_dict(tuned_state)
    mean, std = cfg.data.channel_stats(cfg.model.in_chans)
    normalize = TwoViews(cfg).normalizer()
    batch = val_tensors(val_set, normalize)
    if len(batch[1]) < 2:
        return {}
    before, labels = embed_images(untuned, batch, device)
    after, _ = embed_images(tuned, batch, device)
    out: dict[str, Any] = {"neighbours": str(neighbour_sheet(batch[0], [("before", before), ("after", after)],
                                                             mean, std, folder / "neighbours.png"))}
    if labelled:
        out["val_knn_top1_before"] = leave_one_out_knn(before, labels)
        out["val_knn_top1_after"] = leave_one_out_knn(after, labels)
    return out



# ``--augment copy`` tunes for finding copies: besides the copy edits, each view is pulled towards the other view
# of its own image (SSCD's instance discrimination: a neighbour's positive would pull distinct look-alikes
# together), with crops that keep most of the picture, as copies do (digits, bench/retrieval.py --duplicates, 2 + 8
# epochs: micro-AP 0.659 with the colour recipe, 0.661 copy views from crops of 35-100%, 0.772 with these; 0.961
# at 2 + 64 epochs of batch 512, docs/benchmarks.md).
COPY_RECIPE = ("contrastive.positive=view", "contrastive.crop_scale=0.7,1")


def main(args) -> dict[str, Any]:
    """``mae finetune --contrastive --init C --data D --out RUN [--augment crop|colour|copy] [--epochs N]
    [--batch-size B] [--resume] [--set contrastive.k=v]``; ``--set`` has the last word over ``--augment``'s."""
    sets = length_overrides(args.epochs, None, args.batch_size, prefix="contrastive.")
    sets += [f"contrastive.augment={args.augment}"] if args.augment else []
    sets += list(COPY_RECIPE) if args.augment == "copy" else []
    sets += list(args.overrides)
    loaded = init_config(args.init)
    cfg = resumed_config(args.out, contrastive_config(loaded[0], sets), resume=args.resume, asked=bool(sets))
    s = tune(cfg, args.init, args.out, args.data, resume=args.resume, loaded=loaded)
    knn = (f": val kNN top-1 {s['val_knn_top1_before']:.4f} -> {s['val_knn_top1_after']:.4f} (untuned -> tuned)"
           if "val_knn_top1_after" in s else "")
    s["text"] = (
        f"contrastive tuning ({s['augment']} views, {s['pooling']} pooling): {s['steps']} steps "
        f"({s['stage_steps']['head']} heads + {s['stage_steps']['tune']} tuning) in {s['seconds']} s on "
        f"{s['device']} (x{s['world_size']}){knn}\n"
        f"  checkpoint      {s['checkpoint']}\n  metrics         {Path(s['run']) / 'metrics.jsonl'}\n"
        f"  loss curve      {s.get('loss_curve')}\n  neighbours      {s.get('neighbours')} (before / after, "
        f"per query)\n  export with     mae export --checkpoint {s['checkpoint']} --out ARTIFACT"
    )
    return s
