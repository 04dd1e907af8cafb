"""The encoder artifact: what every consumer (export, retrieval, serving) loads. Never a pickle.

```
ARTIFACT/config.json        model (timm VisionTransformer kwargs), preprocessing, pooling, embed_dim, labels,
                            source checkpoint sha256, versions, sha256 of the artifact, export parity figures
ARTIFACT/model.safetensors  encoder (+ fc_norm and head when finetuned) under timm's key names
```

The weights are a plain timm ``VisionTransformer`` state dict, so
``timm.create_model(config["timm"]["model_name"], pretrained=True, pretrained_cfg_overlay=dict(
file=".../model.safetensors", **config["timm"]["pretrained_cfg_overlay"]), **config["timm"]["kwargs"])``
loads them too (no network: the file is local).
An embedding is the pooled feature (``forward_head(pre_logits=True)``), L2-normalised.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mae
from mae.artifact_config import (  # noqa: F401  (re-exported: the names consumers import from mae.artifact)
    CONFIG,
    FORMAT,
    POOLINGS,
    WEIGHTS,
    ArtifactConfig,
    ArtifactError,
    ArtifactSource,
    content_sha256,
    read_config,
    verify_weights,
    write_config,
)
from mae.config import Config
from mae.files import sha256_file
from mae.images import Preprocessing

# A pretrained (not finetuned) encoder's embedding: the mean of the final-normed patch tokens. The MAE loss never
# reaches the class token except through the decoder's attention, which has the patch tokens too, while every
# patch token must carry what its masked neighbours need; so avg is the safer default early in training and for
# probing (bench/quality.py measures both; README "Finetune, linear probe, evaluate" has the figures).
# ``mae export --pooling token`` picks the other.
DEFAULT_PRETRAINED_POOLING = "avg"


class Encoder(nn.Module):
    """A timm ViT that returns the L2-normalised embedding (N, D) and, with a head, logits (N, K).

    This is the exact graph every backend runs (torch eager, ONNX, TensorRT, AOTInductor): no masking, no randomness.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.has_head = isinstance(vit.head, nn.Linear)

    def forward(self, pixels: torch.Tensor, return_tokens: bool = False) -> tuple[torch.Tensor, ...]:
        """(embedding (N, D), logits (N, K) with a head, patch tokens (N, L, D) when ``return_tokens``)."""
        tokens = self.vit.forward_features(pixels)  # (N, 1 + L, D)
        pooled = self.vit.forward_head(tokens, pre_logits=True)  # (N, D)
        outputs = (F.normalize(pooled.float(), dim=-1),)
        if self.has_head:
            outputs += (self.vit.head(pooled).float(),)
        if return_tokens:  # dense use (one pass, not a second forward): spatial row-major order
            outputs += (tokens[:, self.vit.num_prefix_tokens :].float(),)
        return outputs

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens in spatial (row-major) order after the final norm: (N, L, D)."""
        return self.vit.forward_features(pixels)[:, self.vit.num_prefix_tokens :]


def vit_kwargs(model_cfg: Mapping[str, Any], pooling: str, fc_norm: bool, num_classes: int) -> dict[str, Any]:
    """timm ``VisionTransformer`` keyword arguments for an MAE encoder config (the dict form of ModelConfig)."""
    if pooling not in POOLINGS:
        raise ArtifactError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return {
        "img_size": list(model_cfg["img_size"]),
        "patch_size": model_cfg["patch_size"],
        "in_chans": model_cfg["in_chans"],
        "embed_dim": model_cfg["embed_dim"],
        "depth": model_cfg["depth"],
        "num_heads": model_cfg["num_heads"],
        "mlp_ratio": model_cfg["mlp_ratio"],
        "qkv_bias": True,
        "global_pool": pooling,
        "fc_norm": fc_norm,
        "num_classes": num_classes,
    }


def timm_overlay(preprocessing: Preprocessing, num_classes: int) -> dict[str, Any]:
    """``pretrained_cfg_overlay`` for ``timm.create_model`` (add ``file=ARTIFACT/model.safetensors``).

    ``num_classes`` must be in it: timm drops a checkpoint's head when the pretrained config's class count
    (1000 for the ViT-B name we borrow) differs from the model's. The preprocessing entries let
    ``timm.data.resolve_data_config`` build the same eval transform.
    """
    return {"num_classes": num_classes, "input_size": list(preprocessing.input_size),
            "mean": list(preprocessing.mean), "std": list(preprocessing.std),
            "interpolation": preprocessing.interpolation, "crop_pct": preprocessing.crop_pct}


def build_vit(kwargs: dict[str, Any]) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(kwargs)
    kw["img_size"] = tuple(kw["img_size"])
    return VisionTransformer(**kw, norm_layer=partial(nn.LayerNorm, eps=1e-6))


@dataclass
class Artifact:
    """A loaded artifact: the torch encoder plus everything needed to feed it and interpret its outputs."""

    path: Path
    config: ArtifactConfig
    encoder: Encoder

    @property
    def preprocessing(self) -> Preprocessing:
        return self.config.preprocessing

    @property
    def sha256(self) -> str:
        return self.config.sha256

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def labels(self) -> list[str] | None:
        return list(self.config.labels) if self.config.labels else None

    @property
    def pooling(self) -> str:
        return self.config.pooling


def save(
    out: str | Path,
    state: dict[str, torch.Tensor],
    *,
    model_cfg: dict[str, Any],
    preprocessing: Preprocessing,
    pooling: str,
    fc_norm: bool = False,
    labels: list[str] | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write config.json + model.safetensors. ``state`` is a timm ViT state dict (decoder keys are dropped)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    num_classes = len(labels) if labels else 0
    kwargs = vit_kwargs(model_cfg, pooling, fc_norm, num_classes)
    vit = build_vit(kwargs)
    wanted = vit.state_dict()
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items() if k in wanted}
    missing = sorted(set(wanted) - set(weights))
    if missing:
        raise ArtifactError(f"the weights lack {missing[:6]} for a {pooling}-pooled encoder"
                            f"{' with a head' if num_classes else ''}")
    vit.load_state_dict(weights, strict=True)  # shapes checked here, before anything is written
    save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    config = {
        "format": FORMAT,
        "model": dict(model_cfg, img_size=list(model_cfg["img_size"])),
        "timm": {"model_name": "vit_base_patch16_224", "kwargs": kwargs,
                 "pretrained_cfg_overlay": timm_overlay(preprocessing, num_classes)},
        "preprocessing": preprocessing.to_dict(),
        "pooling": pooling,
        "fc_norm": fc_norm,
        "embed_dim": model_cfg["embed_dim"],
        "labels": list(labels) if labels else None,
        "source": source or {},
        "versions": versions(),
    }
    config["sha256"] = content_sha256(out / WEIGHTS, config)
    write_config(out, config)
    return out


def load(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Artifact:
    """Rebuild the encoder from an artifact folder; every inconsistency is an ArtifactError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = verify_weights(path) if verify else read_config(path)
    try:
        weights = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path / WEIGHTS} is not readable safetensors ({e})") from e
    vit = build_vit(artifact_vit_kwargs(path, config))
    try:
        result = vit.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ArtifactError(f"{WEIGHTS} does not match {CONFIG}: {e}") from e
    problems = [f"missing {result.missing_keys[:4]}" if result.missing_keys else "",
                f"unexpected {result.unexpected_keys[:4]}" if result.unexpected_keys else ""]
    if any(problems):
        raise ArtifactError(f"{WEIGHTS} does not match {CONFIG}: {' '.join(p for p in problems if p)}")
    encoder = Encoder(vit).eval().to(device)
    return Artifact(path, config, encoder)


def artifact_vit_kwargs(path: Path, config: ArtifactConfig) -> dict[str, Any]:
    """The ViT an artifact's weights belong to, built from the fields its sha256 covers (model, pooling, fc_norm,
    labels). The ``timm`` section repeats them for ``timm.create_model``; one that disagrees is refused."""
    try:
        kwargs = vit_kwargs(config.model, config.pooling, config.fc_norm, config.num_classes)
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{path / CONFIG}: its model section is incomplete ({e})") from e
    timm_kwargs = config.timm.get("kwargs")
    if timm_kwargs != kwargs:
        raise ArtifactError(f"{path / CONFIG}: its timm section disagrees with its model, pooling and labels "
                            f"(timm {timm_kwargs}, expected {kwargs}); re-export the artifact")
    return kwargs


@dataclass
class CheckpointEncoder:
    """What an artifact is made of, read from a checkpoint: weights plus the facts that give them meaning."""

    state: dict[str, torch.Tensor]
    """timm ``VisionTransformer`` state dict (a linear probe's BatchNorm already folded into ``head``)."""
    model_cfg: dict[str, Any]
    preprocessing: Preprocessing
    pooling: str
    fc_norm: bool
    labels: list[str] | None
    source: dict[str, Any]
    """config.json's ``source``: {"checkpoint": absolute path, "sha256": of its bytes} (``ArtifactSource``)."""
    config: dict[str, Any] | None = None
    """The training config saved in our checkpoints (None for foreign weights)."""

    def build(self, device: str | torch.device = "cpu") -> Encoder:
        """The in-memory Encoder these weights define (what ``load`` returns after ``save``)."""
        return build_encoder(self.state, self.model_cfg, self.pooling, self.fc_norm, len(self.labels or [])
                             ).to(device)


def build_encoder(state: dict[str, torch.Tensor], model_cfg: dict[str, Any], pooling: str, fc_norm: bool = False,
                  num_classes: int = 0) -> Encoder:
    """An eval-mode Encoder from a timm-keyed state dict (an MAE's extra decoder keys are ignored)."""
    vit = build_vit(vit_kwargs(model_cfg, pooling, fc_norm, num_classes))
    vit.load_state_dict({k: v for k, v in state.items() if k in vit.state_dict()}, strict=True)
    return Encoder(vit).eval()


def read_checkpoint(checkpoint: str | Path, pooling: str | None = None) -> CheckpointEncoder:
    """Read a pretraining, finetuning or linear-probe checkpoint (ours), or official / timm weights.

    Pooling defaults to what the weights were trained for: a classifier keeps the pooling its head was
    trained on (avg + fc_norm, or the class token for a token finetune or a linear probe); a pretrained
    encoder defaults to ``DEFAULT_PRETRAINED_POOLING`` (see there for why). A linear probe's
    BatchNorm1d(affine=False) is folded into its Linear, so every head is one Linear over the pooled feature.
    Foreign files carry no preprocessing, so they get the ImageNet recipe at their native resolution.
    """
    from mae.checkpoint import load_weights_and_meta
    from mae.config import DataConfig
    from mae.model import infer_model_config

    state, saved, meta = load_weights_and_meta(checkpoint)
    state = fold_probe_head(state)
    if saved:
        sections = ("model", "data", "optim", "run", "finetune", "preset")
        cfg = Config.from_dict({k: v for k, v in saved.items() if k in sections})
        model_cfg, preprocessing = cfg.model, Preprocessing.from_config(cfg)
    else:
        model_cfg = infer_model_config(state)
        preprocessing = Preprocessing.from_config(Config(model=model_cfg, data=DataConfig()))
    fc_norm = "fc_norm.weight" in state
    has_head = "head.weight" in state
    if has_head:
        # Our finetune checkpoints record it; official ones have one of two layouts: avg + fc_norm, token + norm.
        trained = meta.get("pooling") or _pooling_of_older_run(saved, meta.get("task")) or (
            "avg" if fc_norm else "token")
        if pooling is not None and pooling != trained:
            raise ArtifactError(f"{checkpoint}: its classification head was trained on {trained} pooling; "
                                f"--pooling {pooling} would feed it features it has never seen")
        pooling = trained
        labels = meta.get("labels") or (saved or {}).get("labels")
        num_classes = state["head.weight"].shape[0]
        if not labels:
            labels = [str(i) for i in range(num_classes)]
        if len(labels) != num_classes:
            raise ArtifactError(f"{checkpoint}: {len(labels)} label names for a head of {num_classes} classes")
    else:  # a pretrained encoder, or a contrastive one (which records the pooling it was tuned for)
        pooling = pooling or meta.get("pooling") or DEFAULT_PRETRAINED_POOLING
        labels = None
    if pooling == "avg" and not fc_norm and "norm.weight" not in state:
        raise ArtifactError(f"{checkpoint}: neither norm nor fc_norm weights; not a complete ViT encoder")
    recipe = None
    if meta.get("task") == "contrastive" and saved:  # how the embedding was trained (mae finetune --contrastive)
        recipe = {"task": "contrastive", "stage": meta.get("stage"), **saved.get("contrastive", {})}
    source = ArtifactSource(str(Path(checkpoint).resolve()), sha256_file(weights_file(checkpoint)), recipe).to_dict()
    return CheckpointEncoder(state, dataclasses.asdict(model_cfg), preprocessing, pooling, fc_norm,
                             list(labels) if labels else None, source, saved)


def _pooling_of_older_run(saved: dict[str, Any] | None, task: str | None) -> str | None:
    """Checkpoints written before ``pooling`` was saved: the recipe field the run read it from."""
    if saved and "finetune" in saved and task in ("finetune", "linear_probe"):
        return saved["finetune"]["global_pool" if task == "finetune" else "probe_pool"]
    return None


def from_random_init(out: str | Path, cfg: Config, *, labels: list[str] | None = None, seed: int = 0,
                     head_std: float = 2e-5) -> Path:
    """The artifact of an untrained encoder (a Config's model, the MAE's official init): what benchmarks time and
    plumbing tests load. With ``labels``: avg pooling + a fresh fc_norm + a head drawn from N(0, head_std) (the
    official finetune init is 2e-5, which ties every logit; pass more to make top-k orders meaningful)."""
    from mae.model import MaskedAutoencoder

    model_cfg = dataclasses.asdict(cfg.model)
    pooling, fc_norm = ("avg", True) if labels else ("token", False)
    torch.manual_seed(seed)
    encoder = MaskedAutoencoder(cfg.model).encoder_state_dict()
    vit = build_vit(vit_kwargs(model_cfg, pooling, fc_norm, len(labels or [])))
    vit.load_state_dict({k: v for k, v in encoder.items() if k in vit.state_dict()}, strict=False)
    if labels:
        with torch.no_grad():
            nn.init.normal_(vit.head.weight, std=head_std)
            nn.init.zeros_(vit.head.bias)
    return save(out, vit.state_dict(), model_cfg=model_cfg, preprocessing=Preprocessing.from_config(cfg),
                pooling=pooling, fc_norm=fc_norm, labels=labels)


def from_checkpoint(checkpoint: str | Path, out: str | Path, pooling: str | None = None) -> Path:
    """Write the artifact of a training checkpoint (ours) or of official / timm MAE weights (see read_checkpoint)."""
    info = read_checkpoint(checkpoint, pooling)
    return save(out, info.state, model_cfg=info.model_cfg, preprocessing=info.preprocessing, pooling=info.pooling,
                fc_norm=info.fc_norm, labels=info.labels, source=info.source)


def fold_probe_head(state: dict[str, torch.Tensor], eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """Fold a linear probe's ``head = Sequential(BatchNorm1d(affine=False), Linear)`` into one ``head`` Linear.

    BN in eval mode is ``(x - mean) / sqrt(var + eps)``, so ``W (x - m) / s + b = (W / s) x + (b - (W / s) m)``:
    exact up to float rounding, and the artifact keeps timm's plain ``head.weight/bias`` layout. Other state
    dicts pass through unchanged. ``eps`` is the official probe's 1e-6.
    """
    if "head.0.running_mean" not in state or "head.1.weight" not in state:
        return state
    if "head.0.weight" in state:
        raise ArtifactError("the probe head's BatchNorm has affine parameters; expected BatchNorm1d(affine=False)")
    mean = state["head.0.running_mean"].double()
    scale = (state["head.0.running_var"].double() + eps).rsqrt()  # (D,)
    weight = state["head.1.weight"].double() * scale  # (K, D)
    bias = state["head.1.bias"].double() - weight @ mean  # (K,)
    out = {k: v for k, v in state.items() if not k.startswith("head.")}
    out["head.weight"], out["head.bias"] = weight.float(), bias.float()
    return out


def weights_file(path: str | Path) -> Path:
    """The file a checkpoint path names: RUN/checkpoint.pt for a run folder, else the path itself."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def versions() -> dict[str, str]:
    import timm

    return {"mae": mae.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}
