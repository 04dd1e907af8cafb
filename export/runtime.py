"""``Embedder``: one interface over the backends that run an artifact (torch now; ONNX Runtime, TensorRT).

Preprocessing comes from the artifact's config.json and is identical for every backend (decode, convert to
the model's channels, resize, centre-crop, normalise), so only the graph executor differs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mae import artifact as artifact_lib
from mae.data import Preprocessing, read_image

BACKENDS = ("auto", "torch")


class Backend(Protocol):
    name: str

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """pixels float32 (N, C, H, W), already preprocessed -> {"embedding": (N, D), "logits": (N, K)?}."""
        ...


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


class Embedder:
    """Embeddings and class predictions from an artifact, whichever backend runs it."""

    def __init__(self, path: Path, config: dict[str, Any], backend: Backend, batch_size: int = 64):
        self.path = path
        self.config = config
        self.backend = backend
        self.batch_size = batch_size
        self.preprocessing = Preprocessing.from_dict(config["preprocessing"])

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", device: str | None = None, batch_size: int = 64
             ) -> Embedder:
        """Open an artifact. ``backend``: auto | torch (auto picks the fastest available backend)."""
        path = Path(path)
        config = artifact_lib.read_config(path)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        return cls(path, config, TorchBackend(path, device), batch_size)

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


def top_k(logits: np.ndarray, labels: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1)[:, :k]
    return [[{"label": labels[j], "index": int(j), "probability": float(p[j])} for j in row]
            for p, row in zip(probs, order)]
