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
import random
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from mae.checkpoint import load_checkpoint, save_checkpoint
from mae.config import Config, OptimConfig
from mae.data import ImageError, Normalize, PendingDecode, collate_skipping_bad
from mae.dist import Dist, all_reduce_sum, init_distributed, shutdown_distributed
from mae.files import read_json_lines, remove_stale_temporaries, write_bytes_atomic, write_json_atomic
from mae.hardware import has_native_bf16

# ----------------------------------------------------------------------------------------------- distributed

__all__ = ["Dist", "all_reduce_sum", "init_distributed", "shutdown_distributed"]  # mae.dist, for the stages


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
                ) -> tuple[DataLoader, ResumableSampler | None]:
    """The training loader: a resumable DistributedSampler over a map-style dataset, or a shard stream (which
    splits itself by rank and worker and has no sampler)."""
    # Its own generator: starting an iterator must not draw from the global RNG that masks are seeded from.
    common = {"batch_size": batch_size, "num_workers": workers, "collate_fn": collate_skipping_bad,
              "pin_memory": dist.device.type == "cuda", "prefetch_factor": 4 if workers > 0 else None,
              "generator": torch.Generator().manual_seed(seed)}
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, **common), None
    sampler = ResumableSampler(dataset, dist, seed, shuffle=shuffle)
    loader = DataLoader(dataset, sampler=sampler, drop_last=True, persistent_workers=workers > 0, **common)
    return loader, sampler


def eval_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """In-order loader for evaluation (no sampler games; every image once; a shard stream divides its shards
    between the workers itself)."""
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
        epochs = r.epochs if epochs is None else epochs
        if cfg.data.decode == "gpu":
            check_gpu_decode(dist.device)
        mean, std = cfg.data.channel_stats(cfg.model.in_chans)
        self.normalize = normalize or Normalize(mean, std, tuple(cfg.model.img_size), cfg.data.interpolation)
        self.train_set = train_set
        self.loader, self.sampler = make_loader(train_set, o.batch_size, dist, r.seed, cfg.data.num_workers)
        if self.sampler is not None:
            samples_per_rank = len(self.sampler)
        else:
            from mae.shards import check_slots

            check_slots(train_set.shards, dist.world * max(cfg.data.num_workers, 1))
            samples_per_rank = len(train_set) // dist.world
        micro_per_epoch = samples_per_rank // o.batch_size
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
        self.amp_dtype = autocast_dtype(r.amp, dist.device)
        self.fsdp = r.fsdp and dist.enabled
        if self.fsdp and self.amp_dtype == torch.float16:
            raise ValueError("run.fsdp with run.amp=fp16 is not supported (the loss scaler does not shard): "
                             "use run.amp=bf16")
        if r.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"run.grad_checkpointing: {type(model).__name__} has no set_grad_checkpointing()")
            model.set_grad_checkpointing(True)
        self.model = model.to(dist.device)
        names = {id(p): n for n, p in self.model.named_parameters()}
        if optimizer_groups is not None:  # by name: sharding replaces the parameter objects
            optimizer_groups = [{**g, "params": [names[id(p)] for p in g["params"]]} for g in optimizer_groups]
        wrapped = self.model
        if self.fsdp:
            shard_model(self.model, dist)
        elif dist.enabled:
            wrapped = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None
            )
        params = dict(self.model.named_parameters())
        if optimizer_groups is not None:
            groups = [{**g, "params": [params[n] for n in g["params"]]} for g in optimizer_groups]
        else:
            groups = param_groups(self.model, o.weight_decay)
        self.optimizer = self.make_optimizer(groups)
        self.periodic_every = r.vis_every
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.skipped_images = 0
        self.last_checkpoint_step: int | None = None
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

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) model state dict; under FSDP every rank must call it (it gathers the shards)."""
        if not self.fsdp:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # A forward without backward (validation) leaves the root unit's parameters gathered; shard them back so
        # that the module holds the parameters the optimizer steps.
        self.model.reshard()

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def state(self) -> dict[str, Any]:
        """The checkpoint: full state dicts (a sharded run's too), so one process can open and resume it."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            self.model.reshard()  # see model_state
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            gathered = get_optimizer_state_dict(self.model, self.optimizer, options=full)  # {} except on rank 0
            optimizer = optimizer_state_by_index(gathered) if gathered else {}
        else:
            optimizer = self.optimizer.state_dict()
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
            raise ValueError(f"{path} belongs to a run with another config ({shown}): "
                             "resume it with its own config, or choose another --out")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, ckpt["model"], options=full)
            set_optimizer_state_dict(self.model, self.optimizer,
                                     optimizer_state_by_name(ckpt["optimizer"], self.optimizer, self.model),
                                     options=full)
        else:
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

    def _autocast(self) -> contextlib.AbstractContextManager:
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
                    if len(images) == 0:
                        raise ImageError(f"every image of a batch of {skipped} failed to decode at step {self.step}; "
                                         "is the data corrupt? (the warnings above name them)")
                    images = self.normalize(images, dist.device)  # (N, C, H, W) float, on the device
                    labels = labels.to(dist.device, non_blocking=True)
                    with self._no_sync(micro == o.accum_iter - 1):
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
                    row = {"step": self.step, **row, **self._periodic(self.step, final)}
                if row:
                    self.run.log(row)
                    last = row
                if self.step % cfg.run.ckpt_every == 0 or final:
                    self.save()
        finally:
            progress.close()
        return last


def check_gpu_decode(device: torch.device) -> None:
    """``data.decode=gpu`` needs nvjpeg on the training GPU; anywhere else it is refused before any work."""
    if device.type != "cuda":
        raise ValueError(f"data.decode=gpu decodes JPEGs with nvjpeg on the training GPU, but this run is on "
                         f"{device.type}; set data.decode=cpu")
    from torchvision.io import decode_jpeg

    probe = torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8)
    try:
        decode_jpeg([probe], device=device)
    except Exception as e:  # a torchvision built without nvjpeg
        raise ValueError(f"data.decode=gpu: torchvision cannot decode JPEGs on {device} ({e}); "
                         "set data.decode=cpu") from e


def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- FSDP2


def _fully_shard() -> Any:
    """``fully_shard`` (FSDP2): ``torch.distributed.fsdp`` from torch 2.6, the ``_composable`` path before."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def shard_model(model: nn.Module, dist: Dist) -> None:
    """FSDP2 in place: each transformer block is a unit (its parameters gathered just before it runs and freed
    after), then the rest of the model (embeddings, norms, head) as the root unit."""
    from timm.models.vision_transformer import Block
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
    # The model returns pred as a slice of the decoder output (a view, as in the official code); FSDP warns that an
    # in-place op on it would skip the all-gather. Nothing modifies pred in place, so the warning only alarms.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def optimizer_state_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict keyed by parameter names (what torch.distributed.checkpoint gathers) -> the
    layout ``optimizer.state_dict()`` has on one process: parameters numbered in group order."""
    ids: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        for name in group["params"]:
            ids.setdefault(name, len(ids))
        groups.append({**group, "params": [ids[n] for n in group["params"]]})
    return {"state": {ids[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_name(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
                            ) -> dict[str, Any]:
    """The inverse of ``optimizer_state_by_index`` for ``optimizer`` (numbers -> the names of its parameters)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**saved, "params": [order[i] for i in saved["params"]]} for saved in state["param_groups"]]
    return {"state": {order[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


# ----------------------------------------------------------------------------------------------- data


@dataclass
class TrainingData:
    """What a training run reads: a training set (map-style or a shard stream), a validation set, the classes."""

    name: str
    train: Dataset
    val: Dataset
    classes: list[str]
    labelled: bool


def training_data(spec: str | Path | Any, cfg: Config, dist: Dist, transform: Any, batch_size: int, *,
                  val_limit: int | None = None, val_fallback: int = 0) -> TrainingData:
    """``--data`` (or an already loaded ``mae.data.Source``) as training and validation sets.

    A bundled set, folder or list is split with the seeded stratified split (data.val_fraction,
    data.split_seed); shards come split by ``mae data pack`` (their val shards). ``batch_size`` is the loader's,
    which positions a resumed shard stream. ``val_limit`` caps the validation set, which is then held in memory
    (pretraining's fixed val_loss images); without it a shard validation split is streamed. ``val_fallback``:
    with an empty validation split, validate on that many training images instead (pretraining's pictures)
    rather than refuse.
    """
    from mae.data import (
        ImageDataset,
        Preprocessing,
        ShardEvalStream,
        ShardTrainStream,
        head_source,
        load_source,
        stratified_split,
    )
    from mae.shards import is_shard_spec, open_shards

    d, seed = cfg.data, cfg.run.seed
    preprocessing = Preprocessing.from_config(cfg)
    if isinstance(spec, (str, Path)) and is_shard_spec(spec):
        shards = open_shards(spec)
        train = ShardTrainStream(shards.train, transform, seed, dist.rank, dist.world, d.shuffle_buffer, batch_size)
        if val_limit is not None:
            held = head_source(shards.val or shards.train, val_limit if shards.val else min(val_limit, val_fallback),
                               shards.classes)
            val: Dataset = ImageDataset(held, range(len(held)), preprocessing, max_pixels=d.max_image_pixels)
        elif shards.val is not None:
            val = ShardEvalStream(shards.val, preprocessing, d.max_image_pixels)
        else:
            raise ValueError(f"{spec}: these shards have no validation split; pack the source with mae data pack "
                             "(it writes val-*.tar beside train-*.tar) and pass the packed folder")
        return TrainingData(shards.name, train, val, shards.classes, shards.labelled)
    source = load_source(spec) if isinstance(spec, (str, Path)) else spec
    for note in source.notes:
        warnings.warn(f"{source.name}: {note}", stacklevel=2)
    train_idx, val_idx = stratified_split(source.labels, d.val_fraction, d.split_seed)
    if len(val_idx) == 0:
        if not val_fallback:
            raise ValueError("the validation split is empty: raise data.val_fraction")
        val_idx = train_idx[:val_fallback]
    if val_limit is not None:
        val_idx = val_idx[:val_limit]
    return TrainingData(source.name, ImageDataset(source, train_idx, transform, seed),
                        ImageDataset(source, val_idx, preprocessing, max_pixels=d.max_image_pixels),
                        source.classes, source.labelled)
