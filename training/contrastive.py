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
import copy
import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mae import artifact as artifact_lib
from mae.checkpoint import load_checkpoint
from mae.config import Config, ModelConfig, OptimConfig
from mae.dist import barrier
from mae.errors import UsageError
from mae.files import write_json_atomic
from training.finetune import init_config, load_encoder
from training.loop import Dist, RunDir, Trainer, eval_loader, init_distributed, shutdown_distributed, training_data
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


def frozen_depth(cfg: Config) -> int:
    """Blocks kept frozen while tuning (``contrastive.frozen_blocks``, null = half the depth)."""
    depth = cfg.model.depth
    frozen = depth // 2 if cfg.contrastive.frozen_blocks is None else cfg.contrastive.frozen_blocks
    if frozen > depth:
        raise UsageError(f"contrastive.frozen_blocks {frozen} exceeds the encoder's {depth} blocks")
    return frozen


# ----------------------------------------------------------------------------------------------- model


def projector(dim: int, hidden: int, out: int) -> nn.Sequential:
    """NNCLR's projector (the official ``create_projector``): 3 Linear layers, BN after each, ReLU between."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out))


def predictor(dim: int, hidden: int) -> nn.Sequential:
    """NNCLR's predictor (the official ``create_predictor``): Linear-BN-ReLU, Linear."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, dim, bias=False))


class NNCLRHead(nn.Module):
    """Projector, predictor and the EMA target projector (no gradient; it fills and searches the queue)."""

    def __init__(self, dim: int, proj_hidden: int, pred_hidden: int, out: int):
        super().__init__()
        self.projector = projector(dim, proj_hidden, out)
        self.predictor = predictor(out, pred_hidden)
        self.target = copy.deepcopy(self.projector)
        self.target.requires_grad_(False)

    def forward(self, pooled: torch.Tensor, use_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled (N, D) -> (prediction (N, P), the projection the queue sees (N, P), without gradient)."""
        projected = self.projector(pooled)
        predicted = self.predictor(projected)
        if not use_target:  # stage 1 (the official NnclrHead): the projector's own output
            return predicted, projected.detach()
        with torch.no_grad():
            return predicted, self.target(pooled)

    @torch.no_grad()
    def copy_to_target(self) -> None:
        """target <- projector (the official stage-3 start: its target projector is loaded from stage 2's)."""
        for t, o in zip(self.target.parameters(), self.projector.parameters()):
            t.copy_(o)
        for t, o in zip(self.target.buffers(), self.projector.buffers()):
            t.copy_(o)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum x target + (1 - momentum) x projector; buffers copied (the official ``update_ema``)."""
        for t, o in zip(self.target.parameters(), self.projector.parameters()):
            t.mul_(momentum).add_(o, alpha=1.0 - momentum)
        for t, o in zip(self.target.buffers(), self.projector.buffers()):
            t.copy_(o)


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

    def forward(self, x: torch.Tensor, embed: bool = False) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Training: views (N, 2, C, H, W) -> (predictions (2, N, P), queue projections (2, N, P)).
        ``embed=True``: images (N, C, H, W) -> L2-normalised embeddings (N, D), the artifact's (evaluation goes
        through ``forward`` so that FSDP gathers the parameters)."""
        if embed:
            return F.normalize(self.pooled(x).float(), dim=-1)
        n = x.shape[0]
        both = x.transpose(0, 1).reshape(VIEWS * n, *x.shape[2:])  # (2N, C, H, W), view-major
        pooled = self.pooled(both)  # (2N, D)
        outputs = [self.nnclr(v, self.use_target) for v in pooled.split(n)]  # per view: its own BN statistics
        return torch.stack([o[0] for o in outputs]), torch.stack([o[1] for o in outputs])


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


# ----------------------------------------------------------------------------------------------- the queue


class NeighbourQueue:
    """The support set: ``size`` L2-normalised projections with the label and sample index each came from.

    Starts as random unit vectors (index -1), as the official head's buffer; every rank pushes the whole gathered
    batch, so every rank holds the same queue. Its state travels in the checkpoint (``state``/``load``).
    """

    def __init__(self, size: int, dim: int, device: torch.device, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.vectors = F.normalize(torch.randn(size, dim, generator=gen), dim=1).to(device)
        self.labels = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.ids = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.ptr = 0

    @property
    def size(self) -> int:
        return len(self.vectors)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor, ids: torch.Tensor, topk: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """z (N, P) normalised -> (queue index (N,), that projection (N, P)): the nearest entry that is not the
        image itself, or one drawn uniformly from the ``topk`` nearest (``torch``'s generator, reseeded per step)."""
        sim = z @ self.vectors.T  # (N, Q)
        sim[(self.ids[None, :] == ids[:, None]) & (ids[:, None] >= 0)] = -1.0
        if topk <= 1:
            idx = sim.argmax(dim=1)
        else:
            candidates = sim.topk(min(topk, self.size), dim=1).indices  # (N, k)
            pick = torch.randint(candidates.shape[1], (len(z),), device=z.device)
            idx = candidates[torch.arange(len(z), device=z.device), pick]
        return idx, self.vectors[idx]

    @torch.no_grad()
    def push(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Replace the oldest entries with a batch (wrapping around; any batch size)."""
        n = min(len(z), self.size)
        at = (self.ptr + torch.arange(n, device=z.device)) % self.size
        self.vectors[at] = z[-n:].to(self.vectors.dtype)
        self.labels[at] = labels[-n:]
        self.ids[at] = ids[-n:]
        self.ptr = int((self.ptr + n) % self.size)

    def state(self) -> dict[str, Any]:
        return {"vectors": self.vectors.cpu(), "labels": self.labels.cpu(), "ids": self.ids.cpu(), "ptr": self.ptr}

    def load(self, state: dict[str, Any]) -> None:
        if tuple(state["vectors"].shape) != tuple(self.vectors.shape):
            raise UsageError(f"the checkpoint's queue holds {tuple(state['vectors'].shape)} projections, this run "
                             f"expects {tuple(self.vectors.shape)} (contrastive.queue_size x output_dim)")
        device = self.vectors.device
        self.vectors = state["vectors"].to(device, torch.float32)
        self.labels, self.ids = state["labels"].to(device), state["ids"].to(device)
        self.ptr = int(state["ptr"])


# ----------------------------------------------------------------------------------------------- across ranks


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (solo-learn's, as the official
    ``AllGatherGradAutograd``); works on gloo, which has no reduce_scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.zeros_like(x) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        torch_dist.all_reduce(stacked)
        return stacked[torch_dist.get_rank()]


def gather(x: torch.Tensor, dist: Dist, grad: bool = False) -> tuple[torch.Tensor, int]:
    """Every rank's rows of ``x`` in rank order, and where this rank's start. Batches may differ in size (an
    unreadable image is skipped on one rank), so rows are padded for the collective and the padding dropped."""
    if not dist.enabled:
        return x, 0
    sizes = torch.tensor([len(x)], device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(dist.world)]
    torch_dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    pad = max(counts) - len(x)
    padded = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
    if grad:
        parts = _GatherWithGrad.apply(padded)
    else:
        parts = [torch.zeros_like(padded) for _ in range(dist.world)]
        torch_dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), sum(counts[: dist.rank])


def nnclr_loss(predicted: torch.Tensor, positive: torch.Tensor, temperature: float, dist: Dist) -> torch.Tensor:
    """InfoNCE of the official ``nnclr_loss_fn``: each row's positive (N, P) against the normalised predictions of
    the whole batch (all ranks, with gradient); the matching prediction is the target class."""
    p = F.normalize(predicted.float(), dim=-1)
    everyone, start = gather(p, dist, grad=True)
    logits = positive.float() @ everyone.T / temperature  # (N, N_all)
    target = torch.arange(start, start + len(p), device=p.device)
    return F.cross_entropy(logits, target)


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
        base = c.blr if self.tuning else c.head_blr
        optim = OptimConfig(batch_size=c.batch_size, blr=base * VIEWS, weight_decay=c.weight_decay, betas=c.betas,
                            warmup_epochs=0.0, min_lr=0.0)
        groups = parameter_groups(model, c.weight_decay, c.head_weight_decay, c.layer_decay, c.head_blr / base)
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
        predicted, projected = model(images)  # (2, N, P) each
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
        embedded, labels = embed_images(self.model, self.val_images(), self.dist.device, self._autocast)
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

    from mae.data import denormalize
    from mae.visualize import thumbnail

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


def tune(cfg: Config, init_checkpoint: str | Path, out: str | Path, data: str | Any, resume: bool = False
         ) -> dict[str, Any]:
    """Contrastive tuning of ``init_checkpoint``'s encoder into the run folder ``out``, both stages; returns a
    summary (paths, steps, kNN among the validation images before and after, time).

    ``cfg``: the init's config with the run's overrides (``contrastive_config``); ``data``: a ``--data`` spec or a
    loaded ``mae.data.Source``. Each stage starts from the checkpoint file (stage 1's last, or the one resumed),
    so a run killed anywhere and resumed computes what it would have straight through.
    """
    cfg.contrastive.validate()
    dist = init_distributed()
    trainer = None
    try:
        run = RunDir(out, dist)
        if run.checkpoint.exists() and not resume:
            raise FileExistsError(f"{run.checkpoint} exists: pass --resume to continue that run, "
                                  "or choose another --out")
        init_cfg, init_state = init_config(init_checkpoint)
        source_grid = init_cfg.model.grid_size
        c = cfg.contrastive
        transform = TwoViews(cfg)
        sets = training_data(data, cfg, dist, transform, c.batch_size, val_limit=VAL_IMAGES, val_fallback=64)
        train = indexed(sets.train, transform, cfg.run.seed)
        if c.augment == "copy":
            transform.set_overlays(overlay_bank(sets.train, cfg))
        saved = load_checkpoint(run.checkpoint, map_location="cpu") if resume and run.checkpoint.exists() else None
        if saved is not None and (saved.get("task") != "contrastive" or saved.get("stage") not in STAGES):
            raise UsageError(f"{run.checkpoint} is a {saved.get('task', 'pretraining')} run, not a contrastive one; "
                             "choose another --out")
        resumed_from = None if saved is None else {"stage": saved["stage"], "step": int(saved["step"])}
        run.write_config(cfg, {"task": "contrastive", "init": str(init_checkpoint), "data_source": str(data),
                               "world_size": dist.world, "augment": describe(c.augment),
                               "frozen_blocks": frozen_depth(cfg)})
        started = time.perf_counter()
        last: dict[str, Any] = {}
        summary: dict[str, Any] = {}
        for stage in STAGES:
            if saved is not None and STAGES.index(saved["stage"]) > STAGES.index(stage):
                continue  # resumed past this stage
            model = build_model(cfg, init_state, source_grid)
            handed_on = saved is not None and saved["stage"] != stage  # stage 1 finished: its weights and queue
            if handed_on:
                model.load_state_dict(saved["model"])
            trainer = ContrastiveTrainer(cfg, StageRun(out, dist, stage), dist, train, sets.val, stage, model,
                                         saved["queue"] if handed_on else None, sets.labelled)
            summary.update(stage_steps=trainer.stage_steps, effective_batch=trainer.effective_batch,
                           steps_per_epoch=trainer.steps_per_epoch)
            if trainer.total_steps == 0:  # contrastive.head_epochs=0: the heads start untrained
                trainer = None
                continue
            if saved is not None and not handed_on:
                trainer.resume()
            last = trainer.fit()
            summary["skipped_images"] = summary.get("skipped_images", 0) + trainer.skipped_images
            trainer = None
            barrier(dist)
            saved = load_checkpoint(run.checkpoint, map_location="cpu")  # every rank: where the next stage starts
        seconds = time.perf_counter() - started
        summary.update({
            "task": "contrastive", "run": str(run.path), "checkpoint": str(run.checkpoint),
            "init": str(init_checkpoint), "augment": c.augment, "pooling": c.pooling,
            "steps": sum(summary["stage_steps"].values()), "resumed_from": resumed_from,
            "loss": last.get("loss"), "nn_accuracy": last.get("nn_accuracy"), "val_knn_top1": last.get("val_knn_top1"),
            "seconds": round(seconds, 1), "world_size": dist.world, "rank": dist.rank, "device": str(dist.device),
        })
        if dist.is_main:
            from mae.visualize import loss_curve

            summary.update(before_and_after(cfg, init_state, source_grid, saved["model"], sets.val, run.path,
                                            sets.labelled, dist.device))
            summary["loss_curve"] = str(loss_curve(run.metrics, run.path / "loss_curve.png", ("loss",)))
            write_json_atomic(run.path / "summary.json", summary)
        return summary
    finally:
        trainer = None  # the wrapped model goes before its process group (see shutdown_distributed)
        shutdown_distributed()


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

