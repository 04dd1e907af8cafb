"""The exported files of an artifact and the backends that run them: the one table every consumer reads.

``mae export`` writes the files, ``Embedder`` (export.runtime) loads a backend from this registry, and the CLI
and the serving settings take their ``--backend`` choices from it. Adding a format means one row here, its
export function and its backend class; nothing else names a file or a backend.

This module imports nothing heavy, so the CLI can read it while staying instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mae.artifact_config import ArtifactError

# File names inside ARTIFACT/ (beside config.json and model.safetensors). A key is also the entry under
# config.json's ``export`` that records how the file was made and how close it came to PyTorch.
FILES = {
    "onnx": "encoder.onnx",
    "onnx_fp16": "encoder.fp16.onnx",
    "onnx_int8": "encoder.int8.onnx",
    "tensorrt": "encoder.plan",
    "tensorrt_sidecar": "encoder.plan.json",
    "tensorrt_timing_cache": "tensorrt.timing.cache",
    "inductor": "encoder.pt2",
    "inductor_sidecar": "encoder.pt2.json",
}
ONNX_PRECISIONS = ("fp32", "fp16", "int8")
# Metadata every exported file carries: the sha256 of the artifact it was made from, and its precision.
META_SHA = "mae.artifact_sha256"
META_PRECISION = "mae.precision"
TENSORRT_PRECISIONS = ("fp16", "bf16", "fp32")
INDUCTOR_PRECISIONS = ("fp32", "bf16")


def onnx_key(precision: str) -> str:
    """The FILES / record key of an ONNX precision: fp32 -> onnx, fp16 -> onnx_fp16, int8 -> onnx_int8."""
    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"ONNX precision must be one of {ONNX_PRECISIONS}, got {precision!r}")
    return "onnx" if precision == "fp32" else f"onnx_{precision}"


def onnx_file(path: str | Path, precision: str) -> Path:
    return Path(path) / FILES[onnx_key(precision)]


class BackendUnavailable(RuntimeError):
    """A backend that cannot run here (no file, no library, no GPU); the message says which and why."""


class Backend(Protocol):
    """What ``Embedder`` drives: preprocessed pixels in, outputs out, on whatever device the backend chose."""

    name: str

    def run(self, pixels: Any) -> dict[str, Any]:
        """pixels float32 (N, C, H, W), already preprocessed -> {"embedding": (N, D), "logits": (N, K)?} (numpy)."""
        ...


@dataclass(frozen=True)
class BackendSpec:
    """A row of the registry.

    ``loader`` names a class ``Class(path, config, device=None, precision=None)`` that raises
    ``BackendUnavailable`` when it cannot run, and whose static ``unavailable(path, config, device, precision)``
    answers the same question cheaply (``None`` when it can run) so that ``auto`` can skip it without loading.
    """

    name: str
    loader: str
    files: tuple[str, ...]
    """FILES keys this backend runs from (none: it runs the artifact's own weights)."""
    summary: str


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("tensorrt", "export.tensorrt:TensorRTBackend", ("tensorrt",),
                    "TensorRT engine built for this GPU and TensorRT version (mae export --tensorrt)"),
        BackendSpec("inductor", "export.inductor:InductorBackend", ("inductor",),
                    "AOTInductor package compiled for this torch and device (mae export --inductor)"),
        BackendSpec("onnx", "export.runtime:OnnxBackend", ("onnx", "onnx_fp16", "onnx_int8"),
                    "onnxruntime, CUDA provider on a GPU, else CPU (mae export --onnx / --fp16 / --int8)"),
        BackendSpec("torch", "export.runtime:TorchBackend", (),
                    "eager PyTorch on the artifact's weights: the reference every other backend is checked against"),
    )
}
BACKEND_CHOICES = ("auto", *BACKENDS)
AUTO_ORDER = {
    "cuda": ("tensorrt", "inductor", "onnx", "torch"),
    # On CPUs onnxruntime beat the CPU package through the Embedder in 7 of 9 measurements (bench/device.py
    # --dry-run, a small ViT), so it comes first there; a package still beats eager torch.
    "cpu": ("onnx", "inductor", "torch"),
}
"""What ``backend="auto"`` tries, in order, on each kind of device: the first that can run wins."""


def require_made_from(recorded: str | None, config: dict[str, Any], file: Path, remedy: str) -> None:
    """Refuse an exported file that was not made from these weights (stale after a re-export)."""
    if recorded is None:
        raise ArtifactError(f"{file} carries no artifact stamp (damaged, or not written by mae export); {remedy}")
    if recorded != config["sha256"]:
        raise ArtifactError(
            f"{file} was exported from other weights (artifact sha256 {str(recorded)[:12]}, this artifact is "
            f"{config['sha256'][:12]}); {remedy}")
