"""The index behind one interface: what every engine implements, and how an index is named and opened.

An index is named the same way everywhere one is taken (``--index``, ``--out``, ``mae serve --index``,
``Index.open``)::

    DIR                              a FAISS folder (the embedded default; ``faiss:DIR`` says so explicitly)
    milvus:PATH.db                   embedded milvus-lite, in this process (retrieval.milvus_index)
    milvus://HOST:PORT/COLLECTION    a Milvus standalone or cluster server (or a ``milvus-lite server``)

``ENGINES`` maps each scheme to the class that implements it (imported only when an index of that kind is
opened, so that pymilvus loads only for Milvus). Adding an engine is one module with a subclass of ``Index``
and one line in ``ENGINES``.

``Index`` is the contract. What every engine shares is written here once, on top of a few primitives each
engine implements (marked abstract): validating and normalising queries, parsing filters
(``retrieval.filters``), capping k, cutting by ``min_score``, turning ids into hits, "more like this", the
near-duplicate grouping, paths as answers show them, and which keys a removal names. The CLI and the HTTP
layer call only the public methods of ``Index``, never an engine's own, so they work on any engine.

Ids are the engine's item ids (int64 >= 1, never reused); vectors are compared by inner product after L2
normalisation (cosine). A *generation* is one committed write: every add, remove or annotation makes a new one,
and a read answers from one generation (``lock`` holds it still across the calls of a composite read).
"""

from __future__ import annotations

import importlib
import math
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mae.errors import UsageError, UserError
from retrieval.catalog import Item, Row
from retrieval.filters import MAX_ID, Condition, parse_filters

# scheme -> ("module:Class", the forms it accepts, as the error for an unknown scheme lists them)
ENGINES: dict[str, tuple[str, str]] = {
    "faiss": ("retrieval.faiss_index:FaissIndex", "DIR (a FAISS folder, also written faiss:DIR)"),
    "milvus": ("retrieval.milvus_index:MilvusIndex", "milvus:PATH.db (embedded milvus-lite), "
               "milvus://HOST:PORT/COLLECTION (a Milvus server)"),
}
DEFAULT_ENGINE = "faiss"  # a name without a scheme

DUPLICATE_K = 16
# Near-duplicates by the embedding alone (no pixel check): cosine at or above which two items count as copies of
# one image. Measured with bench/retrieval.py --duplicates on the demo's artifact (mnist5k held-out digits, each
# with a resized, cropped, JPEG-30, rotated and recoloured copy, among distractors): 0.998 is the lowest threshold
# whose groups are precise (pair precision 0.99), but it finds only 6% of the copy pairs, mostly re-encodes; at
# 0.95 the groups would chain distinct digits (precision 0.02). That encoder puts another digit closer than one
# of the copies for 80% of the originals, so no threshold does better with it alone: the pixel check
# (retrieval.verify, the default of ``mae index duplicates``) does, from the looser candidates it proposes.
# Re-measured for contrastively tuned encoders (``mae finetune --contrastive``, the preset's recipe and the
# ``--augment copy`` runs of docs/benchmarks.md): they rank copies far better (micro-AP 0.16 -> 0.66, and 0.96
# with --augment copy), but distinct digits drawn alike still reach cosines of 0.995+, and where precision falls
# under 0.95 depends on the run (0.997 for some, 0.995 for others). 0.998 keeps it >= 0.959 for all of them but
# one (batch 1024, whose cosines pack tighter: 0.707; it needs 0.9983), so it stays the default and the docs say
# to measure a new encoder before grouping by the cosine alone.
DUPLICATE_THRESHOLD = 0.998
DUPLICATE_BLOCK = 1024


class IndexMismatchError(UserError, ValueError):
    """The index was built with another artifact than the one asked to search it: vectors would not compare."""


class IndexDamagedError(UserError, RuntimeError):
    """The parts of an index disagree or cannot be read: it is refused until ``mae index check --repair``."""


class ItemNotFoundError(UserError, KeyError):
    """An item id or path the user named is not (or no longer) in the index."""

    def __str__(self) -> str:  # KeyError's own would quote the message
        return str(self.args[0]) if self.args else ""


class IndexBusyError(UserError, RuntimeError):
    """Another writer held the index for longer than this one may wait (HTTP answers 409)."""


def repair_hint(name: Path | str) -> str:
    return (f"run `mae index check --index {name}` to see what disagrees and `--repair` to rebuild what the "
            "surviving parts allow")


@dataclass(frozen=True)
class Hit:
    """One neighbour: item id, inner product (cosine) with the query, file path, class label and tags."""

    id: int
    score: float
    path: str
    label: str | None
    tags: dict[str, str] | None = None


@dataclass
class AddResult:
    ids: list[int] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    """Paths whose bytes are already indexed (or repeat an earlier file of the same call)."""
    duplicate_ids: list[int | None] = field(default_factory=list)
    """For each duplicate, the live id holding the same bytes (None: an earlier file of this call)."""


@dataclass
class RemoveResult:
    ids: list[int] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Keys (ids or paths) that name no live item."""
    rebuilt: bool = False
    paths: list[str] = field(default_factory=list)
    """The files of the removed items."""


# ----------------------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class IndexSpec:
    """An index name taken apart: which engine, and what it means to that engine (a folder, a file, a URI)."""

    engine: str
    target: str

    def __str__(self) -> str:
        return self.target if self.engine == DEFAULT_ENGINE else f"{self.engine}:{self.target}"


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: never a drive letter


def accepted_forms() -> str:
    forms = [form for _, form in ENGINES.values()]
    return "an index is " + (", ".join(forms[:-1]) + " or " + forms[-1] if len(forms) > 1 else forms[0])


def parse_spec(spec: str | Path | IndexSpec) -> IndexSpec:
    """``--index`` as given -> IndexSpec; a UsageError naming the accepted forms for an engine nobody registered.

    A name that exists as a path is a folder, whatever it looks like (``a:b`` may be one).
    """
    if isinstance(spec, IndexSpec):
        return spec
    if isinstance(spec, os.PathLike):
        return IndexSpec(DEFAULT_ENGINE, os.fspath(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"no index given; {accepted_forms()}")
    m = _SCHEME.match(spec)
    if m is None or Path(spec).exists():
        return IndexSpec(DEFAULT_ENGINE, spec)
    scheme = m.group(1).lower()
    if scheme not in ENGINES:
        raise UsageError(f"cannot open the index {spec!r}: no index engine is called {scheme!r}; {accepted_forms()}")
    return IndexSpec(scheme, spec[m.end():])


def engine_class(name: str) -> type[Index]:
    """The class that implements an engine (its module is imported now, not before)."""
    if name not in ENGINES:
        raise UsageError(f"no index engine is called {name!r}; {accepted_forms()}")
    module, cls = ENGINES[name][0].split(":")
    return getattr(importlib.import_module(module), cls)


def canonical(spec: str | Path) -> str:
    """An index name that means the same from any working directory (folders and files made absolute)."""
    s = parse_spec(spec)
    return str(IndexSpec(s.engine, engine_class(s.engine).canonical_target(s.target)))


# ----------------------------------------------------------------------------------------------- the contract


class Index(ABC):
    """An index of image embeddings and what each item is, behind one interface for every engine.

    Open one by name with ``Index.open(spec)`` (``Index.load(folder)`` for a FAISS folder, as before); make one
    with ``Index.create(spec, vectors, items)``. Reads never wait for writers (``reload`` picks up what another
    process committed); writes are serialised per index by the engine.
    """

    engine: ClassVar[str] = ""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        """Held by every state change and by composite reads, so that one read sees one generation."""
        self._lock = self.lock  # the old name, for callers that have not moved to public methods yet
        self.lock_timeout: float | None = None
        """Seconds a write waits for another writer before IndexBusyError (None: as long as it takes)."""
        self.compact_in_background = False
        """Whether a write that passes the engine's compaction threshold folds on a thread of its own (a server's
        writes should not wait for it) rather than before it returns (the CLI's); engines without one ignore it."""

    # ------------------------------------------------------------------ opening by name

    @classmethod
    def open(cls, spec: str | Path | IndexSpec, *, artifact_sha256: str | None = None, **options: Any) -> Index:
        """Open the index ``spec`` names (see the module docstring). ``artifact_sha256``: refuse an index built
        by another artifact (IndexMismatchError). ``options`` go to the engine (FAISS: ``mmap``, ``gpu``)."""
        s = parse_spec(spec)
        return engine_class(s.engine).open_target(s.target, artifact_sha256=artifact_sha256, **options)

    @classmethod
    def load(cls, path: str | Path, *, artifact_sha256: str | None = None, mmap: bool = False,
             gpu: bool | None = None) -> Index:
        """Open a FAISS folder (``Index.open`` with a folder's name)."""
        return engine_class(DEFAULT_ENGINE).open_target(str(path), artifact_sha256=artifact_sha256, mmap=mmap, gpu=gpu)

    @classmethod
    def create(cls, spec: str | Path | IndexSpec, vectors: np.ndarray, items: Sequence[Item], *, artifact_sha256: str,
               factory: str = "auto", overwrite: bool = False, extra: dict[str, Any] | None = None,
               rows: Sequence[Row] | None = None, **options: Any) -> Index:
        """Make a new index from vectors (N, D) and their items (duplicates by sha256 kept once).

        ``factory``: "auto" (the engine chooses by size and memory) or an engine's own index type. ``extra``:
        facts to record with it (the artifact's path, the indexed folders as ``images``, build figures).
        ``rows``: catalogue rows to keep as they are, one per item, when an index moves between engines
        (``mae index migrate``): ids, dates and tags kept, none dropped as a duplicate.
        """
        s = parse_spec(spec)
        if rows is not None:  # only then: an engine without the option still builds everything else
            options["rows"] = rows
        return engine_class(s.engine).create_target(s.target, vectors, items, artifact_sha256=artifact_sha256,
                                                    factory=factory, overwrite=overwrite, extra=extra, **options)

    @classmethod
    def check(cls, spec: str | Path | IndexSpec) -> dict[str, Any]:
        """``mae index check``: whether the parts of an index agree (``ok``, ``problems``, ``text``), read part by
        part so that a damaged index can be checked (it cannot be opened)."""
        s = parse_spec(spec)
        return engine_class(s.engine).check_target(s.target)

    @classmethod
    def repair(cls, spec: str | Path | IndexSpec, artifact: str | Path | None = None, **options: Any
               ) -> dict[str, Any]:
        """``mae index check --repair``: keep what the surviving parts agree on, commit it, list what was lost."""
        s = parse_spec(spec)
        return engine_class(s.engine).repair_target(s.target, artifact, **options)

    # ------------------------------------------------------------------ what an engine implements: names

    @classmethod
    @abstractmethod
    def open_target(cls, target: str, *, artifact_sha256: str | None = None, **options: Any) -> Index:
        """Open the index ``target`` names (the spec without its scheme); FileNotFoundError when there is none,
        IndexDamagedError when its parts disagree, IndexMismatchError for another artifact. Callers pass the
        options ``mmap`` and ``gpu`` (FAISS's); an engine that has no use for them accepts and ignores them."""

    @classmethod
    @abstractmethod
    def create_target(cls, target: str, vectors: np.ndarray, items: Sequence[Item], *, artifact_sha256: str,
                      factory: str, overwrite: bool, extra: dict[str, Any] | None, **options: Any) -> Index:
        """Build a new index at ``target``: it appears complete or not at all; an existing one is refused
        (FileExistsError) unless ``overwrite``. Callers pass the options ``max_memory`` (bytes the index may
        use), ``target_recall`` (what search parameters are tuned to), ``gpu`` and ``seed``; an engine uses those
        that apply to it and ignores the others. ``rows`` (``Index.create``) and ``progress`` (a progress bar)
        come only from ``mae index migrate``, and every engine must take them."""

    @classmethod
    @abstractmethod
    def check_target(cls, target: str) -> dict[str, Any]:
        """The parts-agree report of ``Index.check``."""

    @classmethod
    @abstractmethod
    def repair_target(cls, target: str, artifact: str | Path | None, **options: Any) -> dict[str, Any]:
        """The repair of ``Index.repair``."""

    @classmethod
    def canonical_target(cls, target: str) -> str:
        """``target`` as it means the same from any working directory (a folder or file made absolute)."""
        return target

    # ------------------------------------------------------------------ what an engine implements: facts

    @property
    @abstractmethod
    def name(self) -> str:
        """The index as messages name it (the folder, or the spec)."""

    @property
    @abstractmethod
    def manifest(self) -> dict[str, Any]:
        """What the index records about itself: ``artifact_sha256``, ``dim``, ``factory``, ``generation``,
        ``count``, and when known ``artifact`` (its path), ``images`` (the indexed folders), ``search_params``."""

    @property
    @abstractmethod
    def count(self) -> int:
        """Live items (removed ones excluded) at this handle's generation."""

    @property
    @abstractmethod
    def generation(self) -> int:
        """The committed generation this handle answers from."""

    @property
    @abstractmethod
    def uploads(self) -> Path:
        """The folder where images added over HTTP are stored (answers show their paths relative to it)."""

    # ------------------------------------------------------------------ what an engine implements: reads

    @abstractmethod
    def knn(self, x: np.ndarray, k: int, conditions: Sequence[Condition]) -> tuple[np.ndarray, np.ndarray]:
        """The k best of each query among the live items that meet every condition, inside the engine.

        ``x``: (N, D) float32, L2-normalised; 1 <= k <= max(count, 1). Returns scores (N, k') float32 and ids
        (N, k') int64, k' <= k, best first, -inf / -1 where there is no neighbour. Each row holds exactly
        min(k, matching items) neighbours: a filter never makes an answer come back short.
        """

    @abstractmethod
    def rows(self, ids: Iterable[int]) -> dict[int, Row]:
        """Live items by id; removed, uncommitted and impossible ids are absent from the answer."""

    @abstractmethod
    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors (N, D) float32 of live items, in the order asked; KeyError naming a missing id."""

    @abstractmethod
    def live_ids(self) -> np.ndarray:
        """Every live id, ascending: int64 (count,)."""

    @abstractmethod
    def ids_by_sha256(self, hashes: Iterable[str]) -> dict[str, int]:
        """Which of these file hashes are live (sha256 -> an id holding those bytes)."""

    @abstractmethod
    def ids_by_path(self, paths: Iterable[str]) -> dict[str, list[int]]:
        """Live ids by stored (absolute) path."""

    @abstractmethod
    def labels(self) -> dict[str, int]:
        """Live items per label (no label counted under "")."""

    @abstractmethod
    def tag_keys(self, limit: int = 50) -> dict[str, int]:
        """Live items per tag key, most used first."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What ``mae index info`` shows. Keys every engine gives: index, engine, count, dim, metric, factory,
        generation, artifact_sha256, artifact, labels, tags, roots, created, updated; an engine adds its own."""

    # ------------------------------------------------------------------ what an engine implements: writes

    @abstractmethod
    def add(self, vectors: np.ndarray, items: Sequence[Item], *, roots: Sequence[str | Path] = ()) -> AddResult:
        """Add vectors (N, D) of ``items`` as one new generation; files already indexed (same sha256, or twice
        in ``items``) are skipped and reported (``split_duplicates``). ``roots``: the folders the items came
        from, recorded so that answers show paths relative to them. Nothing added: no generation."""

    @abstractmethod
    def delete(self, ids: Sequence[int], paths: Mapping[str, Sequence[str]]) -> RemoveResult:
        """Remove the live items among ``ids`` and those stored under ``paths`` (each key as the user gave it,
        mapped to the stored paths it may mean) as one new generation; keys that name nothing are ``missing``.
        Use ``Index.remove``, which takes keys as users write them."""

    @abstractmethod
    def annotate(self, metadata: Mapping[str, tuple[Any, Mapping[str, str] | None]]) -> int:
        """Set labels and tags of live items by stored path (``retrieval.metadata.Sidecar.entries``): a label of
        ``metadata.UNSET`` keeps the item's own; tags merge over its own. One new generation; returns the number
        of items changed."""

    @abstractmethod
    def compact(self, *, force: bool = True) -> dict[str, Any]:
        """Fold what writes appended into the engine's main structure (``mae index compact``); ``force`` False:
        only when the engine's threshold is passed. Returns what was done (``compacted``: bool, figures)."""

    @abstractmethod
    def reload(self) -> bool:
        """Pick up generations other processes committed; True when something changed. Cheap when nothing did:
        a server calls it before every read."""

    @abstractmethod
    def close(self) -> None:
        """Release files and connections."""

    # ------------------------------------------------------------------ shared: facts

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def factory(self) -> str:
        return str(self.manifest["factory"])

    @property
    def artifact_sha256(self) -> str:
        return str(self.manifest["artifact_sha256"])

    @property
    def roots(self) -> list[Path]:
        """The indexed folders (and files): answers show paths relative to them; uploads are one of them."""
        return [Path(p) for p in self.manifest.get("images") or []] + [self.uploads]

    def check_artifact(self, sha256: str | None) -> None:
        """Refuse (IndexMismatchError) queries embedded by another artifact than the one that built the index."""
        if sha256 is not None and sha256 != self.artifact_sha256:
            raise mismatch(self.name, self.artifact_sha256, sha256)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.count} items, {self.factory})"

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ shared: paths as answers show them

    def relative(self, path: str) -> str:
        """``path`` as answers show it: relative to the folder above the indexed folder that holds it
        (``/data/photos/2024/a.jpg`` under root ``/data/photos`` -> ``photos/2024/a.jpg``), so that a client
        learns where an item sits in the collection but nothing about the server's file system."""
        p = Path(path)
        for root in sorted(self.roots, key=lambda r: len(r.parts), reverse=True):
            if p == root or root in p.parents:
                return p.relative_to(root.parent).as_posix()
        return p.name

    def path_prefixes(self, value: str) -> list[str]:
        """A path as a filter gives it (absolute, or relative as answers show it) -> absolute candidates."""
        if value.startswith("/"):
            return [value]
        parents = dict.fromkeys(str(r.parent).rstrip("/") for r in self.roots)
        return [f"{parent}/{value}" for parent in parents]

    # ------------------------------------------------------------------ shared: reads

    def queries(self, vectors: np.ndarray) -> np.ndarray:
        """Query vectors checked ((N, D) or (D,), finite floats) and L2-normalised: float32 (N, D), a copy."""
        x = np.asarray(vectors)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UsageError(f"query vectors must have shape (N, {self.dim}), got {tuple(np.shape(vectors))}")
        if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
            raise UsageError("query vectors must be finite floating-point numbers")
        x = np.array(x, dtype=np.float32, order="C")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x /= np.where(norms > 0, norms, 1.0)
        return x

    def search(self, vectors: np.ndarray, k: int = 10, *, where: Iterable[str | Condition] | str | None = None,
               min_score: float | None = None, exclude: Sequence[int] | None = None) -> list[list[Hit]]:
        """Top-k neighbours of each query (N, D), best first.

        ``where``: filter conditions (all must hold; ``retrieval.filters``); exactly k come back when at least k
        live items match. ``min_score``: drop neighbours below this cosine. ``exclude``: one id per query left
        out of its answer (the item itself, for "more like this"). Fewer than k when fewer items qualify.
        """
        conditions = parse_filters(where)
        with self.lock:
            extra = 1 if exclude is not None else 0
            scores, ids = self.search_ids(vectors, k + extra, where=conditions, min_score=min_score)
            rows = self.rows(np.unique(ids[ids >= 0]).tolist())
        out = []
        for j, (srow, irow) in enumerate(zip(scores, ids)):
            skip = int(exclude[j]) if exclude is not None else None
            hits = [hit_of(rows[int(i)], float(s)) for s, i in zip(srow, irow)
                    if i >= 0 and int(i) in rows and int(i) != skip]
            out.append(hits[:k])
        return out

    def search_ids(self, vectors: np.ndarray, k: int = 10, *, where: Iterable[str | Condition] | str | None = None,
                   min_score: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Ids and scores only: scores (N, k') float32 and ids (N, k') int64, -inf / -1 where there is none.

        k' is k capped at the number of live items (at least 1): asking for a billion neighbours must not
        allocate a billion slots.
        """
        x = self.queries(vectors)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise UsageError(f"k must be >= 1, got {k}")
        if min_score is not None and not math.isfinite(min_score):
            raise UsageError(f"min_score must be a finite number, got {min_score}")
        conditions = parse_filters(where)
        n = len(x)
        with self.lock:
            k = min(int(k), max(self.count, 1))
            D = np.full((n, k), -np.inf, np.float32)
            I = np.full((n, k), -1, np.int64)
            if self.count == 0 or n == 0:
                return D, I
            found_D, found_I = self.knn(x, k, conditions)
        width = min(k, found_I.shape[1])
        D[:, :width], I[:, :width] = found_D[:, :width], found_I[:, :width]
        if min_score is not None:
            low = (min_score > D) | (I < 0)
            D, I = np.where(low, -np.inf, D).astype(np.float32), np.where(low, -1, I)
        return D, I

    def similar(self, item_id: int, k: int = 10, *, where: Iterable[str | Condition] | str | None = None,
                min_score: float | None = None) -> list[Hit]:
        """"More like this": the k items nearest to a stored item's vector, the item itself left out."""
        with self.lock:
            vector = self.vectors([item_id])
            return self.search(vector, k, where=where, min_score=min_score, exclude=[int(item_id)])[0]

    def row(self, id: int) -> Row | None:
        """The stored description of a live id (None for removed, uncommitted or impossible ids)."""
        if not 0 <= int(id) <= MAX_ID:
            return None
        return self.rows([int(id)]).get(int(id))

    def item(self, id: int) -> Hit | None:
        """A live item as a hit (score 1.0: an item is its own best match), for thumbnails."""
        row = self.row(id)
        return None if row is None else hit_of(row, 1.0)

    def neighbours(self, ids: Sequence[int], k: int, min_score: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batched candidate search of ``duplicates``: each live item of ``ids`` as a query (its stored
        vector) for its k nearest. Returns (the live ids asked, ascending: int64 (M,), scores (M, k'), ids
        (M, k')); an engine may answer it more cheaply than vectors + search."""
        with self.lock:
            chunk = np.asarray(sorted(self.rows(ids)), np.int64)
            if not len(chunk):
                return chunk, np.zeros((0, 1), np.float32), np.zeros((0, 1), np.int64)
            D, I = self.search_ids(self.vectors(chunk), k, min_score=min_score)
        return chunk, D, I

    def duplicates(self, threshold: float = DUPLICATE_THRESHOLD, k: int = DUPLICATE_K,
                   progress: Callable[[int, int], None] | None = None,
                   check: Callable[[np.ndarray], np.ndarray] | None = None) -> list[list[tuple[int, float]]]:
        """Groups of near-copies: items whose cosine with another reaches ``threshold``, joined transitively.

        Each live item is a query (its stored vector) for its k nearest; pairs at or above the threshold are
        edges and the groups are their connected components (union-find), largest first. ``check`` (e.g. a
        ``retrieval.verify.PixelCheck``) takes the candidate pairs, (P, 2) ids, and says which to keep: then
        the threshold only proposes. Each group lists (id, best cosine of that item with a member it joined).
        """
        if not -1.0 <= threshold <= 1.0:
            raise UsageError(f"threshold must be a cosine in [-1, 1], got {threshold}")
        ids = self.live_ids()
        groups = _Groups(ids)
        for i in range(0, len(ids), DUPLICATE_BLOCK):  # a block at a time: searches of other threads interleave
            chunk, D, I = self.neighbours(ids[i : i + DUPLICATE_BLOCK].tolist(), k + 1, threshold)
            groups.join(chunk, D, I, check)
            if progress:
                progress(min(i + DUPLICATE_BLOCK, len(ids)), len(ids))
        return groups.result()

    # ------------------------------------------------------------------ shared: writes

    def remove(self, keys: Iterable[int | str | Path]) -> RemoveResult:
        """Remove items by id (int, or a string of digits) or by file path (absolute, or relative as answers
        show it) as one new generation; keys that name no live item are listed in ``missing``."""
        ids_asked, paths_asked = [], {}  # path as given -> the stored paths it may mean
        for key in keys:
            if isinstance(key, (int, np.integer)) or isinstance(key, str) and key.isdigit():
                ids_asked.append(int(key))
            else:
                given = str(Path(key).expanduser().resolve())
                shown = [] if Path(key).is_absolute() else self.path_prefixes(Path(key).as_posix())
                paths_asked[given] = [given, *shown]
        return self.delete(ids_asked, paths_asked)


def split_duplicates(items: Sequence[Item], known: Mapping[str, int]) -> tuple[list[int], AddResult]:
    """Which ``items`` an add keeps (positions), and an AddResult naming the others: bytes already indexed
    (``known``: sha256 -> live id) or repeated earlier in ``items``."""
    keep, seen, result = [], set(known), AddResult()
    for j, it in enumerate(items):
        if it.sha256 in seen:
            result.duplicates.append(it.path)
            result.duplicate_ids.append(known.get(it.sha256))
        else:
            seen.add(it.sha256)
            keep.append(j)
    return keep, result


def hit_of(row: Row, score: float) -> Hit:
    return Hit(row.id, score, row.path, row.label, row.tags)


def mismatch(name: str | Path, built_with: str, given: str) -> IndexMismatchError:
    return IndexMismatchError(
        f"index {name} was built with artifact sha256 {built_with}, but the artifact given has sha256 {given}: its "
        "embeddings are not comparable. Rebuild the index with this artifact (mae index build) or search with the "
        "artifact it was built with")


class _Groups:
    """Union-find over candidate pairs, for ``Index.duplicates``."""

    def __init__(self, ids: np.ndarray):
        self.parent = {int(i): int(i) for i in ids}
        self.best: dict[int, float] = {}
        self.seen: set[tuple[int, int]] = set()

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def join(self, chunk: np.ndarray, D: np.ndarray, I: np.ndarray,
             check: Callable[[np.ndarray], np.ndarray] | None) -> None:
        edges: dict[tuple[int, int], float] = {}
        for a, drow, irow in zip(chunk.tolist(), D, I):
            for s, b in zip(drow.tolist(), irow.tolist()):
                pair = (min(a, b), max(a, b))
                if b >= 0 and b != a and b in self.parent and pair not in self.seen:
                    edges[pair] = s
        self.seen.update(edges)
        pairs = np.asarray(list(edges), np.int64).reshape(-1, 2)
        kept = np.asarray(check(pairs), bool) if check is not None and len(pairs) else np.ones(len(pairs), bool)
        for (a, b), s in zip(pairs[kept].tolist(), np.asarray(list(edges.values()))[kept].tolist()):
            self.best[a] = max(self.best.get(a, -1.0), s)
            self.best[b] = max(self.best.get(b, -1.0), s)
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)

    def result(self) -> list[list[tuple[int, float]]]:
        groups: dict[int, list[int]] = {}
        for a in self.best:
            groups.setdefault(self.find(a), []).append(a)
        out = [sorted((m, round(self.best[m], 6)) for m in members) for members in groups.values() if len(members) > 1]
        return sorted(out, key=lambda g: (-len(g), g[0][0]))
