"""Tiny artifacts for the export and runtime tests (depth 2, 32 px), exported once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

from mae import artifact
from mae.config import get_preset

LABELS = [f"class{i}" for i in range(10)]
PARITY_IMAGES = 48


def export_config():
    cfg = get_preset("mae_vit_tiny_patch4_32")
    return cfg.override(["model.depth=2", "model.decoder_depth=1"])


def make_artifact(out: Path, head: bool) -> Path:
    """A random-init encoder artifact; with ``head``, a finetuned-style one (avg pooling, fc_norm, 10 labels)."""
    # A spread head (std 0.5) makes top-1 a real decision for the int8 agreement check.
    return artifact.from_random_init(out, export_config(), labels=LABELS if head else None, seed=int(head),
                                     head_std=0.5)


def exported(tmp_path_factory, name: str) -> Path:
    """Session cache: "plain" (fp32 + fp16 + int8 + tokens) and "head" (fp32 + int8) exported artifacts."""
    from export.onnx import export_onnx

    root = tmp_path_factory.getbasetemp() / "export-cache"
    path = root / name
    if (root / f"{name}.done").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    make_artifact(path, head=name == "head")
    if name == "head":
        export_onnx(path, int8=True, parity_images=PARITY_IMAGES)
    else:
        export_onnx(path, fp16=True, int8=True, tokens=True, parity_images=PARITY_IMAGES)
    (root / f"{name}.done").write_text("")
    return path


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
