"""The training loop shared by pretraining and finetuning.

One place for: distributed setup (torchrun; NCCL on GPU, gloo on CPU), the data order, mixed precision,
the per-step lr schedule, gradient accumulation, the non-finite guard, checkpoint cadence, metrics and the
progress bar. A run is reproducible step by step: the data order depends on (seed, epoch), each sample's
augmentation on (seed, epoch, index) and everything random inside a step (masks, drop path, mixup) on
(seed, rank, step), so ``--resume`` continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mae.checkpoint import load_checkpoint, save_checkpoint
from mae.config import Config, OptimConfig
from mae.data import collate_skipping_bad
from mae.files import read_json_lines, remove_stale_temporaries, write_bytes_atomic, write_json_atomic
from mae.hardware import has_native_bf16

# ----------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    """Where this process runs: rank, world size and device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None) -> Dist:
    """Join the torchrun process group when launched by torchrun; otherwise a single process.

    CUDA when available (one GPU per local rank, NCCL), else CPU with gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (e.g. the loss) use TF32
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
    if not dist.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------- data order


class ResumableSampler(DistributedSampler):
    """DistributedSampler that yields ``(index, epoch)`` and can start part-way through an epoch.

    The epoch travels with the index so the dataset can seed each sample's augmentation from it.
    """

    def __init__(self, dataset: Dataset, dist: Dist, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start :]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


def make_loader(dataset: Dataset, batch_size: int, dist: Dist, seed: int, workers: int, shuffle: bool = True
                ) -> tuple[DataLoader, ResumableSampler]:
    sampler = ResumableSampler(dataset, dist, seed, shuffle=shuffle)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skipping_bad,
        pin_memory=dist.device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
        # Its own generator: starting an epoch must not draw from the global RNG that masks are seeded from.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def eval_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """In-order loader for evaluation (no sampler games; every image once)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_skipping_bad)


def seed_step(seed: int, rank: int, step: int) -> None:
    """Reseed every generator a step may use, from (seed, rank, step) alone."""
    s = hash((seed, rank, step)) & 0x7FFF_FFFF_FFFF_FFFF
    torch.manual_seed(s)
    np.random.seed(s % (2**32))
    random.seed(s)


# ----------------------------------------------------------------------------------------------- optimisation


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
        raise ValueError(f"run.amp must be one of auto, {', '.join(AMP_DTYPES)}; got {amp!r}")
    return AMP_DTYPES[amp]


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN or infinite; the last good checkpoint is left untouched."""


# ----------------------------------------------------------------------------------------------- run folder


class RunDir:
    """A run's folder: checkpoint.pt, config.json, metrics.jsonl and pictures. Only rank 0 writes."""

    def __init__(self, path: str | Path, dist: Dist):
        self.path = Path(path)
        self.dist = dist
        if dist.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            # A run killed mid-write leaves NAME.<random>.tmp beside the file it was replacing; nothing reads them.
            stale = [p for name in ("checkpoint.pt", "best.pt", "config.json", "metrics.jsonl")
                     for p in remove_stale_temporaries(self.path / name)]
            if stale:
                print(f"removed {len(stale)} partial file(s) left by an interrupted write: "
                      f"{', '.join(p.name for p in stale)}", file=sys.stderr)

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, cfg: Config, extra: dict[str, Any] | None = None) -> None:
        if self.dist.is_main:
            write_json_atomic(self.path / "config.json", {**cfg.to_dict(), **(extra or {})})

    def log(self, row: dict[str, Any]) -> None:
        if self.dist.is_main:
            with self.metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def last_logged(self) -> dict[str, Any]:
        """The last metrics row written (a finished run resumed again trains nothing and reports this)."""
        if not (self.dist.is_main and self.metrics.exists()):
            return {}
        rows = read_json_lines(self.metrics, "metrics log", torn_tail=True)
        return rows[-1] if rows else {}

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines past ``after_step`` (written by a run that died after its last checkpoint)."""
        if self.dist.is_main and self.metrics.exists():
            keep = [row for row in read_json_lines(self.metrics, "metrics log", torn_tail=True)
                    if not isinstance(row, dict) or row.get("step", 0) <= after_step]
            write_bytes_atomic(self.metrics, "".join(json.dumps(row) + "\n" for row in keep).encode())


def resume_config(checkpoint: Path, cfg: Config, asked: bool) -> Config:
    """The config ``--resume`` continues: the one saved in ``checkpoint``. Options given on the command line
    (``asked``) that would change it are refused with the fields that differ, never silently applied."""
    saved = Config.from_dict(load_checkpoint(checkpoint)["config"])
    if asked and saved != cfg:
        raise ValueError(f"--resume continues the saved run's config; these options differ from it: "
                         f"{saved.differences(cfg)}")
    return saved


# ----------------------------------------------------------------------------------------------- the loop


class Trainer:
    """Steps an optimiser over a loader. Subclasses give the loss and what happens every few steps.

    Subclass hooks: ``loss(model, images, labels) -> (loss, {metric: float})``, ``periodic(step, final)``
    (pictures, evaluation; every ``periodic_every`` steps), ``checkpoint_extra()`` / ``restore_extra(ckpt)`` (more
    primitives to keep in the checkpoint) and ``make_optimizer(groups)`` (AdamW unless overridden).
    """

    log_name = "train"

    def __init__(self, cfg: Config, run: RunDir, dist: Dist, model: nn.Module, train_set: Dataset,
                 optimizer_groups: list[dict[str, Any]] | None = None, optim: OptimConfig | None = None,
                 epochs: int | None = None):
        """``optim`` and ``epochs`` default to ``cfg.optim`` and ``cfg.run.epochs`` (a finetune run passes the
        ones its recipe defines); ``cfg.run.steps``, when set, overrides the length in epochs."""
        self.cfg = cfg
        self.run = run
        self.dist = dist
        self.model = model.to(dist.device)
        self.optim = o = optim or cfg.optim
        r = cfg.run
        epochs = r.epochs if epochs is None else epochs
        self.loader, self.sampler = make_loader(train_set, o.batch_size, dist, r.seed, cfg.data.num_workers)
        micro_per_epoch = len(self.sampler) // o.batch_size
        self.steps_per_epoch = micro_per_epoch // o.accum_iter
        self.effective_batch = o.batch_size * o.accum_iter * dist.world
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{len(train_set)} training images cannot fill one step of {self.effective_batch} images "
                f"(batch_size {o.batch_size} x accum_iter {o.accum_iter} x {dist.world} processes); "
                "lower --batch-size"
            )
        self.total_steps = r.steps if r.steps is not None else epochs * self.steps_per_epoch
        self.warmup_steps = min(round(o.warmup_epochs * self.steps_per_epoch), self.total_steps)
        self.base_lr = o.effective_lr(self.effective_batch)
        groups = optimizer_groups if optimizer_groups is not None else param_groups(self.model, o.weight_decay)
        self.optimizer = self.make_optimizer(groups)
        self.periodic_every = r.vis_every
        self.amp_dtype = autocast_dtype(r.amp, dist.device)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.skipped_images = 0
        self.last_checkpoint_step: int | None = None
        wrapped = self.model
        if dist.enabled:
            wrapped = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None
            )
        self.ddp_model = wrapped
        self.forward_model = torch.compile(wrapped) if r.compile else wrapped

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

    # -------------------------------------------------------------- state

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "config": self.cfg.to_dict(),
            "skipped_images": self.skipped_images,
            **self.checkpoint_extra(),
        }

    def save(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.run.checkpoint, self.state())
        self.last_checkpoint_step = self.step

    def resume(self, path: str | Path | None = None) -> None:
        """Restore weights, optimiser, scaler and step from a checkpoint of this run."""
        path = path or self.run.checkpoint
        ckpt = load_checkpoint(path, map_location=self.dist.device)
        saved = Config.from_dict(ckpt["config"])
        if saved != self.cfg:
            diff = saved.differences(self.cfg)
            shown = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
            raise ValueError(f"{path} belongs to a run with another config ({shown}): "
                             "resume it with its own config, or choose another --out")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.skipped_images = int(ckpt.get("skipped_images", 0))
        self.last_checkpoint_step = self.step
        self.restore_extra(ckpt)
        self.run.truncate_metrics(self.step)

    def restore_extra(self, ckpt: dict[str, Any]) -> None:
        pass

    # -------------------------------------------------------------- loop

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Micro-batches from the current step on, across epoch boundaries, resuming mid-epoch exactly."""
        o = self.optim
        step = self.step
        while True:
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            self.sampler.start = in_epoch * o.accum_iter * o.batch_size
            it = iter(self.loader)
            for _ in range((self.steps_per_epoch - in_epoch) * o.accum_iter):
                yield next(it)
            step = (epoch + 1) * self.steps_per_epoch

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    def fit(self) -> dict[str, Any]:
        """Run to ``total_steps``; returns the last logged metrics."""
        cfg, dist, o = self.cfg, self.dist, self.optim
        progress = _progress(self.total_steps, self.step, dist.is_main, self.log_name)
        batches = self._batches()
        window: dict[str, float] = {}
        window_images, window_start = 0, time.perf_counter()
        last: dict[str, Any] = self.run.last_logged()
        self.model.train()
        try:
            while self.step < self.total_steps:
                lr = cosine_lr(self.step, self.total_steps, self.warmup_steps, self.base_lr, o.min_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                seed_step(cfg.run.seed, dist.rank, self.step)
                step_loss, step_metrics, step_images = 0.0, {}, 0
                for micro in range(o.accum_iter):
                    images, labels, skipped = next(batches)
                    self.skipped_images += skipped
                    images = images.to(dist.device, non_blocking=True)
                    labels = labels.to(dist.device, non_blocking=True)
                    sync = micro == o.accum_iter - 1 or not dist.enabled
                    no_sync = contextlib.nullcontext() if sync else self.ddp_model.no_sync()
                    with no_sync:
                        with self._autocast():
                            loss, metrics = self.loss(self.forward_model, images, labels)
                        self.scaler.scale(loss / o.accum_iter).backward()
                    step_loss += loss.item() / o.accum_iter
                    step_images += images.shape[0]
                    for k, v in metrics.items():
                        step_metrics[k] = step_metrics.get(k, 0.0) + v / o.accum_iter
                total_loss, total_images, total_skipped = all_reduce_sum(
                    [step_loss, step_images, self.skipped_images], dist)
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
                self.step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)

                window["loss"] = window.get("loss", 0.0) + mean_loss
                window["n"] = window.get("n", 0) + 1
                for k, v in step_metrics.items():
                    window[k] = window.get(k, 0.0) + v
                window_images += int(total_images)
                final = self.step == self.total_steps
                row: dict[str, Any] = {}
                if self.step % cfg.run.log_every == 0 or final:
                    elapsed = time.perf_counter() - window_start
                    n = window.pop("n")
                    row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3), "lr": lr,
                           **{k: v / n for k, v in window.items()},
                           "images_per_s": round(window_images / max(elapsed, 1e-9), 2),
                           "skipped_images": int(total_skipped), "time": round(time.time(), 3)}
                    window, window_images, window_start = {}, 0, time.perf_counter()
                if self.step % self.periodic_every == 0 or final:
                    row = {"step": self.step, **row, **self.periodic(self.step, final)}
                if row:
                    self.run.log(row)
                    last = row
                if self.step % cfg.run.ckpt_every == 0 or final:
                    self.save()
        finally:
            progress.close()
        return last


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)
