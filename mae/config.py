"""Run configuration: frozen dataclasses, a registry of presets, and ``--set a.b=value`` overrides.

A checkpoint stores ``Config.to_dict()`` and rebuilds its model with ``Config.from_dict(...)``; nothing else
(no argparse Namespace, no pickled class) is needed to reopen a run.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mae.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """The masked autoencoder: a ViT encoder over visible patches and a light decoder over all of them."""

    img_size: tuple[int, int] = (224, 224)
    """Input (height, width) in pixels; each a multiple of patch_size. ``--set model.img_size=64`` means 64x64."""
    patch_size: int = 16
    """Side of a square patch in pixels."""
    in_chans: int = 3
    """Input channels: 1 (grey), 3 (RGB) or any N (multi-spectral arrays stored as .npy)."""
    embed_dim: int = 768
    """Encoder width."""
    depth: int = 12
    """Encoder blocks."""
    num_heads: int = 12
    """Encoder attention heads."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLPs relative to the token width (encoder and decoder)."""
    decoder_embed_dim: int = 512
    """Decoder width (the paper's default decoder is 512 wide and 8 deep)."""
    decoder_depth: int = 8
    """Decoder blocks."""
    decoder_num_heads: int = 16
    """Decoder attention heads."""
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder during pretraining."""
    norm_pix_loss: bool = True
    """Regress per-patch normalised pixels (mean 0, variance 1 per patch), as the paper's best setting."""

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along (height, width)."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def validate(self) -> None:
        h, w = self.img_size
        if h % self.patch_size or w % self.patch_size:
            raise UsageError(f"model.img_size {self.img_size} is not a multiple of model.patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise UsageError("embed_dim and decoder_embed_dim must be divisible by their head counts")
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            raise UsageError("2-D sin-cos position embeddings need widths divisible by 4")
        if not 0.0 < self.mask_ratio < 1.0:
            raise UsageError(f"model.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if int(self.num_patches * (1 - self.mask_ratio)) < 1:
            raise UsageError(f"mask_ratio {self.mask_ratio} leaves no visible patch out of {self.num_patches}")
        if self.in_chans < 1:
            raise UsageError("model.in_chans must be >= 1")


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are augmented. Size and channels come from the model config."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    """Per-channel mean used to normalise inputs (one value is broadcast to every channel)."""
    std: tuple[float, ...] = IMAGENET_STD
    """Per-channel standard deviation used to normalise inputs."""
    interpolation: str = "bicubic"
    """Resize filter: bicubic (the paper's), bilinear or nearest."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range for pretraining (the paper uses 0.2..1)."""
    hflip: float = 0.5
    """Probability of a horizontal flip during training."""
    crop_pct: float = 0.875
    """Evaluation: resize the short side to size / crop_pct, then centre-crop (timm's convention)."""
    val_fraction: float = 0.2
    """Share of each class held out for validation (seeded, stratified)."""
    split_seed: int = 0
    """Seed of the train/val split; fixed so that every stage sees the same split."""
    num_workers: int = 2
    """DataLoader worker processes (0 loads in the training process)."""
    max_image_pixels: int = 40_000_000
    """Largest image (width x height, read from the header before decoding) a run decodes; bigger ones are skipped
    and counted like unreadable ones. The same default as serving (``mae.images.MAX_IMAGE_PIXELS``)."""
    decode: str = "cpu"
    """Where JPEGs are decoded: cpu (workers: crop box from the header, reduced-scale decode, uint8 resize) or gpu
    (workers read bytes and draw the crop; nvjpeg decodes each batch on the training GPU; for when the CPUs of a
    machine cannot keep its GPUs busy)."""
    shuffle_buffer: int = 2000
    """WebDataset shards: samples held by each worker to shuffle within (shards are shuffled too, per epoch)."""

    def channel_stats(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std with one value per channel, broadcasting or averaging the configured ones as needed."""

        def fit(values: tuple[float, ...]) -> tuple[float, ...]:
            if len(values) == channels:
                return tuple(values)
            if len(values) == 1 or channels != 3 and len(values) == 3:
                avg = sum(values) / len(values)
                return (avg,) * channels
            raise UsageError(f"data.mean/std have {len(values)} values but the model has {channels} channels")

        return fit(self.mean), fit(self.std)

    def validate(self) -> None:
        if self.decode not in ("cpu", "gpu"):
            raise UsageError(f"data.decode must be cpu or gpu, got {self.decode!r}")
        if self.max_image_pixels < 1 or self.shuffle_buffer < 1 or self.num_workers < 0:
            raise UsageError("data.max_image_pixels and data.shuffle_buffer must be >= 1, data.num_workers >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear-warmup + cosine schedule, as in the official MAE recipe."""

    batch_size: int = 64
    """Images per device per micro-step. Effective batch = batch_size x accum_iter x devices."""
    accum_iter: int = 1
    """Micro-steps accumulated into one optimiser step."""
    blr: float = 1.5e-4
    """Base learning rate: lr = blr x effective batch / 256 (the paper's scaling rule)."""
    lr: float | None = None
    """Absolute learning rate; overrides blr when set."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay; never applied to biases, norms, tokens or position embeddings."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (the paper uses beta2 = 0.95 for stability)."""
    warmup_epochs: float = 40.0
    """Linear warmup length in epochs (converted to optimiser steps)."""
    clip_grad: float | None = None
    """Clip the global gradient norm to this value (off in the official pretraining)."""

    def effective_lr(self, effective_batch: int) -> float:
        return self.lr if self.lr is not None else self.blr * effective_batch / 256


@dataclass(frozen=True)
class RunConfig:
    """Length, cadence and execution of a run."""

    epochs: int = 800
    """Passes over the training set (ignored when steps is set)."""
    steps: int | None = None
    """Total optimiser steps; overrides epochs."""
    seed: int = 0
    """Seed of model init, data order, augmentation and masks (each step reseeds from it)."""
    log_every: int = 20
    """Optimiser steps between lines of metrics.jsonl."""
    ckpt_every: int = 500
    """Optimiser steps between checkpoints (one is always written at the end)."""
    vis_every: int = 500
    """Optimiser steps between reconstruction grids (one is always drawn at the end)."""
    amp: str = "auto"
    """Mixed precision: auto (bf16 on CUDA and on CPUs with native bf16 matmuls, else fp32), bf16, fp16 or off."""
    compile: bool = False
    """torch.compile the model (slower start, faster steps)."""
    grad_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping them (timm's
    ``set_grad_checkpointing``): about a third more compute for a fraction of the activation memory."""
    fsdp: bool = False
    """Under torchrun, shard parameters, gradients and optimiser state over the processes (FSDP2, one unit per
    block) instead of replicating them (DDP): for ViT-H and larger batches. Checkpoints hold full state dicts."""


@dataclass(frozen=True)
class FinetuneConfig:
    """How ``mae finetune`` trains a classifier on a pretrained encoder (official ``main_finetune.py`` and
    ``main_linprobe.py`` defaults for ViT-B). A pretraining run carries it so that its finetune recipe travels
    with it, and it is the only home of a finetune run's optimiser and length: a finetune or probe run reads
    these fields, never ``optim`` or ``run.epochs`` (which keep describing the pretraining it started from).
    """

    global_pool: str = "avg"
    """Finetune pooling: avg (mean of patch tokens + fc_norm, the official default) or token (class token)."""
    layer_decay: float = 0.75
    """Layer-wise lr decay: block i of D trains at layer_decay ** (D - i) x lr, the stem at layer_decay ** (D+1)."""
    drop_path: float = 0.1
    """Stochastic depth rate (linearly increasing over the blocks)."""
    mixup: float = 0.8
    """Mixup alpha (0 disables mixup)."""
    cutmix: float = 1.0
    """CutMix alpha (0 disables cutmix)."""
    smoothing: float = 0.1
    """Label smoothing (folded into the soft targets when mixup/cutmix is on)."""
    randaug: str | None = "rand-m9-mstd0.5-inc1"
    """timm RandAugment policy for 1- and 3-channel images; null disables it."""
    reprob: float = 0.25
    """Random-erasing probability (pixel mode, after normalisation)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range when finetuning and probing (the official 0.08..1)."""
    hflip: float = 0.5
    """Horizontal-flip probability when finetuning and probing (0 for digits and text)."""
    batch_size: int = 64
    """Finetune images per device per micro-step (the official ViT-B run: 32 x 4 accum x 8 GPUs = 1024)."""
    blr: float = 5e-4
    """Finetune base lr: lr = blr x effective batch / 256 (ViT-B 5e-4; 1e-3 for ViT-L/H)."""
    weight_decay: float = 0.05
    """Finetune AdamW weight decay."""
    warmup_epochs: float = 5.0
    """Finetune warmup epochs."""
    min_lr: float = 1e-6
    """Finetune cosine floor."""
    epochs: int = 100
    """Finetune epochs (ViT-B 100, ViT-L/H 50)."""
    accum_iter: int = 1
    """Finetune micro-steps accumulated into one optimiser step (the official run: 4)."""
    clip_grad: float | None = None
    """Clip the finetune's global gradient norm to this value (off in the official recipe)."""
    probe_pool: str = "token"
    """Linear-probe feature: token (the paper's: class token after the final norm) or avg (mean of the normed
    patch tokens, which small encoders trained briefly separate better; see bench/quality.py)."""
    probe_batch_size: int = 256
    """Linear-probe images per device per micro-step (the paper: 16384 in all)."""
    probe_blr: float = 0.1
    """Linear-probe base lr: lr = probe_blr x effective batch / 256."""
    probe_optimizer: str = "lars"
    """Linear-probe optimiser: lars (the paper's, for batches of thousands) or sgd (momentum 0.9, small batches)."""
    probe_warmup_epochs: float = 10.0
    """Linear-probe warmup epochs."""
    probe_epochs: int = 90
    """Linear-probe epochs."""

    def validate(self) -> None:
        for key in ("global_pool", "probe_pool"):
            if getattr(self, key) not in ("avg", "token"):
                raise UsageError(f"finetune.{key} must be avg or token, got {getattr(self, key)!r}")
        if self.probe_optimizer not in ("lars", "sgd"):
            raise UsageError(f"finetune.probe_optimizer must be lars or sgd, got {self.probe_optimizer!r}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise UsageError(f"finetune.layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.smoothing < 1.0 or not 0.0 <= self.reprob <= 1.0 or not 0.0 <= self.hflip <= 1.0:
            raise UsageError("finetune.smoothing must be in [0, 1); finetune.reprob and finetune.hflip in [0, 1]")
        if min(self.mixup, self.cutmix, self.drop_path) < 0:
            raise UsageError("finetune.mixup, finetune.cutmix and finetune.drop_path must be >= 0")
        if self.accum_iter < 1 or min(self.batch_size, self.probe_batch_size, self.epochs, self.probe_epochs) < 1:
            raise UsageError("finetune.accum_iter, the batch sizes and the epochs must be >= 1")


@dataclass(frozen=True)
class ContrastiveConfig:
    """How ``mae finetune --contrastive`` tunes a pretrained encoder into a search embedding without labels: MAE-CT
    (Lehner et al., "Contrastive Tuning: A Little Help to Make Masked Autoencoders Forget", 2023). Defaults are the
    official ViT-B/16 recipe (github.com/ml-jku/MAE-CT, ``yamls/stage2_maect_prepare_head`` and
    ``stage3_maect_contrastive_tuning``): NNCLR projector + predictor heads on the pooled encoder output and a queue
    of projections searched for each view's nearest neighbour; first the heads alone on the frozen encoder
    (``head_epochs``), then the upper half of the blocks with layer-wise lr decay (``epochs``). Like ``finetune``,
    a pretraining run carries it, and a contrastive run reads its optimiser and length from here alone.
    """

    augment: str = "crop"
    """Views: crop (MAE-CT: RandomResizedCrop + flip), colour (MAE-CT_aug: + BYOL's colour jitter, grey, blur and
    solarisation) or copy (copy-detection edits after SSCD: + rotation, resize, colour, blur, text or image
    overlay, JPEG); see ``training/views.py``."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range of each view (the official 0.08..1)."""
    hflip: float = 0.5
    """Probability of a horizontal flip of each view (0 for digits and text)."""
    pooling: str = "avg"
    """The embedding the heads train and the artifact serves: avg (mean of the normed patch tokens; the official
    ViT-B/16 recipe) or token (the class token; the official ViT-L and ViT-H recipes)."""
    positive: str = "neighbour"
    """What a view is pulled towards: neighbour (NNCLR, the paper's: the other view's nearest neighbour in the
    queue) or view (the other view itself, as SimCLR and SSCD: tells instances apart, for copy detection)."""
    koleo: float = 0.0
    """Weight of SSCD's KoLeo term (Sablayrolles et al. 2019; Pizzi et al. 2022) on the L2-normalised pooled
    embedding, the one the artifact serves: -mean log of each image's distance to its nearest other image in the
    batch. It spreads the embedding over the sphere so that distinct images stay apart and a cosine threshold
    separates copies (SSCD: 30 with temperature 0.05). 0 = off, the paper's MAE-CT."""
    proj_hidden_dim: int = 2048
    """Hidden width of the projector (Linear-BN-ReLU x 2, Linear-BN: NNCLR's)."""
    pred_hidden_dim: int = 4096
    """Hidden width of the predictor (Linear-BN-ReLU, Linear)."""
    output_dim: int = 256
    """Width of the projections the queue holds and the loss compares."""
    queue_size: int = 65536
    """Projections kept in the nearest-neighbour queue (first in, first out); at least one global batch."""
    temperature: float = 0.15
    """Softmax temperature of the contrastive loss (ViT-B 0.15; ViT-L 0.2)."""
    topk: int = 20
    """Tuning: the positive is drawn at random from a view's topk nearest neighbours (the head stage always
    takes the nearest, as the official stage 2); 1 = the nearest."""
    target_momentum: float = 0.99
    """Tuning: EMA factor of the target projector whose projections fill and search the queue."""
    frozen_blocks: int | None = None
    """Lower blocks (and with block 0 the patch embedding and class token) that stay frozen while tuning: no
    gradient is computed for them. null = half the depth (the paper's: 6 of 12, 12 of 24, 16 of 32)."""
    layer_decay: float = 0.65
    """Tuning: layer-wise lr decay; block i of D trains at layer_decay ** (D - i) x lr, the final norm at lr."""
    head_epochs: int = 20
    """Epochs of the first stage: the heads alone on the frozen encoder (0 skips it: the heads start untrained)."""
    epochs: int = 20
    """Epochs of the second stage: the upper blocks and the heads."""
    batch_size: int = 128
    """Images per device per step, two views each (the official run: 128 x 8 GPUs = 1024)."""
    blr: float = 1e-4
    """Base lr of the tuned encoder: lr = blr x 2 x effective batch / 256 (both views count, as the official code
    scales it)."""
    head_blr: float = 1e-4
    """Base lr of the heads, in both stages (MAE-CT_aug's tuning: 5e-4)."""
    weight_decay: float = 0.05
    """AdamW weight decay of the tuned blocks (none on biases, norms, tokens)."""
    head_weight_decay: float = 1e-5
    """AdamW weight decay of the heads."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup: float = 0.2
    """Share of each stage's steps over which the lr rises linearly from 0 (then a half cosine to 0)."""

    def validate(self) -> None:
        from mae.errors import UsageError

        choices = {"augment": ("crop", "colour", "copy"), "pooling": ("avg", "token"),
                   "positive": ("neighbour", "view")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UsageError(f"contrastive.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0 or not 0.0 <= self.hflip <= 1.0:
            raise UsageError(f"contrastive.crop_scale must satisfy 0 < low <= high <= 1 and contrastive.hflip be in "
                             f"[0, 1]; got {self.crop_scale} and {self.hflip}")
        if min(self.proj_hidden_dim, self.pred_hidden_dim, self.output_dim, self.queue_size, self.topk,
               self.epochs, self.batch_size) < 1 or self.head_epochs < 0:
            raise UsageError("contrastive widths, queue_size, topk, epochs and batch_size must be >= 1 and "
                             "contrastive.head_epochs >= 0")
        if self.temperature <= 0 or not 0.0 <= self.target_momentum < 1.0 or not 0.0 < self.layer_decay <= 1.0:
            raise UsageError("contrastive.temperature must be > 0, target_momentum in [0, 1), layer_decay in (0, 1]")
        if not 0.0 <= self.warmup < 1.0 or min(self.blr, self.head_blr) <= 0:
            raise UsageError("contrastive.warmup must be in [0, 1) and the learning rates > 0")
        if self.frozen_blocks is not None and self.frozen_blocks < 0:
            raise UsageError(f"contrastive.frozen_blocks must be >= 0 or null; got {self.frozen_blocks}")
        if min(self.weight_decay, self.head_weight_decay, self.koleo) < 0:
            raise UsageError("contrastive weight decays and contrastive.koleo must be >= 0")


@dataclass(frozen=True)
class Config:
    """Everything a run needs; stored in its checkpoint as a plain dict."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Finetune and linear-probe recipe (absent from older checkpoints: the defaults apply)."""
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    """Contrastive tuning recipe (absent from older checkpoints: the defaults apply)."""
    preset: str = "custom"
    """Name of the preset this config started from."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Rebuild a config from ``to_dict`` output (JSON lists become tuples; unknown keys are an error)."""
        return _build(cls, d, prefix="")

    def override(self, assignments: Iterable[str]) -> Config:
        """Apply ``section.key=value`` strings; an unknown key is rejected with the list of valid ones."""
        cfg = self
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise UsageError(f"--set expects key=value, got {item!r}")
            cfg = _assign(cfg, key.strip().split("."), raw.strip(), key.strip())
        cfg.model.validate()
        cfg.data.validate()
        cfg.finetune.validate()
        cfg.contrastive.validate()
        return cfg

    def differences(self, other: Config) -> list[str]:
        """``section.key: saved A, asked B`` for every field where ``other`` differs from this (saved) config."""
        def walk(a: dict, b: dict, prefix: str) -> list[str]:
            out = []
            for k in a:
                if isinstance(a[k], dict):
                    out += walk(a[k], b[k], prefix + k + ".")
                elif a[k] != b[k]:
                    out.append(f"{prefix}{k}: saved {a[k]!r}, asked {b[k]!r}")
            return out

        return walk(self.to_dict(), other.to_dict(), "")

    def replace(self, **sections: Any) -> Config:
        """Replace fields of sections: ``cfg.replace(run={"steps": 10}, optim={"batch_size": 8})``."""
        updates = {}
        for name, values in sections.items():
            current = getattr(self, name)
            updates[name] = dataclasses.replace(current, **values) if isinstance(values, dict) else values
        return dataclasses.replace(self, **updates)


# ----------------------------------------------------------------------------------------------- command line


def length_overrides(epochs: int | None = None, steps: int | None = None, batch_size: int | None = None,
                     prefix: str = "") -> list[str]:
    """``--epochs/--steps/--batch-size`` as ``--set`` assignments (``prefix`` names the fields of a finetune)."""
    sets = []
    if epochs is not None:
        sets += [f"{prefix or 'run.'}epochs={epochs}"] + ([] if prefix else ["run.steps=null"])
    if steps is not None:
        sets.append(f"run.steps={steps}")
    if batch_size is not None:
        sets.append(f"{prefix or 'optim.'}batch_size={batch_size}")
    return sets


def config_from_args(args: Any, base: Config | None = None) -> Config:
    """``base`` (default: ``--preset``) + ``--epochs/--steps/--batch-size`` + ``--set`` overrides (last wins)."""
    cfg = base if base is not None else get_preset(args.preset)
    sets = length_overrides(getattr(args, "epochs", None), getattr(args, "steps", None),
                            getattr(args, "batch_size", None))
    return cfg.override(sets + list(getattr(args, "overrides", [])))


# ----------------------------------------------------------------------------------------------- presets

PRESETS: dict[str, Callable[[], Config]] = {}


def preset(fn: Callable[[], Config]) -> Callable[[], Config]:
    """Register a preset under its function name."""
    PRESETS[fn.__name__] = fn
    return fn


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name]()
    cfg.model.validate()
    return dataclasses.replace(cfg, preset=name)


def describe_presets() -> list[dict[str, Any]]:
    """One row per preset: name, summary and the sizes people compare."""
    rows = []
    for name in PRESETS:
        cfg = get_preset(name)
        m = cfg.model
        rows.append(
            {
                "name": name,
                "summary": (PRESETS[name].__doc__ or "").strip().splitlines()[0],
                "img_size": list(m.img_size),
                "patch_size": m.patch_size,
                "encoder": f"{m.embed_dim}w x {m.depth}d, {m.num_heads} heads",
                "decoder": f"{m.decoder_embed_dim}w x {m.decoder_depth}d, {m.decoder_num_heads} heads",
                "params_m": round(_param_count(m) / 1e6, 2),
            }
        )
    return rows


def _param_count(m: ModelConfig) -> int:
    """Parameter count from the config alone (blocks dominate; embeddings and heads added exactly)."""

    def blocks(d: int, n: int) -> int:
        hidden = int(d * m.mlp_ratio)
        return n * (4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d))

    patch_dim = m.patch_size**2 * m.in_chans
    enc = patch_dim * m.embed_dim + m.embed_dim + 2 * m.embed_dim + blocks(m.embed_dim, m.depth) + 2 * m.embed_dim
    dec = (
        m.embed_dim * m.decoder_embed_dim + m.decoder_embed_dim * 2
        + blocks(m.decoder_embed_dim, m.decoder_depth) + 2 * m.decoder_embed_dim
        + m.decoder_embed_dim * patch_dim + patch_dim
    )
    return enc + dec


def _paper(embed_dim: int, depth: int, heads: int, patch: int) -> Config:
    """The paper's ImageNet recipe: 224 px, decoder 512 x 8, batch 4096, blr 1.5e-4, 800 epochs, 40 warmup."""
    return Config(
        model=ModelConfig(embed_dim=embed_dim, depth=depth, num_heads=heads, patch_size=patch),
        optim=OptimConfig(batch_size=64, accum_iter=1, blr=1.5e-4, warmup_epochs=40),
        run=RunConfig(epochs=800),
    )


@preset
def mae_vit_base_patch16() -> Config:
    """ViT-B/16 MAE (86M encoder), the paper's default."""
    return _paper(768, 12, 12, 16)


@preset
def mae_vit_large_patch16() -> Config:
    """ViT-L/16 MAE (304M encoder)."""
    return _paper(1024, 24, 16, 16)


@preset
def mae_vit_huge_patch14() -> Config:
    """ViT-H/14 MAE (632M encoder)."""
    return _paper(1280, 32, 16, 14)


@preset
def mae_vit_tiny_patch4_32() -> Config:
    """A 32 px, patch-4 MAE (64 patches) small enough to train on a laptop CPU: the demo and tests use it."""
    return Config(
        model=ModelConfig(
            img_size=(32, 32), patch_size=4, embed_dim=192, depth=6, num_heads=3,
            decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
        ),
        data=DataConfig(crop_scale=(0.35, 1.0), crop_pct=1.0),
        optim=OptimConfig(batch_size=128, blr=1.5e-4, warmup_epochs=5),
        run=RunConfig(epochs=100, log_every=10, ckpt_every=200, vis_every=200),
    )


@preset
def mae_vit_mini_patch4_32() -> Config:
    """The small-data recipe for mnist5k on a CPU: 32 px/4, grey, 128 wide x 4 blocks, decoder 64 x 2, 150 epochs.

    Found with bench/quality.py (its figures are in the README). One input channel: digits are grey, and with
    three copies of it the per-patch normalised targets let the decoder paint colour noise into the
    reconstructions. Against the tiny preset it trades width and depth (about 3x fewer FLOPs per image) for
    epochs, and uses small batches with a high lr: on 4,000 images the number of optimiser steps matters more
    than the model size. Digits are not mirror-symmetric, so no flips; set data.hflip / finetune.hflip to 0.5
    for natural images.
    """
    return Config(
        model=ModelConfig(
            img_size=(32, 32), patch_size=4, in_chans=1, embed_dim=128, depth=4, num_heads=4,
            decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2,
        ),
        data=DataConfig(crop_scale=(0.35, 1.0), crop_pct=1.0, hflip=0.0),
        optim=OptimConfig(batch_size=64, blr=4e-3, warmup_epochs=5),
        run=RunConfig(epochs=150, log_every=20, ckpt_every=620, vis_every=620),
        # Finetune: no mixup/cutmix and no RandAugment (on 4,000 digits they cost more than they give: its
        # solarize/equalize/posterize ops are noise for digits), milder crops, a high lr at batch 64.
        # Probe: SGD (batches of 256, not the paper's 16,384) on the mean of the normed patch tokens, which this
        # small, briefly trained encoder separates better than its class token.
        finetune=FinetuneConfig(
            layer_decay=0.75, drop_path=0.1, mixup=0.0, cutmix=0.0, smoothing=0.1, randaug=None, reprob=0.25,
            crop_scale=(0.6, 1.0), hflip=0.0, batch_size=64, blr=4e-3, warmup_epochs=3, epochs=30,
            probe_pool="avg", probe_optimizer="sgd", probe_batch_size=256, probe_blr=0.1, probe_warmup_epochs=2,
            probe_epochs=30,
        ),
        # Contrastive tuning for 4,000 digits on a CPU (bench/quality.py; docs/training.md has the table): small
        # heads and queue, the nearest neighbour as the positive, colour views (brightness, contrast, blur,
        # solarisation on grey), the milder crops of the pretraining, the class token (kNN 0.942 against 0.922 for
        # avg at equal cost), every block tuned at a high lr, 2 + 6 epochs: 23% of the pretraining's CPU time.
        contrastive=ContrastiveConfig(
            augment="colour", crop_scale=(0.35, 1.0), hflip=0.0, pooling="token", proj_hidden_dim=512,
            pred_hidden_dim=1024, output_dim=128, queue_size=4096, temperature=0.1, topk=1, frozen_blocks=0,
            head_epochs=2, epochs=6, batch_size=64, blr=1e-3, head_blr=1e-3,
        ),
    )


# ----------------------------------------------------------------------------------------------- plumbing


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise UsageError(f"unknown config keys {sorted(prefix + k for k in unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _assign(obj: Any, path: list[str], raw: str, full_key: str) -> Any:
    name = path[0]
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        import difflib

        every = _leaf_keys(Config)
        section = full_key.rsplit(".", 1)[0] + "."
        valid = [k for k in every if k.startswith(section)] or every
        close = difflib.get_close_matches(full_key, every, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"unknown config key {full_key!r}{hint}; valid keys: {', '.join(valid)}")
    hints = typing.get_type_hints(type(obj))
    current = getattr(obj, name)
    if len(path) > 1:
        return dataclasses.replace(obj, **{name: _assign(current, path[1:], raw, full_key)})
    if dataclasses.is_dataclass(current):
        first = dataclasses.fields(current)[0].name
        raise UsageError(f"{full_key!r} is a section; set one of its keys, e.g. {full_key}.{first}=...")
    return dataclasses.replace(obj, **{name: _coerce(_parse(raw), hints[name], full_key)})


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _leaf_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _parse(raw: str) -> Any:
    """JSON when it parses (numbers, true/false/null, lists), else a comma list, else the string itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        if raw.lower() in ("none", "null"):
            return None
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        if "," in raw:
            return [_parse(part.strip()) for part in raw.split(",")]
        return raw


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value] * (len(args) if args and args[-1] is not Ellipsis else 1)
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise UsageError(f"{key} expects {len(args)} values, got {list(value)}")
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{key} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise UsageError(f"{key} expects an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{key} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"{key} expects a string, got {value!r}")
        return value
    return value
