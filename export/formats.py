"""The exported formats of an artifact and the backends that run them: one row per format, the table every consumer
reads.

A row (``Format``) is everything the rest of the project knows about a format: its ``--backend`` name, the class
that runs it, the files it writes into ARTIFACT/, its precisions and their parity tolerances, where ``auto`` tries it
on each kind of device, the function ``mae export`` calls and that command's flags for it. ``mae export`` and
``mae embed`` take their flags and choices from here (``export.command``), ``Embedder`` loads backends from here
(``export.runtime``), ``export.parity`` judges files with these tolerances, ``verify_artifact`` runs each row's
check, and the serving settings take their ``backend`` choices from here.

Adding a format is one module (its exporter and its backend class) and one row in ``FORMATS``;
``tests/test_formats.py`` checks that every name a row gives resolves.

This module imports nothing heavy, so the CLI can read it while staying instant.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mae.artifact_config import ArtifactConfig, ArtifactError
from mae.errors import UsageError, UserError

# Metadata every exported file carries: the sha256 of the artifact it was made from, and its precision.
META_SHA = "mae.artifact_sha256"
META_PRECISION = "mae.precision"


class BackendUnavailable(UserError, RuntimeError):
    """A backend that cannot run here (no file, no library, no GPU); the message says which and why."""


class ExportError(UserError, RuntimeError):
    """An exporter produced no usable file (bad shapes, random ops, checker failure, a batch baked in)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file an export or a run needs is not there (the message names it and what writes it)."""


class Backend(Protocol):
    """What ``Embedder`` drives: preprocessed pixels in, outputs out, on whatever device the backend chose.

    The class a row names is built as ``Class(path, config, device=None, precision=None)`` (raising
    ``BackendUnavailable`` when it cannot run) and has a static ``unavailable(path, config, device, precision)``
    that answers the same question cheaply (``None`` when it can run), so that ``auto`` can skip it without loading.
    """

    name: str

    def run(self, pixels: Any) -> dict[str, Any]:
        """pixels float32 (N, C, H, W), already preprocessed -> {"embedding": (N, D), "logits": (N, K)?} (numpy)."""
        ...


@dataclass(frozen=True)
class Flag:
    """A ``mae export`` flag of a format: ``argparse.add_argument(name, help=help, **options)``."""

    name: str
    help: str
    options: Mapping[str, Any] = field(default_factory=dict)
    asks: bool = False
    """Setting it asks for the format's export (``--onnx``, ``--int8``, ...), rather than tuning one."""

    @property
    def dest(self) -> str:
        """The attribute argparse stores it under."""
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Format:
    """A row of the registry: one exported format and the backend that runs it (``torch``: the weights themselves)."""

    name: str
    """The ``--backend`` name (``mae embed``, ``mae search``, ``mae serve``, ``Embedder.load``)."""
    title: str
    """What people call it, in messages."""
    summary: str
    """One line for people: what runs it, and the command that makes its files."""
    backend: str
    """"module:Class" that runs it (see ``Backend``); imported on first use."""
    files: Mapping[str, str] = field(default_factory=dict)
    """FILES key -> file name in ARTIFACT/ (none: it runs the artifact's own weights). The key of a file that is
    judged against PyTorch is also its record's key under config.json's ``export``."""
    precisions: tuple[str, ...] = ()
    """Precisions it can be exported in; ``--precision`` at run time picks among them."""
    tolerances: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """precision -> the parity a file of that precision must reach: minimum cosine with PyTorch fp32 (every image,
    every output) and the top-1 agreement of a head it must not be shown to fall below (``export.parity``)."""
    auto: Mapping[str, int] = field(default_factory=dict)
    """Device kind ("cuda", "cpu") -> its place in what ``backend="auto"`` tries there (lower first); absent: never
    tried there."""
    exporter: str | None = None
    """"module:function(path, args, data) -> (export records, summary lines)": what ``mae export`` runs when one
    of the ``asks`` flags is set (``data``: the parity image sources). None: nothing to export."""
    preflight: str | None = None
    """"module:function() -> reason or None": why it cannot be exported here, asked before anything is written."""
    verifier: str | None = None
    """"module:function(path, config)": checks its files before a long-running consumer starts (``mae serve``);
    raises ArtifactError naming the first bad one. Hashes recorded at parity are checked for every format."""
    flags: tuple[Flag, ...] = ()
    """Its ``mae export`` flags (``export.command.add_export_arguments``); an ``asks`` one selects it."""
    needs: tuple[str, ...] = ()
    """Formats exported first whenever this one is (TensorRT builds its engine from the ONNX file)."""

    def tolerance_key(self, precision: str) -> str:
        """The key of ``TOLERANCES`` for a file of this format in ``precision``."""
        return f"{self.name}_{precision}"


def _switch(name: str, help: str) -> Flag:
    return Flag(name, help, {"action": "store_true"}, asks=True)


# fp16 and bf16 engines/packages keep LayerNorm in fp32; TensorRT fp32 may use TF32 matmuls, and inductor reorders
# reductions (on GPUs it may pick other matmul kernels), hence 0.9999 where the ONNX fp32 file reaches 0.99999.
FORMATS: tuple[Format, ...] = (
    Format("tensorrt", "TensorRT", "TensorRT engine built for this GPU and TensorRT version (mae export --tensorrt)",
           backend="export.tensorrt:TensorRTBackend",
           files={"tensorrt": "encoder.plan", "tensorrt_sidecar": "encoder.plan.json",
                  "tensorrt_timing_cache": "tensorrt.timing.cache"},
           precisions=("fp16", "bf16", "fp32"),
           tolerances={"fp32": {"cosine": 0.9999, "top1_agreement": 0.99},
                       "fp16": {"cosine": 0.999, "top1_agreement": 0.99},
                       "bf16": {"cosine": 0.99, "top1_agreement": 0.99}},
           auto={"cuda": 10},
           exporter="export.tensorrt:export_from_args", preflight="export.tensorrt:unavailable_reason",
           verifier="export.tensorrt:verify",
           flags=(_switch("--tensorrt", "encoder.plan for this GPU (implies --onnx); needs CUDA and tensorrt"),
                  Flag("--trt-precision", "TensorRT precision (bf16 only with TensorRT 10)",
                       {"choices": ("fp16", "bf16", "fp32"), "default": "fp16"}),
                  Flag("--batch-min", "TensorRT profile: smallest batch", {"type": int, "default": 1}),
                  Flag("--batch-opt", "TensorRT profile: batch the kernels are tuned for",
                       {"type": int, "default": 32}),
                  Flag("--timing-cache", "TensorRT timing cache file (default: ARTIFACT/tensorrt.timing.cache)")),
           needs=("onnx",)),
    Format("inductor", "AOTInductor",
           "AOTInductor package compiled for this torch and device (mae export --inductor)",
           backend="export.inductor:InductorBackend",
           files={"inductor": "encoder.pt2", "inductor_sidecar": "encoder.pt2.json"},
           precisions=("fp32", "bf16"),
           tolerances={"fp32": {"cosine": 0.9999, "top1_agreement": 0.99},
                       "bf16": {"cosine": 0.99, "top1_agreement": 0.99}},
           # On CPUs onnxruntime beat the CPU package through the Embedder in 7 of 9 measurements (bench/device
           # --dry-run, a small ViT), so it comes first there; a package still beats eager torch.
           auto={"cuda": 20, "cpu": 20},
           exporter="export.inductor:export_from_args", preflight="export.inductor:unavailable_reason",
           flags=(_switch("--inductor", "encoder.pt2: AOTInductor-compiled for this torch version and device (the "
                                        "GPU when there is one), dynamic batch 1..--batch-max"),
                  Flag("--inductor-device", "device encoder.pt2 is compiled for (default: cuda when a GPU is visible)",
                       {"choices": ("cuda", "cpu")}),
                  Flag("--inductor-precision", "encoder.pt2 precision (default: bf16 on cuda, fp32 on cpu)",
                       {"choices": ("fp32", "bf16")}))),
    Format("onnx", "ONNX", "onnxruntime, CUDA provider on a GPU, else CPU (mae export --onnx / --fp16 / --int8)",
           backend="export.runtime:OnnxBackend",
           files={"onnx": "encoder.onnx", "onnx_fp16": "encoder.fp16.onnx", "onnx_int8": "encoder.int8.onnx"},
           precisions=("fp32", "fp16", "int8"),
           tolerances={"fp32": {"cosine": 0.99999},
                       "fp16": {"cosine": 0.999, "top1_agreement": 0.99},
                       "int8": {"cosine": 0.99, "top1_agreement": 0.99}},
           auto={"cuda": 30, "cpu": 10},
           exporter="export.onnx:export_from_args", verifier="export.onnx:verify",
           flags=(_switch("--onnx", "encoder.onnx: fp32, dynamic batch, opset 18"),
                  _switch("--fp16", "encoder.fp16.onnx for onnxruntime on GPUs: fused attention, fp32 LayerNorm "
                                    "(implies --onnx)"),
                  _switch("--int8", "encoder.int8.onnx for CPUs: static QDQ int8 calibrated on real images "
                                    "(implies --onnx)"),
                  _switch("--tokens", "add a 'tokens' (N, L, D) output for dense use (implies --onnx)"))),
    Format("torch", "PyTorch",
           "eager PyTorch on the artifact's weights: the reference every other backend is checked against",
           backend="export.runtime:TorchBackend", precisions=("fp32",), auto={"cuda": 90, "cpu": 90}),
)
"""The registry, in the order its formats are listed to users (``--backend`` choices)."""

EXPORT_FLAGS = (
    Flag("--batch-max", "TensorRT profile / AOTInductor: largest batch (more is sliced)",
         {"type": int, "default": 256}),
    Flag("--parity-data", "comma-separated bundled sets or folders of real images for parity and int8 calibration",
         {"default": "mnist5k,photos"}),
    Flag("--parity-images", "real images drawn: half judge parity, the other half calibrate int8",
         {"type": int, "default": 512}),
)
"""``mae export`` flags that several formats read."""

BACKENDS: dict[str, Format] = {spec.name: spec for spec in FORMATS}
BACKEND_CHOICES = ("auto", *BACKENDS)
PRECISION_CHOICES = tuple(dict.fromkeys(p for spec in FORMATS for p in spec.precisions))
"""Every precision some backend runs (``mae embed --precision``); the backend refuses one it does not have."""
FILES: dict[str, str] = {key: name for spec in FORMATS for key, name in spec.files.items()}
"""File names inside ARTIFACT/ (beside config.json and model.safetensors), by key."""
TOLERANCES: dict[str, dict[str, float]] = {spec.tolerance_key(p): dict(t) for spec in FORMATS
                                           for p, t in spec.tolerances.items()}
"""Per format and precision (``Format.tolerance_key``), the parity its files must reach (``export.parity``)."""
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    device: tuple(sorted((s.name for s in FORMATS if device in s.auto), key=lambda n: BACKENDS[n].auto[device]))
    for device in ("cuda", "cpu")}
"""What ``backend="auto"`` tries, in order, on each kind of device: the first that can run wins."""
BACKEND_HELP = (f"model backend: auto (the first that can run here: {', '.join(AUTO_ORDER['cuda'])} on a GPU; "
                f"{', '.join(AUTO_ORDER['cpu'])} on a CPU) or one by name")
"""The ``--backend`` help of every command that takes one, drawn from the registry so that it cannot go stale."""
ONNX_PRECISIONS = BACKENDS["onnx"].precisions
TENSORRT_PRECISIONS = BACKENDS["tensorrt"].precisions
INDUCTOR_PRECISIONS = BACKENDS["inductor"].precisions


def resolve(spec: str) -> Any:
    """The object a "module:name" string of a row names (imported on first use: TensorRT and friends load only if
    asked)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def backend_class(name: str) -> type:
    """The class that runs backend ``name``."""
    if name not in BACKENDS:
        raise UsageError(f"backend must be one of {BACKEND_CHOICES}, got {name!r}")
    return resolve(BACKENDS[name].backend)


def requested(args: Any) -> list[Format]:
    """The formats a ``mae export`` command line asks for (one of their ``asks`` flags set), each after the formats
    it needs, in registry order otherwise."""
    order: list[Format] = []

    def add(spec: Format) -> None:
        for need in spec.needs:
            add(BACKENDS[need])
        if spec not in order:
            order.append(spec)

    for spec in FORMATS:
        if any(getattr(args, flag.dest, False) for flag in spec.flags if flag.asks):
            add(spec)
    return order


def tolerance(name: str, precision: str) -> dict[str, float]:
    """The parity a file of format ``name`` in ``precision`` must reach (read at call time, so tests can tighten it)."""
    key = BACKENDS[name].tolerance_key(precision)
    if key not in TOLERANCES:
        raise UsageError(f"{BACKENDS[name].title} has no {precision} files (precisions: {BACKENDS[name].precisions})")
    return TOLERANCES[key]


def onnx_key(precision: str) -> str:
    """The FILES / record key of an ONNX precision: fp32 -> onnx, fp16 -> onnx_fp16, int8 -> onnx_int8."""
    if precision not in ONNX_PRECISIONS:
        raise UsageError(f"ONNX precision must be one of {ONNX_PRECISIONS}, got {precision!r}")
    return "onnx" if precision == "fp32" else f"onnx_{precision}"


def onnx_file(path: str | Path, precision: str) -> Path:
    """The ONNX file of ``precision`` inside the artifact folder ``path``."""
    return Path(path) / FILES[onnx_key(precision)]


def require_made_from(recorded: str | None, config: ArtifactConfig, file: Path, remedy: str) -> None:
    """Refuse an exported file that was not made from these weights (stale after a re-export)."""
    if recorded is None:
        raise ArtifactError(f"{file} carries no artifact stamp (damaged, or not written by mae export); {remedy}")
    if recorded != config.sha256:
        raise ArtifactError(
            f"{file} was exported from other weights (artifact sha256 {str(recorded)[:12]}, this artifact is "
            f"{config.sha256[:12]}); {remedy}")
