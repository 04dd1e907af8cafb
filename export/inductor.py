"""AOTInductor: ``encoder.pt2``, the artifact's encoder compiled ahead of time by torch for one device, proven
equal to eager PyTorch on real images.

Why a third compiled format beside ONNX and TensorRT: it needs nothing but torch, so it can be built and proven
wherever torch runs, GPU machines without TensorRT or onnxruntime-gpu included, and it compiles the same
Python graph that training uses (no exporter in between). ``torch.export`` captures the ``Encoder`` with a
symbolic batch (``torch.export.Dim``, 1..``max_batch``; larger inputs are run in slices) and
``torch._inductor.aoti_compile_and_package`` turns it into a package holding a shared library: Triton kernels
for CUDA, C++ for CPU.

What the package is bound to, and therefore recorded beside it in ``encoder.pt2.json`` (the runtime checks) and
in ``config.json`` under ``export`` -> ``inductor`` (with the parity figures):

- the torch version that compiled it: the package calls into libtorch's ABI, which changes between releases;
- the device type; on CUDA the compute capability (the kernels are built for one GPU architecture), on CPU
  the vector ISA inductor generated code for (AVX-512 code would crash a CPU without it);
- the artifact sha256 of the weights baked into it, so a package left over from other weights is refused.

Precision: fp32 everywhere by default on CPUs; bf16 on CUDA (weights and activations bf16, the float32 input
cast inside the graph, outputs float32), because fp32 matmuls leave most of a GPU's tensor cores idle.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.formats import FILES, INDUCTOR_PRECISIONS, BackendUnavailable, ExportError, tolerance
from export.parity import DEFAULT_DATA, prove, reference_images, torch_outputs
from mae import artifact as artifact_lib
from mae.artifact_config import ArtifactConfig
from mae.errors import UsageError
from mae.files import write_json_atomic
from mae.hardware import cpu_isa

log = logging.getLogger(__name__)

FILE = FILES["inductor"]
SIDECAR = FILES["inductor_sidecar"]
RECORD_KEY = "inductor"
DEFAULT_MAX_BATCH = 256
EXAMPLE_BATCH = 2  # >= 2, so that torch.export cannot specialise the batch dimension to 1
CHECK_BATCHES = (1, 3, 17)  # odd sizes, run against eager: catches a batch baked in at compile time
PARITY_IMAGES = 128
MIN_TORCH = (2, 6)  # aoti_compile_and_package(ep, package_path=...) and aoti_load_package as used here


class InductorUnavailable(BackendUnavailable):
    """AOTInductor cannot compile or run here (old torch, no GPU for a CUDA package, other CPU ISA)."""


# ----------------------------------------------------------------------------------------------- facts


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def unavailable_reason() -> str | None:
    """Why this torch cannot compile or load AOTInductor packages, or None when it can."""
    if _torch_version() < MIN_TORCH:
        return (f"AOTInductor packages need torch >= {'.'.join(map(str, MIN_TORCH))} (aoti_compile_and_package / "
                f"aoti_load_package); this is torch {torch.__version__}")
    import torch._inductor as inductor

    missing = [n for n in ("aoti_compile_and_package", "aoti_load_package") if not hasattr(inductor, n)]
    if missing:
        return f"torch {torch.__version__} has no torch._inductor.{' / '.join(missing)}"
    return None


def cpu_isas() -> list[str]:
    """The vector ISAs inductor can generate CPU code for on this machine, best first (e.g. ["avx512", "avx2"])."""
    try:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    except ImportError:  # torch < 2.4 kept it in codecache
        from torch._inductor.codecache import valid_vec_isa_list
    return [str(isa) for isa in valid_vec_isa_list()]


def device_identity(device: torch.device) -> dict[str, Any]:
    """What a package compiled on ``device`` is bound to (see the module docstring)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device_type": "cuda", "device_name": props.name, "compute_capability": f"{props.major}.{props.minor}"}
    isas = cpu_isas()
    return {"device_type": "cpu", "device_name": cpu_isa()["cpu"] or platform.processor() or "unknown CPU",
            "cpu_isa": isas[0] if isas else "none"}


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / SIDECAR
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError:
        return None


def mismatch(path: str | Path, config: ArtifactConfig, device: str | None = None) -> str | None:
    """Why the artifact's ``encoder.pt2`` cannot run here on ``device`` (None when it can).

    ``device`` None means the device it was compiled for; otherwise its type must match.
    """
    path = Path(path)
    reason = unavailable_reason()
    if reason:
        return reason
    side = read_sidecar(path)
    if not (path / FILE).exists() or side is None:
        return f"no {FILE} (mae export --inductor)"
    if side.get("artifact_sha256") != config.sha256:
        return (f"{FILE} was compiled from other weights (artifact sha256 {str(side.get('artifact_sha256'))[:12]}, "
                f"this artifact is {config.sha256[:12]}); re-run `mae export --inductor` for this artifact")
    if side.get("torch") != torch.__version__:
        return (f"{FILE} was compiled with torch {side.get('torch')}; this is torch {torch.__version__} "
                "(a package only loads in the torch that built it): re-run `mae export --inductor` here")
    kind = side.get("device_type")
    wanted = torch.device(device).type if device else kind
    if wanted != kind:
        return (f"{FILE} was compiled for {kind}, not {wanted}; "
                f"re-run `mae export --inductor --inductor-device {wanted}`")
    if kind == "cuda":
        if not torch.cuda.is_available():
            return f"{FILE} was compiled for CUDA ({side.get('device_name')}) and no CUDA GPU is visible to torch"
        index = torch.device(device).index if device and torch.device(device).index is not None else 0
        here = device_identity(torch.device("cuda", index))
        if here["compute_capability"] != side.get("compute_capability"):
            return (f"{FILE} was compiled for compute capability {side.get('compute_capability')} "
                    f"({side.get('device_name')}); this GPU is {here['device_name']} ({here['compute_capability']})")
    elif kind == "cpu":
        isas = cpu_isas()
        if side.get("cpu_isa") not in (*isas, "none"):
            return (f"{FILE} was compiled for {side.get('cpu_isa')} CPUs ({side.get('device_name')}); this CPU "
                    f"offers {', '.join(isas) or 'no vector ISA inductor knows'}")
    else:
        return f"{SIDECAR} names an unknown device type {kind!r}"
    return None


# ----------------------------------------------------------------------------------------------- compile


class _Graph(nn.Module):
    """The artifact's ``Encoder`` with the package's I/O contract: float32 pixels in, float32 outputs out."""

    def __init__(self, encoder: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).to(dtype)  # the caller's encoder stays fp32 for the reference
        self.dtype = dtype

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # (N, C, H, W) float32 -> (embedding (N, D) float32, logits (N, K) float32 with a head)
        return tuple(t.float() for t in self.encoder(pixels.to(self.dtype)))


def compile_package(art: artifact_lib.Artifact, file: Path, device: torch.device, precision: str,
                    max_batch: int) -> float:
    """torch.export with a symbolic batch, then AOTInductor; returns the seconds it took."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    graph = _Graph(art.encoder, dtype).to(device).eval()
    example = torch.randn(EXAMPLE_BATCH, *art.preprocessing.input_size, device=device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    started = time.perf_counter()
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):  # stdout is for --json
        program = torch.export.export(graph, (example,), dynamic_shapes={"pixels": {0: batch}})
        torch._inductor.aoti_compile_and_package(program, package_path=str(file))
    return time.perf_counter() - started


def load_package(file: Path, device: torch.device) -> Any:
    """The compiled model: call it with a float32 (N, C, H, W) tensor on its device; returns a sequence of tensors."""
    kwargs: dict[str, Any] = {}
    if device.type == "cuda" and "device_index" in inspect.signature(torch._inductor.aoti_load_package).parameters:
        kwargs["device_index"] = device.index if device.index is not None else 0
    return torch._inductor.aoti_load_package(str(file), **kwargs)


def run_package(model: Any, pixels: torch.Tensor, max_batch: int) -> list[torch.Tensor]:
    """Run in slices of at most ``max_batch`` (the compiled range) and concatenate."""
    parts = []
    with torch.inference_mode():
        for i in range(0, len(pixels), max_batch):
            parts.append(list(model(pixels[i : i + max_batch])))
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def check_batches(model: Any, art: artifact_lib.Artifact, device: torch.device, tolerance: float,
                  batches: Sequence[int] = CHECK_BATCHES) -> dict[str, float]:
    """Run odd batch sizes against eager fp32: a batch dimension baked in at compile time fails here."""
    gen = torch.Generator().manual_seed(0)
    encoder = art.encoder.float().cpu().eval()
    worst: dict[str, float] = {}
    for n in batches:
        x = torch.randn(n, *art.preprocessing.input_size, generator=gen)
        with torch.inference_mode():
            ref = encoder(x)
        got = run_package(model, x.to(device), n)
        if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref)):
            raise ExportError(f"{FILE} gave shapes {[tuple(g.shape) for g in got]} at batch {n}, expected "
                              f"{[tuple(r.shape) for r in ref]}")
        cos = min(float(torch.nn.functional.cosine_similarity(g.float().cpu(), r, dim=1).min())
                  for g, r in zip(got, ref))
        if not cos >= tolerance:
            raise ExportError(f"{FILE} differs from PyTorch at batch {n}: cosine {cos:.6f} < {tolerance}")
        worst[str(n)] = cos
    return worst


def export_inductor(path: str | Path, *, device: str | None = None, precision: str | None = None,
                    data: Sequence[str] = DEFAULT_DATA, parity_images: int = PARITY_IMAGES,
                    max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, Any]:
    """Compile an artifact folder's encoder to ``encoder.pt2``, prove it on real images, record it in config.json.

    ``device``: cuda (default when a GPU is visible) or cpu: the package runs only there. ``precision``: fp32 or
    bf16 (default bf16 on CUDA, fp32 on CPU). Raises ``ParityError`` (after recording the figures and deleting
    the package) when it misses its tolerance, so a package that is on disk has passed.
    """
    reason = unavailable_reason()
    if reason:
        raise InductorUnavailable(reason)
    path = Path(path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InductorUnavailable("--inductor-device cuda: no CUDA GPU is visible to torch")
    if dev.type not in ("cuda", "cpu"):
        raise UsageError(f"AOTInductor export supports cuda and cpu devices, got {dev}")
    precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
    if precision not in INDUCTOR_PRECISIONS:
        raise UsageError(f"inductor precision must be one of {INDUCTOR_PRECISIONS}, got {precision!r}")
    if max_batch < EXAMPLE_BATCH:
        raise UsageError(f"max_batch must be >= {EXAMPLE_BATCH}, got {max_batch}")
    file, sidecar = path / FILE, path / SIDECAR
    file.unlink(missing_ok=True)  # a failed compile must not leave the previous weights' package behind
    sidecar.unlink(missing_ok=True)
    art = artifact_lib.load(path)
    names = ["embedding"] + (["logits"] if art.labels else [])
    seconds = compile_package(art, file, dev, precision, max_batch)
    side = {"torch": torch.__version__, **device_identity(dev), "precision": precision,
            "batch": {"min": 1, "max": max_batch}, "input_size": list(art.preprocessing.input_size),
            "outputs": names, "artifact_sha256": art.sha256, "compile_seconds": round(seconds, 1)}
    write_json_atomic(sidecar, side)

    bound = tolerance("inductor", precision)
    record: dict[str, Any] = {**side, "file": FILE, "bytes": file.stat().st_size}
    try:
        model = load_package(file, dev)
        record["batches_cosine_min"] = check_batches(model, art, dev, bound["cosine"])
        pixels, _, data_info = reference_images(list(data), parity_images, art.preprocessing)
        reference = torch_outputs(art, pixels, tokens=False)
        out = run_package(model, torch.from_numpy(pixels).to(dev), max_batch)
        got = {name: t.float().cpu().numpy() for name, t in zip(names, out)}
        record["parity_data"] = data_info
    except Exception:
        file.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        raise
    return prove(path, RECORD_KEY, record, reference, got, tolerance=bound, files=[file, sidecar])


def summary_line(record: dict[str, Any]) -> str:
    """One people-readable line of an ``export`` -> ``inductor`` record."""
    emb = record["parity"]["embedding"]
    parts = [f"cos min {emb['cosine_min']:.6f}", f"max|d| {emb['max_abs']:.2e}"]
    if "top10_neighbour_overlap" in emb:
        parts.append(f"top-10 nbr overlap {emb['top10_neighbour_overlap']:.3f}")
    if "logits" in record["parity"]:
        parts.append(f"top-1 agree {record['parity']['logits']['top1_agreement']:.3f}")
    where = f"{record['device_type']} {record['device_name']}"
    return (f"  {FILE:<18} {record['bytes'] / 1e6:7.1f} MB  AOTInductor {record['precision']} for {where}, torch "
            f"{record['torch']}, batch 1..{record['batch']['max']}, compiled in {record['compile_seconds']} s: "
            f"{', '.join(parts)}")


def export_from_args(path: Path, args: Any, data: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``mae export --inductor`` (the AOTInductor row of ``export.formats``): the package, its parity record and the
    line that summarises it."""
    record = export_inductor(path, device=args.inductor_device, precision=args.inductor_precision, data=data,
                             parity_images=args.parity_images, max_batch=args.batch_max)
    return {RECORD_KEY: record}, [summary_line(record)]



# ----------------------------------------------------------------------------------------------- runtime


class InductorBackend:
    """``Embedder`` backend: numpy in, numpy out, the AOTInductor package in between (CUDA or CPU)."""

    def __init__(self, path: Path, config: ArtifactConfig, device: str | None = None, precision: str | None = None):
        reason = self.unavailable(path, config, device, precision)
        if reason:
            raise BackendUnavailable(f"inductor backend: {reason}")
        side = read_sidecar(path) or {}
        kind = side["device_type"]
        self.device = torch.device(device) if device else torch.device(kind)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)
        self.model = load_package(Path(path) / FILE, self.device)
        self.outputs = list(side["outputs"])
        self.max_batch = int(side["batch"]["max"])
        self.name = f"inductor-{kind}-{side['precision']}"

    @staticmethod
    def unavailable(path: Path, config: ArtifactConfig, device: str | None = None,
                    precision: str | None = None) -> str | None:
        """Why the package cannot run here (no encoder.pt2, other torch / device / weights / precision), or None."""
        reason = mismatch(path, config, device)
        if reason is None and precision is not None:
            built = (read_sidecar(path) or {}).get("precision")
            if built != precision:
                reason = f"{FILE} was compiled for {built}, not {precision}"
        return reason

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
        out = run_package(self.model, x, self.max_batch)
        return {name: t.float().cpu().numpy() for name, t in zip(self.outputs, out) if name in ("embedding", "logits")}
