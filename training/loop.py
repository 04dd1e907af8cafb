"""The training loop shared by every training stage (pretraining, finetuning, linear probing).

One place for: mixed precision, the per-step lr schedule, gradient accumulation, the non-finite guard,
checkpoint cadence, metrics and the progress bar. A run is reproducible step by step: the data order depends on
(seed, epoch), each sample's augmentation on (seed, epoch, index) and everything random inside a step (masks,
drop path, mixup) on (seed, rank, step), so ``--resume`` continues exactly where the checkpoint left off.

Its data is ``training.data``, its parallelism (DDP, FSDP2) ``training.parallel``, and the run around it (the
folder, config.json, resume, summary.json) ``training.run``.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mae.checkpoint import load_checkpoint, save_checkpoint
from mae.config import Config, OptimConfig
from mae.datasets import SEED_MASK, Normalize, PendingDecode, check_gpu_decode
from mae.dist import Dist, all_reduce_sum
from mae.errors import UsageError, UserError
from mae.hardware import has_native_bf16
from mae.images import ImageError
from training.data import make_loader, samples_per_rank
from training.parallel import full_model_state, full_optimizer_state, load_full_state, parallelize
from training.rundir import RunDir

# ----------------------------------------------------------------------------------------------- optimisation


def seed_step(seed: int, rank: int, step: int) -> None:
    """Reseed every generator a step may use, from (seed, rank, step) alone."""
    s = hash((seed, rank, step)) & SEED_MASK
    torch.manual_seed(s)
    np.random.seed(s % (2**32))
    random.seed(s)


def cosine_lr(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then half-cosine to ``min_lr`` at ``total`` (per step)."""
    if step < warmup:
        return lr * step / warmup
    if total <= warmup:
        return lr
    progress = (step - warmup) / (total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, skip: set[str] | None = None) -> list[dict[str, Any]]:
    """Two AdamW groups (timm's ``param_groups_weight_decay``, as the official code): decayed weights, and
    never-decayed biases, norms and the model's ``no_weight_decay()`` names (tokens, position embeddings)."""
    from timm.optim import param_groups_weight_decay

    skip = set(skip if skip is not None else getattr(model, "no_weight_decay", lambda: set())())
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``run.amp``: auto = bf16 on CUDA and on CPUs with native bf16 matmuls (AVX512-BF16,
    AMX: several times faster GEMMs; autocast keeps norms, softmax statistics and the loss in fp32), else fp32
    (elsewhere bf16 is emulated, which is slower)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" or has_native_bf16() else None
    if amp not in AMP_DTYPES:
        raise UsageError(f"run.amp must be one of auto, {', '.join(AMP_DTYPES)}; got {amp!r}")
    return AMP_DTYPES[amp]


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


class NonFiniteLossError(UserError, RuntimeError):
    """Raised when the loss becomes NaN or infinite; the last good checkpoint is left untouched."""


# ----------------------------------------------------------------------------------------------- the loop


class Trainer:
    """Steps an optimiser over a loader. Subclasses give the loss and what happens every few steps.

    Subclass hooks: ``loss(model, images, labels) -> (loss, {metric: float})``, ``periodic(step, final)``
    (pictures, evaluation; every ``periodic_every`` steps), ``checkpoint_extra()`` / ``restore_extra(ckpt)`` (more
    primitives to keep in the checkpoint), ``make_optimizer(groups)`` (AdamW unless overridden), and for the run
    around it (``training.run.run_training``) ``run_record()`` (more for config.json) and ``summary(last)`` (the
    stage's figures for summary.json).

    Batches arrive as workers ship them (uint8, or float in [0, 1], or JPEGs for the GPU) and become the model's
    float input inside the step, on the device (``normalize``).
    """

    log_name = "train"

    def __init__(self, cfg: Config, run: RunDir, dist: Dist, model: nn.Module, train_set: Dataset,
                 optimizer_groups: list[dict[str, Any]] | None = None, optim: OptimConfig | None = None,
                 epochs: int | None = None, normalize: Normalize | None = None):
        """``optim`` and ``epochs`` default to ``cfg.optim`` and ``cfg.run.epochs`` (a finetune run passes the
        ones its recipe defines); ``cfg.run.steps``, when set, overrides the length in epochs. ``train_set`` is a
        map-style dataset (``ImageDataset``) or a shard stream (``ShardTrainStream``)."""
        self.cfg = cfg
        self.run = run
        self.dist = dist
        self.optim = o = optim or cfg.optim
        r = cfg.run
        if cfg.data.decode == "gpu":
            check_gpu_decode(dist.device)
        mean, std = cfg.data.channel_stats(cfg.model.in_chans)
        self.normalize = normalize or Normalize(mean, std, tuple(cfg.model.img_size), cfg.data.interpolation)
        self.train_set = train_set
        self.loader, self.sampler = make_loader(train_set, o.batch_size, dist, r.seed, cfg.data.num_workers)
        self._plan(r.epochs if epochs is None else epochs)
        self.amp_dtype = autocast_dtype(r.amp, dist.device)
        self.fsdp = r.fsdp and dist.enabled
        if self.fsdp and self.amp_dtype == torch.float16:
            raise UsageError("run.fsdp with run.amp=fp16 is not supported (the loss scaler does not shard): "
                             "use run.amp=bf16")
        if r.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise UsageError(f"run.grad_checkpointing: {type(model).__name__} has no set_grad_checkpointing()")
            model.set_grad_checkpointing(True)
        self.model = model.to(dist.device)
        self.ddp_model, groups = parallelize(self.model, dist, self.fsdp, optimizer_groups)
        self.optimizer = self.make_optimizer(groups if groups is not None else param_groups(self.model, o.weight_decay))
        self.periodic_every = r.vis_every
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.skipped_images = 0
        self.last_checkpoint_step: int | None = None
        self.forward_model = torch.compile(self.ddp_model) if r.compile else self.ddp_model

    def _plan(self, epochs: int) -> None:
        """The run's length: steps per epoch, total and warmup steps, and the effective batch and its lr."""
        o, dist = self.optim, self.dist
        per_rank = samples_per_rank(self.train_set, self.sampler, dist, self.cfg.data.num_workers)
        self.steps_per_epoch = per_rank // o.batch_size // o.accum_iter
        self.effective_batch = o.batch_size * o.accum_iter * dist.world
        if self.steps_per_epoch < 1:
            raise UsageError(
                f"{len(self.train_set)} training images cannot fill one step of {self.effective_batch} images "
                f"(batch_size {o.batch_size} x accum_iter {o.accum_iter} x {dist.world} processes); "
                "lower --batch-size"
            )
        steps = self.cfg.run.steps
        self.total_steps = steps if steps is not None else epochs * self.steps_per_epoch
        self.warmup_steps = min(round(o.warmup_epochs * self.steps_per_epoch), self.total_steps)
        self.base_lr = o.effective_lr(self.effective_batch)

    # -------------------------------------------------------------- hooks

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """AdamW over the parameter groups (a group's ``lr_scale`` multiplies the scheduled lr each step).

        On CUDA the fused kernel updates every parameter in one launch; the CPU keeps the default (foreach).
        """
        return torch.optim.AdamW(groups, lr=self.base_lr, betas=self.optim.betas,
                                 fused=self.dist.device.type == "cuda")

    def periodic(self, step: int, final: bool) -> dict[str, float]:
        """Called every ``self.periodic_every`` steps (``run.vis_every`` unless a subclass changes it) and at the end;
        returns metrics to log."""
        return {}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {}

    def restore_extra(self, ckpt: dict[str, Any]) -> None:
        pass

    def run_record(self) -> dict[str, Any]:
        """What config.json records about this run beyond its config and the lifecycle's fields."""
        return {}

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        """The stage's figures for summary.json, from ``last`` (the last metrics row logged) and its own state."""
        return {}

    # -------------------------------------------------------------- state

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) model state dict; under FSDP every rank must call it (it gathers the shards)."""
        return full_model_state(self.model, self.fsdp)

    def state(self) -> dict[str, Any]:
        """The checkpoint: full state dicts (a sharded run's too), so one process can open and resume it."""
        optimizer = full_optimizer_state(self.model, self.optimizer, self.fsdp)
        return {
            "model": self.model_state(),
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "config": self.cfg.to_dict(),
            "skipped_images": self.skipped_images,
            **self.checkpoint_extra(),
        }

    def save(self) -> None:
        state = self.state() if self.dist.is_main or self.fsdp else None  # FSDP: every rank gathers
        if self.dist.is_main:
            save_checkpoint(self.run.checkpoint, state)
        self.last_checkpoint_step = self.step

    def resume(self, path: str | Path | None = None) -> None:
        """Restore weights, optimiser, scaler and step from a checkpoint of this run."""
        path = path or self.run.checkpoint
        ckpt = load_checkpoint(path, map_location="cpu" if self.fsdp else self.dist.device)
        saved = Config.from_dict(ckpt["config"])
        if saved != self.cfg:
            diff = saved.differences(self.cfg)
            shown = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
            raise UsageError(f"{path} belongs to a run with another config ({shown}): "
                             "resume it with its own config, or choose another --out")
        load_full_state(self.model, self.optimizer, ckpt, self.fsdp)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.skipped_images = int(ckpt.get("skipped_images", 0))
        self.last_checkpoint_step = self.step
        self.restore_extra(ckpt)
        self.run.truncate_metrics(self.step)

    # -------------------------------------------------------------- loop

    def _batches(self) -> Iterator[tuple[torch.Tensor | PendingDecode, torch.Tensor, int]]:
        """Micro-batches from the current step on, across epoch boundaries, resuming mid-epoch exactly."""
        o = self.optim
        if self.sampler is None:  # a shard stream: endless, positioned by the micro-batches consumed so far
            self.train_set.start_batches = self.step * o.accum_iter
            yield from iter(self.loader)
            return
        step = self.step
        while True:
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            self.sampler.start = in_epoch * o.accum_iter * o.batch_size
            it = iter(self.loader)
            for _ in range((self.steps_per_epoch - in_epoch) * o.accum_iter):
                yield next(it)
            step = (epoch + 1) * self.steps_per_epoch

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision as ``run.amp`` asks, for the step's forward and the stages' evaluation forwards."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    def _no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on micro-steps that only accumulate."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync or not self.dist.enabled else self.ddp_model.no_sync()

    def _periodic(self, step: int, final: bool) -> dict[str, Any]:
        """``periodic``, whose failure (a picture, a validation pass) is reported, never allowed to cost the
        training: the step's metrics and checkpoint are still written."""
        try:
            return self.periodic(step, final)
        except Exception as e:  # noqa: BLE001 (anything: the weights trained so far matter more)
            message = f"{type(e).__name__}: {e}"
            warnings.warn(f"step {step}: evaluation and pictures failed ({message}); training continues",
                          stacklevel=2)
            return {"periodic_error": message}
        finally:
            if self.fsdp:
                self.model.reshard()  # evaluation forwards leave the root unit's parameters gathered

    def fit(self) -> dict[str, Any]:
        """Run to ``total_steps``; returns the last logged metrics."""
        cfg, o = self.cfg, self.optim
        progress = _progress(self.total_steps, self.step, self.dist.is_main, self.log_name)
        batches = self._batches()
        window = _Window()
        last: dict[str, Any] = self.run.last_logged()
        self.model.train()
        try:
            while self.step < self.total_steps:
                lr = cosine_lr(self.step, self.total_steps, self.warmup_steps, self.base_lr, o.min_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                seed_step(cfg.run.seed, self.dist.rank, self.step)
                loss, metrics, images, skipped = self._optimizer_step(batches, lr)
                self.step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                window.add(loss, metrics, images)
                final = self.step == self.total_steps
                row: dict[str, Any] = {}
                if self.step % cfg.run.log_every == 0 or final:
                    row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3), "lr": lr,
                           **window.flush(), "skipped_images": skipped, "time": round(time.time(), 3)}
                if self.step % self.periodic_every == 0 or final:
                    row = {"step": self.step, **row, **self._periodic(self.step, final)}
                if row:
                    self.run.log(row)
                    last = row
                if self.step % cfg.run.ckpt_every == 0 or final:
                    self.save()
        finally:
            progress.close()
        return last

    def _optimizer_step(self, batches: Iterator[tuple[torch.Tensor | PendingDecode, torch.Tensor, int]], lr: float
                        ) -> tuple[float, dict[str, float], int, int]:
        """One optimiser step over ``accum_iter`` micro-batches. Returns (the loss averaged over the processes,
        this process's step metrics, the step's images over every process, images skipped so far over every
        process)."""
        dist, o = self.dist, self.optim
        step_loss, step_metrics, step_images = 0.0, {}, 0
        for micro in range(o.accum_iter):
            images, labels, skipped = next(batches)
            self.skipped_images += skipped
            if len(images) == 0:
                raise ImageError(f"every image of a batch of {skipped} failed to decode at step {self.step}; "
                                 "is the data corrupt? (the warnings above name them)")
            images = self.normalize(images, dist.device)  # (N, C, H, W) float, on the device
            labels = labels.to(dist.device, non_blocking=True)
            with self._no_sync(micro == o.accum_iter - 1):
                with self.autocast():
                    loss, metrics = self.loss(self.forward_model, images, labels)
                self.scaler.scale(loss / o.accum_iter).backward()
            step_loss += loss.item() / o.accum_iter
            step_images += images.shape[0]
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v / o.accum_iter
        total_loss, total_images, total_skipped = all_reduce_sum([step_loss, step_images, self.skipped_images], dist)
        mean_loss = total_loss / dist.world
        if not math.isfinite(mean_loss):
            kept = (f"the last good checkpoint (step {self.last_checkpoint_step}) is kept at "
                    f"{self.run.checkpoint}" if self.last_checkpoint_step is not None
                    else "no checkpoint had been written yet")
            raise NonFiniteLossError(
                f"loss became {mean_loss} at step {self.step} (lr {lr:.3g}); stopping: {kept}. "
                "Try a lower optim.blr, optim.clip_grad=1.0 or run.amp=bf16 instead of fp16."
            )
        if o.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, step_metrics, int(total_images), int(total_skipped)


class _Window:
    """The steps since the last metrics row: their summed loss and metrics, their images and when they began."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.images = 0
        self.started = time.perf_counter()

    def add(self, loss: float, metrics: dict[str, float], images: int) -> None:
        for k, v in {"loss": loss, **metrics}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.images += images

    def flush(self) -> dict[str, float]:
        """The window's mean loss and metrics and its images per second; the next window starts now."""
        elapsed = time.perf_counter() - self.started
        row = {k: v / self.steps for k, v in self.sums.items()}
        row["images_per_s"] = round(self.images / max(elapsed, 1e-9), 2)
        self.reset()
        return row


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)
