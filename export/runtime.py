"""``Embedder``: one interface over the backends that run an artifact (torch, onnxruntime, TensorRT, AOTInductor).

Preprocessing comes from the artifact's config.json and is identical for every backend (decode, convert to
the model's channels, resize, centre-crop, normalise), so only the graph executor differs. The backends are
the rows of ``export.formats.BACKENDS``; ``backend="auto"`` takes the first that can run here, in the order
``export.formats.AUTO_ORDER`` gives for this device (on a GPU: a TensorRT engine built for it, an AOTInductor
package compiled for it, onnxruntime, eager torch; on a CPU: onnxruntime, a CPU package, torch). Every exported
file carries the sha256 of the artifact it came from; a stale file (weights re-exported since) is refused, and
so is one whose bytes differ from those that passed parity at export (``verify_artifact`` checks them all).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.formats import (  # noqa: F401  (backend_class: re-exported)
    AUTO_ORDER,
    BACKEND_CHOICES,
    BACKENDS,
    FILES,
    META_SHA,
    ONNX_PRECISIONS,
    Backend,
    BackendUnavailable,
    MissingFileError,
    backend_class,
    onnx_file,
    require_made_from,
    resolve,
)
from mae.artifact_config import ArtifactConfig, ArtifactError, verify_weights
from mae.errors import UsageError
from mae.images import EncodedImage, ImageError, ImageItem, Preprocessing, read_bytes

if TYPE_CHECKING:
    import torch

    from mae.dist import Dist
    from mae.shards import ShardSet

log = logging.getLogger(__name__)


class TorchBackend:
    """Eager PyTorch on the artifact's timm ViT (the reference every other backend is checked against)."""

    def __init__(self, path: Path, config: ArtifactConfig, device: str | None = None, precision: str | None = None):
        import torch

        from mae import artifact as artifact_lib

        if precision not in (None, "fp32"):
            raise BackendUnavailable(f"the torch backend runs the fp32 weights, not {precision}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.artifact = artifact_lib.load(path, device=self.device)
        self.name = f"torch-{self.device.type}"
        self._normalize = None

    @staticmethod
    def unavailable(path: Path, config: ArtifactConfig, device: str | None, precision: str | None) -> str | None:
        return None if precision in (None, "fp32") else f"runs fp32 only (asked for {precision})"

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        return self._outputs(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device))

    def run_shipped(self, pixels: torch.Tensor, preprocessing: Preprocessing) -> dict[str, np.ndarray]:
        """Pixels as workers ship them (uint8 or float in [0, 1], (N, C, H, W)): moved to the device as they are
        (a quarter of the bytes of float32 for uint8) and normalised there."""
        from mae.datasets import Normalize

        if self._normalize is None:
            self._normalize = Normalize(preprocessing.mean, preprocessing.std)
        return self._outputs(self._normalize(pixels, self.device))

    def _outputs(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
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

    def __init__(self, path: Path, config: ArtifactConfig, device: str | None = None, precision: str | None = None,
                 threads: int | None = None):
        from export.ort import session_options

        reason = self.unavailable(path, config, device, precision)
        if reason:
            raise BackendUnavailable(f"onnx backend: {reason}")
        import onnxruntime as ort

        cuda = _ort_cuda(device)
        if precision is None:
            precision = "fp16" if cuda and onnx_file(path, "fp16").exists() else "fp32"
        file = onnx_file(path, precision)
        providers: list[Any] = ["CPUExecutionProvider"]
        if cuda and precision != "int8":
            device_id = int(device.split(":")[1]) if device and ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        try:
            self.session = ort.InferenceSession(str(file), session_options(threads), providers=providers)
        except Exception as e:  # onnxruntime's own errors on a damaged or foreign graph
            raise ArtifactError(f"onnxruntime cannot load {file} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
        # The stamp from the session's own copy of the metadata: the graph is parsed once, by onnxruntime.
        stamp = self.session.get_modelmeta().custom_metadata_map.get(META_SHA)
        require_made_from(stamp, config, file, "re-run `mae export --onnx` for this artifact")
        self.outputs = [o.name for o in self.session.get_outputs() if o.name in ("embedding", "logits")]
        self.precision = precision
        provider = self.session.get_providers()[0].replace("ExecutionProvider", "").lower()
        self.name = f"onnx-{provider}-{precision}"

    @staticmethod
    def unavailable(path: Path, config: ArtifactConfig, device: str | None, precision: str | None) -> str | None:
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
    """What streaming a collection (files, or shards) through an embedder gave, in collection order."""

    vectors: np.ndarray
    """(M, D) float32, L2-normalised: one row per readable item."""
    positions: list[int]
    """Index of each row's item in the collection (the file list, or the shards' samples in order)."""
    sha256: list[str]
    """sha256 of each embedded item's bytes (the catalogue's duplicate check)."""
    skipped: list[dict[str, str]] = field(default_factory=list)
    """{"path", "error"} per item that could not be read or decoded."""
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)
    """Each row's item: its file path, or ``SHARD#KEY`` for a sample of a shard."""
    labels: list[int] = field(default_factory=list)
    """Each row's class index from its shard sample (``.cls``); -1 for files (folders give their labels)."""

    @property
    def images_per_s(self) -> float:
        return round(len(self.positions) / self.seconds, 1) if self.seconds > 0 else 0.0

    def save(self, folder: str | Path) -> Path:
        """Write this (one rank's part) as ``vectors.npy`` + ``part.json``, atomically, for ``load``/``concat``."""
        from mae.files import atomic_path, write_json_atomic

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "vectors.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(self.vectors, np.float32))
        write_json_atomic(folder / "part.json", {"positions": self.positions, "sha256": self.sha256,
                                                 "names": self.names, "labels": self.labels,
                                                 "skipped": self.skipped, "seconds": self.seconds})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddedFiles:
        """A part written by ``save``; a missing one names the likely cause (parts travel by filesystem)."""
        import json

        folder = Path(folder)
        if not (folder / "part.json").exists():
            raise MissingFileError(f"{folder} is missing: each rank writes its part beside --out, so --out must be "
                                   "on a filesystem every node shares (NFS, Lustre, ...)")
        part = json.loads((folder / "part.json").read_text())
        return cls(np.load(folder / "vectors.npy"), part["positions"], part["sha256"], part["skipped"],
                   part["seconds"], part["names"], part["labels"])

    @classmethod
    def concat(cls, parts: Sequence[EmbeddedFiles]) -> EmbeddedFiles:
        """Parts of one collection (the ranks' shares) as one, rows in collection order; ``seconds``: the
        slowest part's."""
        rows = sorted((p, k, i) for k, part in enumerate(parts) for i, p in enumerate(part.positions))
        dim = parts[0].vectors.shape[1] if parts else 0
        vectors = (np.stack([parts[k].vectors[i] for _, k, i in rows]) if rows
                   else np.zeros((0, dim), np.float32))
        pick = [(k, i) for _, k, i in rows]
        return cls(vectors, [p for p, _, _ in rows], [parts[k].sha256[i] for k, i in pick],
                   [s for part in parts for s in part.skipped], max((p.seconds for p in parts), default=0.0),
                   [parts[k].names[i] for k, i in pick], [parts[k].labels[i] for k, i in pick])


class Embedder:
    """Embeddings and class predictions from an artifact, whichever backend runs it."""

    def __init__(self, path: Path, config: ArtifactConfig, backend: Backend, batch_size: int = 64):
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.path = path
        self.config = config
        self.backend = backend
        self.batch_size = batch_size
        self.preprocessing = config.preprocessing

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", device: str | None = None, batch_size: int = 64,
             precision: str | None = None) -> Embedder:
        """Open an artifact with ``backend``: auto or a name of ``export.formats.BACKENDS``.

        auto: the first backend that can run here, in the order ``export.formats.AUTO_ORDER`` gives for the device
        (on a GPU: a TensorRT engine that matches it, an AOTInductor package compiled for it, onnxruntime with the
        CUDA provider, eager torch; on a CPU: onnxruntime, a CPU AOTInductor package, eager torch); ``precision``
        picks its file.
        """
        path = Path(path)
        if backend not in BACKEND_CHOICES:
            raise UsageError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
        # Every backend's vectors are tied to the artifact's weights (stamps, parity), so damaged weights make the
        # artifact unusable even for a backend that never reads them.
        config = verify_weights(path)
        if backend == "auto":
            return cls(path, config, _auto_backend(path, config, device, precision), batch_size)
        return cls(path, config, backend_class(backend)(path, config, device=device, precision=precision),
                   batch_size)

    # ------------------------------------------------------------------ facts

    @property
    def sha256(self) -> str:
        return self.config.sha256

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    @property
    def labels(self) -> list[str] | None:
        return list(self.config.labels) if self.config.labels else None

    @property
    def backend_name(self) -> str:
        return self.backend.name

    # ------------------------------------------------------------------ work

    def preprocess(self, images: Iterable[ImageItem]) -> np.ndarray:
        """Decoded arrays (H, W[, C]), file paths or encoded bytes -> float32 (N, C, H, W) ready for ``run``.

        A path goes through the same reader as ``embed_files`` (header, reduced-scale JPEG decode, uint8 crop),
        so a file searched for gets exactly the vector it was indexed with.
        """
        return self.preprocessing.pixels(list(images))

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

    def run_shipped(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        """A batch as workers ship it (uint8, or float in [0, 1]) -> outputs. A backend that can normalise on its
        device (torch) gets it as it is; the others get it normalised here."""
        if hasattr(self.backend, "run_shipped"):
            return self.backend.run_shipped(pixels, self.preprocessing)
        return self.run(self.preprocessing.normalize(pixels.numpy()))

    def embed(self, images: Sequence[ImageItem]) -> np.ndarray:
        """Images -> L2-normalised embeddings (N, D) float32."""
        return self.run(self.preprocess(images))["embedding"]

    def classify(self, images: Sequence[ImageItem], k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-k labels with softmax probabilities per image."""
        if not self.labels:
            raise UsageError(f"artifact {self.path} has no classification head (export a finetuned checkpoint)")
        logits = self.run(self.preprocess(images))["logits"]
        return top_k(logits, self.labels, k)

    def embed_files(self, files: Sequence[str | Path], *, workers: int = 2, progress: bool = True,
                    desc: str = "embedding", first: int = 0) -> EmbeddedFiles:
        """Stream image files through the model: read, hash, crop and resize in uint8 in ``workers`` DataLoader
        processes, normalise and embed batch by batch, so only a few batches of pixels are ever in memory. A file
        that cannot be read or decoded is skipped and reported, never fatal. ``first``: the collection position
        of ``files[0]`` (a slice of a larger collection, one rank's share)."""
        files = [Path(f) for f in files]
        return self._stream(_Files(files, self.preprocessing, first), len(files), workers, progress, desc)

    def embed_shards(self, shards: Any, *, rank: int = 0, world: int = 1, workers: int = 2, progress: bool = True,
                     desc: str = "embedding") -> EmbeddedFiles:
        """``embed_files`` for the samples of WebDataset shards (a ``mae.shards.ShardSet``); rank ``rank`` of
        ``world`` embeds its share (whole shards when there are enough). Rows are in shard order."""
        dataset = _shard_items(shards, self.preprocessing, rank, world)
        return self._stream(dataset, dataset.share(), workers, progress, desc)

    def _stream(self, dataset: Any, total: int, workers: int, progress: bool, desc: str) -> EmbeddedFiles:
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=workers,
                            collate_fn=_collate_items, prefetch_factor=2 if workers > 0 else None)
        vectors: list[np.ndarray] = []
        result = EmbeddedFiles(np.zeros((0, self.dim), np.float32), [], [])
        started = time.perf_counter()
        with tqdm(total=total, desc=desc, unit="img", disable=not progress or None, dynamic_ncols=True,
                  leave=False) as bar:
            for positions, pixels, hashes, names, labels, errors in loader:
                result.skipped += [{"path": name, "error": err} for name, err in errors]
                if positions:
                    vectors.append(self.run_shipped(pixels)["embedding"].astype(np.float32, copy=False))
                    result.positions += positions
                    result.sha256 += hashes
                    result.names += names
                    result.labels += labels
                bar.update(len(positions) + len(errors))
                if result.skipped:
                    bar.set_postfix(skipped=len(result.skipped))
        if vectors:
            result.vectors = np.concatenate(vectors)
        if result.positions != sorted(result.positions):  # workers interleave shards: back to collection order
            order = np.argsort(result.positions, kind="stable")
            result.vectors = result.vectors[order]
            for name in ("positions", "sha256", "names", "labels"):
                setattr(result, name, [getattr(result, name)[i] for i in order])
        result.seconds = time.perf_counter() - started
        return result


# ----------------------------------------------------------------------------------------------- across ranks


def embed_share(embedder: Embedder, collection: Sequence[Path] | ShardSet, *, rank: int = 0, world: int = 1,
                workers: int = 2, progress: bool = True, desc: str = "embedding") -> EmbeddedFiles:
    """Rank ``rank`` of ``world``'s share of a collection (image files, or WebDataset shards), embedded: a contiguous
    run of the files, or whole shards (every world-th sample when there are fewer shards than ranks). Positions
    are collection positions, so the shares of all ranks ``EmbeddedFiles.concat`` into the collection in order."""
    if not isinstance(collection, Sequence):
        return embedder.embed_shards(collection, rank=rank, world=world, workers=workers, progress=progress,
                                     desc=desc)
    from mae.dist import rank_slice

    a, b = rank_slice(len(collection), rank, world)
    return embedder.embed_files(collection[a:b], workers=workers, progress=progress, desc=desc, first=a)


def embed_across_ranks(embedder: Embedder, collection: Sequence[Path] | ShardSet, dist: Dist | None = None,
                       work: Path | None = None, *, workers: int = 2, progress: bool = True,
                       desc: str = "embedding") -> EmbeddedFiles:
    """``mae embed`` and ``mae index build`` under torchrun: this rank embeds its share (``embed_share``) and leaves
    it in ``part_folder(work, rank)``; returns once every rank has, with this rank's part. Rank 0 then reads them
    all (``load_parts``). ``work`` must be on a filesystem every node sees (``mae.dist.work_folder``). Without
    ``dist`` (one process) the whole collection is embedded and nothing is written."""
    if dist is None:
        return embed_share(embedder, collection, workers=workers, progress=progress, desc=desc)
    from mae.dist import barrier

    if work is None:
        raise ValueError("embedding across ranks needs a work folder every rank can write to")
    done = embed_share(embedder, collection, rank=dist.rank, world=dist.world, workers=workers, progress=progress,
                       desc=desc)
    done.save(part_folder(work, dist.rank))
    barrier(dist)
    return done


def part_folder(work: Path, rank: int) -> Path:
    """Where rank ``rank`` leaves its part (``EmbeddedFiles.save``: vectors.npy + part.json; others may add files)."""
    return Path(work) / f"rank{rank}"


def load_parts(work: Path, world: int) -> list[EmbeddedFiles]:
    """Every rank's part, in rank order (rank 0, once ``embed_across_ranks`` has returned on every rank)."""
    return [EmbeddedFiles.load(part_folder(work, r)) for r in range(world)]


def _load_item(item: ImageItem, preprocessing: Preprocessing) -> tuple[torch.Tensor, str]:
    """(pixels as shipped: uint8 or float (C, H, W); sha256 of the bytes), from one read of the bytes."""
    import hashlib

    import torch

    data = item.data if isinstance(item, EncodedImage) else read_bytes(item)
    name = item.name if isinstance(item, EncodedImage) else str(item)
    pixels = preprocessing.load(EncodedImage(data, name))
    return torch.from_numpy(pixels), hashlib.sha256(data).hexdigest()


class _Files:
    """(position, pixels (C, H, W) or None, sha256 or None, name, label, error or None) per file (map-style)."""

    def __init__(self, files: list[Path], preprocessing: Preprocessing, first: int = 0):
        self.files = files
        self.preprocessing = preprocessing
        self.first = first

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, str, int, str | None]:
        try:
            pixels, sha = _load_item(self.files[i], self.preprocessing)
            return self.first + i, pixels, sha, str(self.files[i]), -1, None
        except (ImageError, OSError, ValueError) as e:
            return self.first + i, None, None, str(self.files[i]), -1, str(e)


def _shard_items_class() -> type:
    """The shard dataset needs torch's IterableDataset as its base (the DataLoader tells the two kinds apart by
    type); built on first use so that importing this module does not import torch."""
    from torch.utils.data import IterableDataset

    class ShardItems(IterableDataset):
        def __init__(self, shards: Any, preprocessing: Preprocessing, rank: int, world: int):
            self.shards, self.preprocessing, self.rank, self.world = shards, preprocessing, rank, world

        def share(self) -> int:
            """Samples this rank embeds (the progress bar's total)."""
            counts = [s.count for s in self.shards.shards]
            if len(counts) >= self.world:
                return sum(counts[self.rank :: self.world])
            return len(range(self.rank, sum(counts), self.world))

        def __iter__(self):
            import torch

            from mae.shards import slot_samples

            info = torch.utils.data.get_worker_info()
            w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
            shard_level = len(self.shards.shards) >= self.world
            if shard_level:  # this rank's shards, then divided between its workers
                mine = type(self.shards)(self.shards.name, self.shards.shards[self.rank :: self.world])
                offsets = self.shards.offsets[self.rank :: self.world]
                for k, shard in enumerate(mine.shards):
                    if k % workers != w:
                        continue
                    single = type(self.shards)(self.shards.name, [shard])
                    for j, sample, error in slot_samples(single, 0, 1):
                        yield self._item(int(offsets[k]) + j, sample, error)
            elif w == 0:  # fewer shards than ranks: every rank reads them all and keeps every world-th sample
                for j, sample, error in slot_samples(self.shards, self.rank, self.world):
                    yield self._item(j, sample, error)

        def _item(self, position: int, sample: Any, error: str | None) -> tuple:
            if sample is None:
                return position, None, None, f"{self.shards.name}#{position}", -1, error
            try:
                pixels, sha = _load_item(sample.image(), self.preprocessing)
                return position, pixels, sha, sample.name, sample.label, None
            except (ImageError, OSError, ValueError) as e:
                return position, None, None, sample.name, sample.label, str(e)

    return ShardItems


def _shard_items(shards: Any, preprocessing: Preprocessing, rank: int, world: int) -> Any:
    """(position, pixels or None, sha256 or None, name, label, error or None) per sample of WebDataset shards."""
    return _shard_items_class()(shards, preprocessing, rank, world)


def _collate_items(batch: list[tuple[int, torch.Tensor | None, str | None, str, int, str | None]]
                   ) -> tuple[list[int], torch.Tensor, list[str], list[str], list[int], list[tuple[str, str]]]:
    import torch

    good = [b for b in batch if b[1] is not None]
    errors = [(b[3], b[5] or "unreadable") for b in batch if b[1] is None]
    xs = [b[1] for b in good]
    if len({x.dtype for x in xs}) > 1:  # an 8-bit file beside a 16-bit one: both as float in [0, 1]
        xs = [x.float() / 255.0 if x.dtype == torch.uint8 else x.float() for x in xs]
    pixels = torch.stack(xs) if xs else torch.zeros(0)
    return [b[0] for b in good], pixels, [b[2] for b in good], [b[3] for b in good], [b[4] for b in good], errors


# ----------------------------------------------------------------------------------------------- verification


def verify_artifact(path: str | Path) -> ArtifactConfig:
    """Check an artifact and every exported file in it before a long-running consumer (``mae serve``) starts.

    The weights must hash to the recorded sha256; each format's own check must pass (``Format.verifier``: an ONNX
    file parses and carries this artifact's stamp, an engine's record is readable and made from these weights); and
    every exported file with a recorded hash must still hash to the bytes that passed parity. Raises
    ``ArtifactError`` naming the first bad file; returns the config. A recorded file that is missing is a warning.
    """
    from export.parity import check_recorded

    path = Path(path)
    config = verify_weights(path)
    for name in config.recorded_files():
        if not (path / name).exists():  # deleting an exported file is allowed, but said, never silent
            warnings.warn(f"{path / name} passed parity at export but is missing; it will not be used", stacklevel=2)
    for spec in BACKENDS.values():
        if spec.verifier and any((path / name).exists() for name in spec.files.values()):
            resolve(spec.verifier)(path, config)
    for name in FILES.values():
        if (path / name).is_file():
            check_recorded(path / name, config)
    return config


# ----------------------------------------------------------------------------------------------- backends


def _auto_backend(path: Path, config: ArtifactConfig, device: str | None, precision: str | None) -> Backend:
    """The first backend of ``AUTO_ORDER`` that can run here; each refusal is logged, a failed load is warned.

    A backend whose files are all absent is passed over without importing its module (TensorRT's imports torch
    and CUDA), so an artifact run by onnxruntime starts without them."""
    reasons = []
    on_gpu = device.startswith("cuda") if device is not None else _cuda_visible()
    for name in AUTO_ORDER["cuda" if on_gpu else "cpu"]:
        spec = BACKENDS[name]
        if spec.files and not any((path / FILES[key]).exists() for key in spec.files):
            reasons.append(f"{name}: no {' / '.join(FILES[key] for key in spec.files)}")
            continue
        cls = backend_class(name)
        reason = cls.unavailable(path, config, device, precision)
        if reason:
            reasons.append(f"{name}: {reason}")
            continue
        try:
            backend = cls(path, config, device=device, precision=precision)
        except (BackendUnavailable, ArtifactError, ImportError, OSError, RuntimeError) as e:
            reasons.append(f"{name}: {e}")
            warnings.warn(f"{name} backend skipped: {e}", stacklevel=3)
            continue
        if reasons:
            log.info("auto backend: %s (%s)", backend.name, "; ".join(reasons))
        return backend
    raise BackendUnavailable("no backend can run this artifact here: " + "; ".join(reasons))


def _cuda_visible() -> bool:
    """Whether torch sees a GPU, asking torch only where an NVIDIA driver is present: importing it costs seconds,
    which a CPU-only ``mae search`` should not pay."""
    import os
    import sys

    if "torch" not in sys.modules and not os.path.exists("/proc/driver/nvidia"):
        return False
    import torch

    return torch.cuda.is_available()


def top_k(logits: np.ndarray, labels: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1)[:, :k]
    return [[{"label": labels[j], "index": int(j), "probability": float(p[j])} for j in row]
            for p, row in zip(probs, order)]
