"""``Embedder``: one interface over the backends that run an artifact (torch, onnxruntime, TensorRT, ...).

Preprocessing comes from the artifact's config.json and is identical for every backend (decode, convert to
the model's channels, resize, centre-crop, normalise), so only the graph executor differs. The backends are
the rows of ``export.formats.BACKENDS``; ``backend="auto"`` takes the first that can run here, in the
registry's order (a TensorRT engine built for this GPU, onnxruntime, eager torch). Every exported file carries
the sha256 of the artifact it came from; a stale file (weights re-exported since) is refused rather than run, and
so is one whose bytes differ from those that passed parity at export (``verify_artifact`` checks them all).
"""

from __future__ import annotations

import importlib
import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.formats import (
    BACKEND_CHOICES,
    BACKENDS,
    FILES,
    ONNX_PRECISIONS,
    Backend,
    BackendUnavailable,
    onnx_file,
)
from mae import artifact as artifact_lib
from mae.data import ImageError, Preprocessing, read_image, read_image_hashed

log = logging.getLogger(__name__)

class TorchBackend:
    """Eager PyTorch on the artifact's timm ViT (the reference every other backend is checked against)."""

    def __init__(self, path: Path, config: dict[str, Any], device: str | None = None, precision: str | None = None):
        if precision not in (None, "fp32"):
            raise BackendUnavailable(f"the torch backend runs the fp32 weights, not {precision}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.artifact = artifact_lib.load(path, device=self.device)
        self.name = f"torch-{self.device.type}"

    @staticmethod
    def unavailable(path: Path, config: dict[str, Any], device: str | None, precision: str | None) -> str | None:
        return None if precision in (None, "fp32") else f"runs fp32 only (asked for {precision})"

    @torch.inference_mode()
    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
        outputs = self.artifact.encoder(x)
        result = {"embedding": outputs[0].cpu().numpy()}
        if len(outputs) > 1:
            result["logits"] = outputs[1].cpu().numpy()
        return result


# ----------------------------------------------------------------------------------------------- onnxruntime


class OnnxBackend:
    """onnxruntime: CUDA provider when there is a GPU (and onnxruntime-gpu), else the CPU provider.

    ``precision`` picks the file: fp32 ``encoder.onnx``, fp16 ``encoder.fp16.onnx`` (GPU; fused attention),
    int8 ``encoder.int8.onnx`` (CPU; QDQ). Default: fp16 on CUDA when exported, else fp32 (int8 changes
    vectors slightly, so it is asked for, never implied).
    """

    def __init__(self, path: Path, config: dict[str, Any], device: str | None = None, precision: str | None = None,
                 threads: int | None = None):
        from export.ort import session_options
        from export.parity import check_onnx_stamp

        reason = self.unavailable(path, config, device, precision)
        if reason:
            raise BackendUnavailable(f"onnx backend: {reason}")
        import onnxruntime as ort

        cuda = _ort_cuda(device)
        if precision is None:
            precision = "fp16" if cuda and onnx_file(path, "fp16").exists() else "fp32"
        file = onnx_file(path, precision)
        check_onnx_stamp(file, config)
        providers: list[Any] = ["CPUExecutionProvider"]
        if cuda and precision != "int8":
            device_id = int(device.split(":")[1]) if device and ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        try:
            self.session = ort.InferenceSession(str(file), session_options(threads), providers=providers)
        except Exception as e:  # onnxruntime's own errors on a damaged or foreign graph
            raise artifact_lib.ArtifactError(f"onnxruntime cannot load {file} ({type(e).__name__}: "
                                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
        self.outputs = [o.name for o in self.session.get_outputs() if o.name in ("embedding", "logits")]
        self.precision = precision
        provider = self.session.get_providers()[0].replace("ExecutionProvider", "").lower()
        self.name = f"onnx-{provider}-{precision}"

    @staticmethod
    def unavailable(path: Path, config: dict[str, Any], device: str | None, precision: str | None) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed (pip install 'mae-service[cpu]')"
        if precision is not None and precision not in ONNX_PRECISIONS:
            return f"precision must be one of {ONNX_PRECISIONS}, got {precision!r}"
        if device is not None and device.startswith("cuda") and not _ort_cuda(device):
            return "device cuda asked for, but onnxruntime has no CUDA provider here"
        want = precision or "fp32"
        if not onnx_file(path, want).exists():
            flag = {"fp32": "--onnx", "fp16": "--fp16", "int8": "--int8"}[want]
            return f"{path} has no {onnx_file(path, want).name} (mae export ... {flag})"
        return None

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        got = self.session.run(self.outputs, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(self.outputs, got)}


def _ort_cuda(device: str | None) -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and device != "cpu"


# ----------------------------------------------------------------------------------------------- Embedder


@dataclass
class EmbeddedFiles:
    """What streaming a list of image files through an embedder gave, in file order."""

    vectors: np.ndarray
    """(M, D) float32, L2-normalised: one row per readable file."""
    positions: list[int]
    """Index into the input file list of each row."""
    sha256: list[str]
    """sha256 of each embedded file's bytes (the catalogue's duplicate check)."""
    skipped: list[dict[str, str]] = field(default_factory=list)
    """{"path", "error"} per file that could not be read or decoded."""
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return round(len(self.positions) / self.seconds, 1) if self.seconds > 0 else 0.0


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
        """Open an artifact with ``backend``: auto or a name of ``export.formats.BACKENDS``.

        auto: the first backend of the registry that can run here (a TensorRT engine that matches this GPU,
        then onnxruntime, CUDA provider then CPU, then eager torch); ``precision`` picks its file.
        """
        path = Path(path)
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
        # Every backend's vectors are tied to the artifact's weights (stamps, parity), so damaged weights make the
        # artifact unusable even for a backend that never reads them.
        config = artifact_lib.verify_weights(path)
        if backend == "auto":
            return cls(path, config, _auto_backend(path, config, device, precision), batch_size)
        return cls(path, config, backend_class(backend)(path, config, device=device, precision=precision),
                   batch_size)

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

    def embed_files(self, files: Sequence[str | Path], *, workers: int = 2, progress: bool = True,
                    desc: str = "embedding") -> EmbeddedFiles:
        """Stream image files through the model: read, hash and preprocess in ``workers`` DataLoader processes,
        embed batch by batch, so only a few batches of pixels are ever in memory. A file that cannot be read
        or decoded is skipped and reported, never fatal."""
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        files = [Path(f) for f in files]
        loader = DataLoader(_Files(files, self.preprocessing), batch_size=self.batch_size, shuffle=False,
                            num_workers=workers, collate_fn=_collate_files,
                            prefetch_factor=2 if workers > 0 else None)
        vectors: list[np.ndarray] = []
        result = EmbeddedFiles(np.zeros((0, self.dim), np.float32), [], [])
        started = time.perf_counter()
        with tqdm(total=len(files), desc=desc, unit="img", disable=not progress or None, dynamic_ncols=True,
                  leave=False) as bar:
            for positions, pixels, hashes, errors in loader:
                result.skipped += [{"path": str(files[p]), "error": err} for p, err in errors]
                if positions:
                    vectors.append(self.run(pixels.numpy())["embedding"].astype(np.float32, copy=False))
                    result.positions += positions
                    result.sha256 += hashes
                bar.update(len(positions) + len(errors))
                if result.skipped:
                    bar.set_postfix(skipped=len(result.skipped))
        if vectors:
            result.vectors = np.concatenate(vectors)
        result.seconds = time.perf_counter() - started
        return result


class _Files(torch.utils.data.Dataset):
    """(position, pixels (C, H, W) or None, sha256 or None, error or None) per file."""

    def __init__(self, files: list[Path], preprocessing: Preprocessing):
        self.files = files
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, str | None]:
        try:
            arr, sha = read_image_hashed(self.files[i])
            return i, self.preprocessing(arr), sha, None
        except (ImageError, OSError, ValueError) as e:
            return i, None, None, str(e)


def _collate_files(batch: list[tuple[int, torch.Tensor | None, str | None, str | None]]
                   ) -> tuple[list[int], torch.Tensor, list[str], list[tuple[int, str]]]:
    good = [b for b in batch if b[1] is not None]
    errors = [(b[0], b[3] or "unreadable") for b in batch if b[1] is None]
    pixels = torch.stack([b[1] for b in good]) if good else torch.zeros(0)
    return [b[0] for b in good], pixels, [b[2] for b in good], errors


# ----------------------------------------------------------------------------------------------- verification


def verify_artifact(path: str | Path) -> dict[str, Any]:
    """Check an artifact and every exported file in it before a long-running consumer (``mae serve``) starts.

    The weights must hash to the recorded sha256; each ONNX file must parse, carry this artifact's stamp and
    hash to the bytes that passed parity; any other exported file with a recorded hash (the TensorRT engine)
    must still match it, and the engine's record must be readable and made from these weights. Raises
    ``ArtifactError`` naming the first bad file; returns the config. A recorded file that is missing is a warning.
    """
    from export.parity import check_onnx_stamp, check_recorded, require_made_from
    from export.tensorrt import read_sidecar

    path = Path(path)
    config = artifact_lib.verify_weights(path)
    for entry in (config.get("export") or {}).values():
        hashes = entry.get("files_sha256") if isinstance(entry, dict) else None
        for name in hashes if isinstance(hashes, dict) else ():
            if not (path / name).exists():  # deleting an exported file is allowed, but said, never silent
                warnings.warn(f"{path / name} passed parity at export but is missing; it will not be used",
                              stacklevel=2)
    for precision in ONNX_PRECISIONS:
        if onnx_file(path, precision).exists():
            check_onnx_stamp(onnx_file(path, precision), config)
    for key, name in FILES.items():
        if not key.startswith("onnx") and (path / name).is_file():
            check_recorded(path / name, config)
    if (path / FILES["tensorrt"]).exists() or (path / FILES["tensorrt_sidecar"]).exists():
        side = read_sidecar(path)
        require_made_from(side.get("artifact_sha256"), config, path / FILES["tensorrt"],
                          "re-run `mae export --tensorrt` for this artifact")
    return config


# ----------------------------------------------------------------------------------------------- backends


def backend_class(name: str) -> type:
    """The class that runs backend ``name`` (imported on first use: TensorRT and friends load only if asked)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {name!r}")
    module, _, cls = BACKENDS[name].loader.partition(":")
    return getattr(importlib.import_module(module), cls)


def _auto_backend(path: Path, config: dict[str, Any], device: str | None, precision: str | None) -> Backend:
    """The first backend of the registry that can run here; each refusal is logged, a failed load is warned."""
    reasons = []
    for name, spec in BACKENDS.items():
        if spec.gpu_only and device is not None and not device.startswith("cuda"):
            continue
        cls = backend_class(name)
        reason = cls.unavailable(path, config, device, precision)
        if reason:
            reasons.append(f"{name}: {reason}")
            continue
        try:
            backend = cls(path, config, device=device, precision=precision)
        except (BackendUnavailable, artifact_lib.ArtifactError, ImportError, OSError, RuntimeError) as e:
            reasons.append(f"{name}: {e}")
            warnings.warn(f"{name} backend skipped: {e}", stacklevel=3)
            continue
        if reasons:
            log.info("auto backend: %s (%s)", backend.name, "; ".join(reasons))
        return backend
    raise BackendUnavailable("no backend can run this artifact here: " + "; ".join(reasons))


def top_k(logits: np.ndarray, labels: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1)[:, :k]
    return [[{"label": labels[j], "index": int(j), "probability": float(p[j])} for j in row]
            for p, row in zip(probs, order)]
