"""Training checkpoints and foreign weights.

A training checkpoint is ``{"model", "optimizer", "scaler", "step", "epoch", "config", "format": 1}`` holding
tensors and primitives only, so ``torch.load(path, weights_only=True)`` opens it without running any pickle code.
It is written to a temporary file in the same folder and renamed into place, so a crash never leaves a torn file.

Bytes can still rot or be overwritten afterwards, and a few damaged bytes inside a tensor unpickle without any
error (64 overwritten bytes once put NaN into an optimizer state, and export, evaluate and resume all carried on).
So each checkpoint also holds ``checksum``: a sha256 over every tensor's bytes, dtype and shape and every other
value, computed when it is written and checked whenever it is read; and no weight or optimizer state may be NaN
or infinite. Checkpoints written before the checksum existed still load (only the finite check applies).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mae.errors import UserError
from mae.files import atomic_path

FORMAT = 1
CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "config", "format", "checksum")
CHECKSUM_KEY = "checksum"
CHECKSUM_SCHEME = "sha256-tree-v1"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable or not what the caller expects."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    missing = [k for k in ("model", "step", "config") if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    state = {"format": FORMAT, **{k: v for k, v in state.items() if k != CHECKSUM_KEY}}
    state[CHECKSUM_KEY] = f"{CHECKSUM_SCHEME}:{state_checksum(state)}"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def state_checksum(state: dict[str, Any]) -> str:
    """sha256 over a checkpoint's contents (all but its ``checksum``): each value with its place in the tree,
    tensors as dtype, shape and raw bytes. Dict order is part of it: pickling keeps insertion order."""
    h = hashlib.sha256()
    for name, value in _leaves({k: v for k, v in state.items() if k != CHECKSUM_KEY}):
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{name}\0T{t.dtype}{tuple(value.shape)}\0".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy().data)
        else:
            h.update(f"{name}\0{type(value).__name__}\0{value!r}\0".encode())
    return h.hexdigest()


def _leaves(value: Any, name: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every tensor and primitive in nested dicts, lists and tuples, in order."""
    if isinstance(value, dict):
        yield f"{name}{{}}", len(value)
        for k, v in value.items():
            yield from _leaves(v, f"{name}.{k}" if name else str(k))
    elif isinstance(value, (list, tuple)):
        yield f"{name}[]", len(value)
        for i, v in enumerate(value):
            yield from _leaves(v, f"{name}.{i}")
    else:
        yield name, value


def check_integrity(path: Path, state: dict[str, Any]) -> None:
    """Refuse a checkpoint whose contents differ from its checksum, or that holds a NaN or infinite tensor.

    Raises ``CheckpointError`` naming the file and, for non-finite values, the tensors (``optimizer.state.3.
    exp_avg``): the file is damaged, or the run diverged before it was written; either way it must not be
    exported, evaluated or resumed from.
    """
    recorded = state.get(CHECKSUM_KEY)
    if recorded is not None:
        scheme, _, digest = str(recorded).partition(":")
        if scheme != CHECKSUM_SCHEME:
            raise CheckpointError(f"{path} has a checksum of unknown scheme {scheme!r}; this version knows "
                                  f"{CHECKSUM_SCHEME}")
        actual = state_checksum(state)
        if actual != digest:
            raise CheckpointError(f"{path} is damaged: its contents hash to {actual[:12]}, not the {digest[:12]} "
                                  "recorded when it was written; use an earlier checkpoint or retrain")
    bad = [f"{name} ({int((~torch.isfinite(v)).sum())} of {v.numel()})" for name, v in _leaves(state)
           if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
           and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise CheckpointError(f"{path} holds NaN or infinite values in {shown}: the file is damaged or the run had "
                              "diverged when it was written; use an earlier checkpoint")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Open one of our training checkpoints with ``weights_only=True``; a clear error names what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or a pickle that weights_only refuses
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {_first_line(e)}); the file is "
                              "damaged or not a checkpoint") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint of this project (no 'model'/'config')")
    if not isinstance(ckpt.get("format", FORMAT), int) or ckpt.get("format", FORMAT) > FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['format']!r}; this version reads up to {FORMAT}")
    check_integrity(path, ckpt)
    return ckpt


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Weights from any supported file: ours, official MAE ``.pth``, timm/HF ``.safetensors`` or ``.bin``.

    Returns (state dict under timm keys, our config dict or None for foreign files). Official files wrap the
    weights in ``{"model": ...}``; DDP-saved ones prefix ``module.``; both are unwrapped here.
    """
    state, config, _ = load_weights_and_meta(path)
    return state, config


def load_weights_and_meta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """``load_weights`` plus the file's other top-level entries that are not tensors (e.g. a finetuned
    checkpoint's ``labels``), read in the same pass so that a large checkpoint is opened once.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / n for n in ("checkpoint.pt", "model.safetensors", "pytorch_model.bin")]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise CheckpointError(f"{path} holds none of {[c.name for c in candidates]}")
        path = found[0]
    if not path.exists():
        raise CheckpointError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as e:  # SafetensorError (header, sizes) or OSError; no pickle is involved
            raise CheckpointError(f"cannot read {path} as safetensors ({type(e).__name__}: {_first_line(e)})") from e
        check_integrity(path, tensors)
        return _strip_prefix(tensors), None, {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path} with weights_only=True ({type(e).__name__}: {_first_line(e)}). Files that need "
            "arbitrary pickles are refused; the official MAE releases load fine."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    check_integrity(path, obj)
    config = obj.get("config") if isinstance(obj.get("config"), dict) else None
    meta = {k: v for k, v in obj.items()
            if k not in ("model", "state_dict", "model_state", "optimizer", "scaler", "config", CHECKSUM_KEY)
            and not isinstance(v, (torch.Tensor, dict))}
    for key in ("model", "state_dict", "model_state"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    return _strip_prefix(state), config, meta


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message: torch's unpickler errors run to a dozen lines of advice."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if "vit.embeddings.cls_token" in state:
        state = from_hf_vitmae(state)
    return state


# Hugging Face ViTMAE names (both the transformers 4.x and the 5.x layouts) -> official/timm names.
_HF_BLOCK = {
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_HF_FIXED = {
    "vit.embeddings.cls_token": "cls_token", "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "vit.layernorm.weight": "norm.weight", "vit.layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token", "decoder.decoder_pos_embed": "decoder_pos_embed",
}


def from_hf_vitmae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``ViTMAEForPreTraining``/``ViTMAEModel`` state dict to the official layout.

    HF keeps separate query/key/value projections; timm fuses them into one ``qkv`` in (q, k, v) order.
    """
    import re

    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    pattern = re.compile(r"^(?:vit\.encoder\.layer|vit\.layers|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in state.items():
        if key in _HF_FIXED:
            out[_HF_FIXED[key]] = value
            continue
        m = pattern.match(key)
        if m:
            index, inner, kind = m.groups()
            prefix = "decoder_blocks" if key.startswith("decoder.") else "blocks"
            target = _HF_BLOCK.get(inner)
            if target is None:
                raise CheckpointError(f"unrecognised Hugging Face ViTMAE key {key!r}")
            if target in ("q", "k", "v"):
                qkv.setdefault((f"{prefix}.{index}.attn.qkv", kind), {})[target] = value
            else:
                out[f"{prefix}.{index}.{target}.{kind}"] = value
        elif key.startswith("decoder."):
            out[key[len("decoder."):]] = value  # decoder_embed, decoder_norm, decoder_pred
        else:
            raise CheckpointError(f"unrecognised Hugging Face ViTMAE key {key!r}")
    for (name, kind), parts in qkv.items():
        out[f"{name}.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
