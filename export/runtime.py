"""``Embedder``: one interface over the backends that run an artifact: torch, onnxruntime, TensorRT, AOTInductor.

Preprocessing comes from the artifact's config.json and is identical for every backend (decode, convert to
the model's channels, resize, centre-crop, normalise), so only the graph executor differs. ``backend="auto"``
picks, in order: a TensorRT engine built for this GPU and TensorRT version, an AOTInductor package compiled
for this torch and GPU, onnxruntime (CUDA provider, then CPU), a package compiled for this CPU, eager torch.
Every exported file carries the sha256 of the artifact it came from; a stale file (weights re-exported since)
is refused rather than run.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mae import artifact as artifact_lib
from mae.data import IMAGE_EXTENSIONS, ImageError, Preprocessing, read_image

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "tensorrt", "inductor")
PRECISIONS = ("fp32", "fp16", "int8")
ONNX_FILES = {"fp32": "encoder.onnx", "fp16": "encoder.fp16.onnx", "int8": "encoder.int8.onnx"}


class Backend(Protocol):
    name: str

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """pixels float32 (N, C, H, W), already preprocessed -> {"embedding": (N, D), "logits": (N, K)?}."""
        ...


class BackendUnavailable(RuntimeError):
    """A backend that cannot run here (no file, no library, no GPU); the message says which and why."""


class TorchBackend:
    """Eager PyTorch on the artifact's timm ViT (the reference every other backend is checked against)."""

    def __init__(self, path: Path, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.artifact = artifact_lib.load(path, device=self.device)
        self.name = f"torch-{self.device.type}"

    @torch.inference_mode()
    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
        outputs = self.artifact.encoder(x)
        result = {"embedding": outputs[0].cpu().numpy()}
        if len(outputs) > 1:
            result["logits"] = outputs[1].cpu().numpy()
        return result


# ----------------------------------------------------------------------------------------------- onnxruntime


def session_options(threads: int | None = None) -> Any:
    """THE onnxruntime settings of this project (every session, export checks included, is made with these).

    Why: an embedder shares its cores with a server, image decoding and DataLoader workers. onnxruntime's
    worker threads spin-wait for work by default, which on shared cores stole CPU from everything else and
    slowed it by up to 3x here; with spinning off, idle threads sleep. Intra-op threads = the cores this
    process may use (its CPU affinity, not the machine's count, so a container's or taskset's limit is
    respected), or ``threads`` / ``MAE_ORT_THREADS``; one inter-op thread, since the graph is a chain.
    """
    import onnxruntime as ort

    env = os.environ.get("MAE_ORT_THREADS")
    if threads is None and env:
        threads = int(env)
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise to users
    return so


def check_stamp(file: Path, config: dict[str, Any]) -> None:
    """Refuse an exported file that was not exported from these weights (stale after a re-export)."""
    from export.onnx import META_SHA, read_stamp

    recorded = read_stamp(file).get(META_SHA)
    if recorded != config["sha256"]:
        raise artifact_lib.ArtifactError(
            f"{file} was exported from other weights (artifact sha256 {str(recorded)[:12]}, this artifact is "
            f"{config['sha256'][:12]}); re-run `mae export --onnx` for this artifact")


class OnnxBackend:
    """onnxruntime: CUDA provider when there is a GPU (and onnxruntime-gpu), else the CPU provider.

    ``precision`` picks the file: fp32 ``encoder.onnx``, fp16 ``encoder.fp16.onnx`` (GPU; fused attention),
    int8 ``encoder.int8.onnx`` (CPU; QDQ). Default: fp16 on CUDA when exported, else fp32 (int8 changes
    vectors slightly, so it is asked for, never implied).
    """

    def __init__(self, path: Path, config: dict[str, Any], device: str | None = None, precision: str | None = None,
                 threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable("onnxruntime is not installed (pip install 'mae-service[cpu]')") from e
        cuda = "CUDAExecutionProvider" in ort.get_available_providers() and device != "cpu"
        if device is not None and device.startswith("cuda") and not cuda:
            raise BackendUnavailable("device cuda asked for, but onnxruntime has no CUDA provider here")
        if precision is None:
            precision = "fp16" if cuda and (path / ONNX_FILES["fp16"]).exists() else "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        file = path / ONNX_FILES[precision]
        if not file.exists():
            flag = {"fp32": "--onnx", "fp16": "--fp16", "int8": "--int8"}[precision]
            raise BackendUnavailable(f"{path} has no {file.name}; run `mae export ... {flag}`")
        check_stamp(file, config)
        providers: list[Any] = ["CPUExecutionProvider"]
        if cuda and precision != "int8":
            device_id = int(device.split(":")[1]) if device and ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = ort.InferenceSession(str(file), session_options(threads), providers=providers)
        self.outputs = [o.name for o in self.session.get_outputs() if o.name in ("embedding", "logits")]
        self.precision = precision
        provider = self.session.get_providers()[0].replace("ExecutionProvider", "").lower()
        self.name = f"onnx-{provider}-{precision}"

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        got = self.session.run(self.outputs, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(self.outputs, got)}


# ----------------------------------------------------------------------------------------------- Embedder


class Embedder:
    """Embeddings and class predictions from an artifact, whichever backend runs it."""

    def __init__(self, path: Path, config: dict[str, Any], backend: Backend, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = path
        self.config = config
        self.backend = backend
        self.batch_size = batch_size
        self.preprocessing = Preprocessing.from_dict(config["preprocessing"])

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", device: str | None = None, batch_size: int = 64,
             precision: str | None = None) -> Embedder:
        """Open an artifact with ``backend``: auto | torch | onnx | tensorrt | inductor.

        auto: a TensorRT engine that matches this GPU and TensorRT version, then an AOTInductor package
        compiled for this torch and GPU, then onnxruntime (CUDA provider, then CPU), then a package compiled for
        this CPU, then eager torch.
        ``precision`` (onnx only): fp32 | fp16 | int8 (see ``OnnxBackend``).
        """
        path = Path(path)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        config = artifact_lib.read_config(path)
        if backend == "torch":
            return cls(path, config, TorchBackend(path, device), batch_size)
        if backend == "onnx":
            return cls(path, config, OnnxBackend(path, config, device, precision), batch_size)
        if backend == "tensorrt":
            from export.tensorrt import TensorRTBackend

            return cls(path, config, TensorRTBackend(path, config, device), batch_size)
        if backend == "inductor":
            from export.inductor import InductorBackend

            return cls(path, config, InductorBackend(path, config, device), batch_size)
        return cls(path, config, _auto_backend(path, config, device, precision), batch_size)

    # ------------------------------------------------------------------ facts

    @property
    def sha256(self) -> str:
        return self.config["sha256"]

    @property
    def dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def labels(self) -> list[str] | None:
        return self.config.get("labels")

    @property
    def backend_name(self) -> str:
        return self.backend.name

    # ------------------------------------------------------------------ work

    def preprocess(self, images: Iterable[np.ndarray | str | Path]) -> np.ndarray:
        """Decoded arrays (H, W[, C]) or file paths -> float32 (N, C, H, W) ready for ``run``."""
        tensors = [self.preprocessing(read_image(im) if isinstance(im, (str, Path)) else im) for im in images]
        if not tensors:
            c, h, w = self.preprocessing.input_size
            return np.zeros((0, c, h, w), np.float32)
        return torch.stack(tensors).numpy()

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed pixels (N, C, H, W) -> outputs, in batches of ``batch_size``."""
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != tuple(self.preprocessing.input_size):
            raise ValueError(f"pixels must have shape (N, {', '.join(map(str, self.preprocessing.input_size))}), "
                             f"got {tuple(pixels.shape)}")
        if len(pixels) == 0:
            out = {"embedding": np.zeros((0, self.dim), np.float32)}
            if self.labels:
                out["logits"] = np.zeros((0, len(self.labels)), np.float32)
            return out
        parts = [self.backend.run(pixels[i : i + self.batch_size]) for i in range(0, len(pixels), self.batch_size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def embed(self, images: Sequence[np.ndarray | str | Path]) -> np.ndarray:
        """Images -> L2-normalised embeddings (N, D) float32."""
        return self.run(self.preprocess(images))["embedding"]

    def classify(self, images: Sequence[np.ndarray | str | Path], k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-k labels with softmax probabilities per image."""
        if not self.labels:
            raise ValueError(f"artifact {self.path} has no classification head (export a finetuned checkpoint)")
        logits = self.run(self.preprocess(images))["logits"]
        return top_k(logits, self.labels, k)

    def embed_files(self, paths: Sequence[str | Path], *, workers: int = 2, progress: bool = True
                    ) -> tuple[np.ndarray, list[Path], list[str]]:
        """Stream image files through a DataLoader (decode + preprocess in ``workers`` processes, never the
        whole set in memory) -> (embeddings (M, D), the M paths embedded in row order, one message per file
        that could not be decoded and was skipped)."""
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        dataset = _Files([Path(p) for p in paths], self.preprocessing)
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=workers, collate_fn=_collate_files)
        vectors: list[np.ndarray] = []
        kept: list[Path] = []
        errors: list[str] = []
        with tqdm(total=len(dataset), unit="img", desc="embed", disable=not progress, leave=False) as bar:
            for pixels, indices, bad in loader:
                errors += bad
                if len(indices):
                    vectors.append(self.run(pixels.numpy())["embedding"])
                    kept += [dataset.paths[i] for i in indices]
                bar.update(len(indices) + len(bad))
        out = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        return out, kept, errors


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], preprocessing: Preprocessing):
        self.paths = paths
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.preprocessing(read_image(self.paths[i])), None
        except (ImageError, OSError) as e:
            return i, None, str(e)


def _collate_files(batch: list[tuple[int, torch.Tensor | None, str | None]]
                   ) -> tuple[torch.Tensor, list[int], list[str]]:
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [err for _, x, err in batch if x is None and err]
    pixels = torch.stack([x for _, x in good]) if good else torch.zeros(0)
    return pixels, [i for i, _ in good], bad


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Files and folders (recursive, image extensions only, sorted) -> image paths, in the order given."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {item}")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


def _auto_backend(path: Path, config: dict[str, Any], device: str | None, precision: str | None) -> Backend:
    """TensorRT (engine matching this GPU) -> AOTInductor on CUDA -> onnxruntime (CUDA, then CPU) -> AOTInductor on
    a CPU -> torch; each refusal is logged. On CPUs onnxruntime comes first: through the Embedder it beat the CPU
    package in 7 of 9 measurements here (bench/device.py --dry-run, a tiny ViT: 0.77-1.33x)."""
    reasons = []
    if device is None or device.startswith("cuda"):
        try:
            from export.tensorrt import TensorRTBackend, engine_mismatch

            reason = engine_mismatch(path, config)
            if reason is None:
                return TensorRTBackend(path, config, device)
            reasons.append(f"tensorrt: {reason}")
        except (BackendUnavailable, ImportError, OSError, RuntimeError) as e:
            reasons.append(f"tensorrt: {e}")
    here = device or ("cuda" if torch.cuda.is_available() else "cpu")  # never a CPU package beside a GPU
    inductor = None if precision else _inductor_backend(path, config, here, reasons)  # precision: onnx asked for
    if inductor is not None and here.startswith("cuda"):
        return inductor
    if (path / ONNX_FILES["fp32"]).exists() or (precision and (path / ONNX_FILES[precision]).exists()):
        try:
            return OnnxBackend(path, config, device, precision)
        except (BackendUnavailable, artifact_lib.ArtifactError, ImportError) as e:
            reasons.append(f"onnx: {e}")
            warnings.warn(f"onnxruntime backend skipped: {e}", stacklevel=3)
    else:
        reasons.append("onnx: no encoder.onnx (mae export --onnx)")
    if inductor is not None:
        return inductor
    log.info("auto backend: torch (%s)", "; ".join(reasons))
    return TorchBackend(path, device)


def _inductor_backend(path: Path, config: dict[str, Any], device: str, reasons: list[str]) -> Backend | None:
    from export.inductor import InductorBackend

    reason = InductorBackend.unavailable(path, config, device)
    if reason is None:
        return InductorBackend(path, config, device)
    reasons.append(f"inductor: {reason}")
    return None


def top_k(logits: np.ndarray, labels: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1)[:, :k]
    return [[{"label": labels[j], "index": int(j), "probability": float(p[j])} for j in row]
            for p, row in zip(probs, order)]
