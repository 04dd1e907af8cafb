"""A FAISS index folder on disk: its files, how they are read, written and committed, and the write lock.

``INDEX/`` holds::

    index.faiss     the FAISS index (catalogue ids are FAISS ids), inner product on L2-normalised vectors
    items.sqlite    what each id stands for (retrieval.catalog)
    manifest.json   artifact sha256, dim, metric, factory, count, tuned search parameters, build figures,
                    the indexed folders (``images``); its ``generation`` is the commit point of every write
    lists.G.ivfdata the inverted lists of an on-disk IVF index (sharded builds), memory-mapped
    trained.faiss   on-disk indexes: the trained, empty IVF that new shards start from
    uploads/        images added over HTTP (``POST /items``), named by their sha256
    .lock           the write lock (flock): one writer at a time, CLI or HTTP

How a write commits, and what a reader does with it, is in ``retrieval.faiss_index``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from mae.errors import UserError
from mae.files import (
    MAX_JSON_BYTES,
    FileTooLargeError,
    NotRegularFileError,
    fsync,
    fsync_dir,
    read_regular,
    write_json_atomic,
)
from retrieval import faiss_log
from retrieval.catalog import FILENAME as CATALOG_FILE
from retrieval.catalog import Catalog, CatalogError
from retrieval.engine import IndexBusyError, IndexDamagedError, mismatch, repair_hint
from retrieval.faiss_log import valid_ranges
from retrieval.tuning import FactoryChoice, faiss_message

FORMAT = 2  # 2: the append log (base_generation, base_ntotal, log, log_vectors, log_removed)
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
TRAINED_FILE = "trained.faiss"
LOCK_FILE = ".lock"
COMPACT_LOCK_FILE = ".compact.lock"
COMPACTING = "index.compacting.faiss"  # a compaction's new index.faiss, until it commits
UPLOADS = "uploads"
METRIC = "inner_product"


def damaged(path: Path, message: str) -> IndexDamagedError:
    """IndexDamagedError naming what disagrees and the way out."""
    return IndexDamagedError(f"{message}; {repair_hint(path)}")


# ----------------------------------------------------------------------------------------------- reading and writing


def read_manifest(path: Path) -> dict[str, Any]:
    """The committed manifest, checked field by field: a damaged one is refused by name, not with a TypeError."""
    file = path / MANIFEST
    try:
        manifest = json.loads(read_regular(file, MAX_JSON_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise damaged(path, f"{file} is missing") from None
    except (NotRegularFileError, FileTooLargeError) as e:  # a FIFO or a device would block or never end
        raise damaged(path, str(e)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(path, f"{file} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise damaged(path, f"{file} is not a JSON object")
    fmt = manifest.get("format", 0)
    if not _whole(fmt):
        raise damaged(path, f"{file}: 'format' must be a whole number, got {fmt!r}")
    if fmt > FORMAT:
        raise UserError(f"{path} has index format {fmt}; this version reads up to {FORMAT}")
    for key, valid, what in (("generation", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
                             ("dim", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
                             ("count", _whole, "a whole number >= 0"), ("ntotal", _whole, "a whole number >= 0"),
                             ("artifact_sha256", lambda v: isinstance(v, str) and v != "", "a sha256 string"),
                             ("factory", lambda v: isinstance(v, str) and v != "", "a factory string")):
        if key not in manifest:
            raise damaged(path, f"{file} lacks {key!r}")
        if not valid(manifest[key]):
            raise damaged(path, f"{file}: {key!r} must be {what}, got {manifest[key]!r}")
    for key in ("search_params", "tuning", "build"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise damaged(path, f"{file}: {key!r} must be an object, got {manifest[key]!r}")
    images = manifest.get("images")
    if images is not None and not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
        raise damaged(path, f"{file}: 'images' must be a list of folders, got {images!r}")
    # Before the append log (format 1) index.faiss held everything: a log-less manifest says so.
    manifest.setdefault("base_generation", manifest["generation"])
    manifest.setdefault("base_ntotal", manifest["ntotal"])
    for key in ("log_vectors", "log_removed", "tombstones", "compacted"):
        manifest.setdefault(key, 0)
    manifest.setdefault("log", [])
    for key in ("base_generation", "base_ntotal", "log_vectors", "log_removed", "tombstones", "compacted"):
        if not _whole(manifest[key]):
            raise damaged(path, f"{file}: {key!r} must be a whole number >= 0, got {manifest[key]!r}")
    if not valid_ranges(manifest["log"]):
        raise damaged(path, f"{file}: 'log' must be a list of [segment, start, end], got {manifest['log']!r}")
    if manifest["base_generation"] > manifest["generation"] or \
            manifest["base_ntotal"] + manifest["log_vectors"] != manifest["ntotal"]:
        raise damaged(path, f"{file}: the base ({manifest['base_ntotal']} vectors at generation "
                            f"{manifest['base_generation']}) and the log ({manifest['log_vectors']}) do not add up to "
                            f"{manifest['ntotal']} vectors at generation {manifest['generation']}")
    return manifest


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def write_index(index: faiss.Index, path: str | Path) -> None:
    """Write a FAISS index file atomically (temp file + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    fsync(tmp)
    os.replace(tmp, path)


def remove_from_file(path: str | Path, ids: Sequence[int]) -> None:
    """Drop ``ids`` from the index stored in ``path`` (a shard of a sharded build)."""
    index = faiss.read_index(str(path))
    index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, np.int64)))
    write_index(index, path)


def set_threads(threads: int) -> None:
    """FAISS's OpenMP threads in this process (a shard worker gets its share of the cores)."""
    faiss.omp_set_num_threads(max(1, int(threads)))


def check_artifact(path: Path, manifest: dict[str, Any], sha256: str | None) -> None:
    """Refuse an index built by another artifact than ``sha256`` (None: no check)."""
    if sha256 is not None and sha256 != manifest["artifact_sha256"]:
        raise mismatch(path, manifest["artifact_sha256"], sha256)


def read_base(path: Path, manifest: dict[str, Any], mmap: bool) -> faiss.Index:
    """The committed base (the index file as of ``base_generation`` B): ``index.B.faiss`` while its rename is
    pending, else index.faiss."""
    gen = manifest["base_generation"]
    staged = path / f"index.{gen}.faiss"
    candidates = [staged, path / INDEX_FILE] if staged.exists() else [path / INDEX_FILE]
    for i, file in enumerate(candidates):
        try:
            return read_index_file(file, path, manifest, mmap)
        except FileNotFoundError:
            if i == len(candidates) - 1:
                raise
    raise AssertionError("unreachable")


def read_index_file(file: Path, folder: Path, manifest: dict[str, Any], mmap: bool) -> faiss.Index:
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing")
    if file.stat().st_size == 0:
        raise damaged(folder, f"{file} is empty (0 bytes)")
    if manifest.get("ivfdata"):
        data = folder / manifest["ivfdata"]
        if not data.exists():
            raise damaged(folder, f"{data} (the on-disk inverted lists) is missing")
    try:
        if manifest.get("ivfdata"):
            # The lists file path stored inside the index is absolute: point it at this folder's copy.
            index = faiss.read_index(str(file), faiss.IO_FLAG_SKIP_IVF_DATA)
            ivf = faiss.extract_index_ivf(index)
            lists = faiss.downcast_InvertedLists(ivf.invlists)
            lists.filename = str(folder / manifest["ivfdata"])
            lists.read_only = True
            lists.do_mmap()
            return index
        index = faiss.read_index(str(file), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as e:
        if not file.exists():
            raise FileNotFoundError(f"{file} is missing") from e
        raise damaged(folder, f"{file} is not a readable FAISS index ({faiss_message(e)})") from e
    if index.d != manifest["dim"]:
        raise damaged(folder, f"{file} holds {index.d}-d vectors but {folder / MANIFEST} says {manifest['dim']}")
    return index


def recover(path: Path, manifest: dict[str, Any], catalog: Catalog) -> None:
    """Finish or undo what an interrupted write or compaction left (call under the write lock).

    A base whose commit is done but whose rename is pending is renamed; files no committed generation names
    are deleted (an index file a crash staged, the uncommitted end of the log, folded log segments and
    inverted lists), except the work of a compaction that is running now; catalogue rows of uncommitted
    generations are deleted, and removed rows whose vectors have left index.faiss are forgotten.
    """
    staged = path / f"index.{manifest['base_generation']}.faiss"
    if staged.exists():  # committed, rename pending
        os.replace(staged, path / INDEX_FILE)
    busy = compaction_running(path)
    for f in path.iterdir():
        stray_index = re.fullmatch(r"index\.\d+\.faiss(\.tmp)?|index\.faiss\.tmp|manifest\.json(\.\w+)?\.tmp", f.name)
        compacting = f.name.startswith(COMPACTING) or f.name.endswith(".ivfdata") and f.name != manifest.get("ivfdata")
        if stray_index and not (busy and f.name.endswith(".tmp")) or compacting and not busy:
            remove_if_exists(f)
    faiss_log.discard_uncommitted(path, faiss_log.ranges(manifest))
    catalog.recover(manifest["generation"])
    catalog.purge_removed(manifest["compacted"])


@contextlib.contextmanager
def compaction_lock(path: Path) -> Iterator[bool]:
    """``INDEX/.compact.lock``, taken without waiting: yields whether this process got it (one compaction at a
    time; writers go on meanwhile)."""
    with open(path / COMPACT_LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compaction_running(path: Path) -> bool:
    """Whether some process (this one included) holds the compaction lock now."""
    with compaction_lock(path) as got:
        return not got


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what C++ code prints on file descriptor 1 to stderr while inside (stdout carries --json)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def write_lock(path: Path, timeout: float | None = None) -> Iterator[None]:
    """``INDEX/.lock``, exclusively: wait for it (``timeout`` None) or give up after ``timeout`` seconds."""
    with open(path / LOCK_FILE, "a+") as f:
        if timeout is None:
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise IndexBusyError(f"another writer has held {path} for over {timeout:g} s; "
                                             "try again when it is done") from None
                    time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_if_exists(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def commit_base(path: Path, manifest: dict[str, Any], catalog: Catalog, staged: Path) -> dict[str, Any]:
    """Commit ``manifest``, whose new base (index.faiss as of its ``base_generation`` B) is the file ``staged``.

    The base is renamed to ``index.B.faiss``, the manifest replaced (the commit point), then ``index.B.faiss``
    renamed over index.faiss; a crash between leaves what ``read_base`` and ``recover`` finish or undo. The
    caller holds the write lock and has stored the catalogue's side; returns the committed manifest.
    """
    target = path / f"index.{manifest['base_generation']}.faiss"
    if staged != target:
        os.replace(staged, target)
    manifest = dict(manifest, format=FORMAT, updated=now())
    write_json_atomic(path / MANIFEST, manifest)  # the commit point
    os.replace(target, path / INDEX_FILE)
    fsync_dir(path)
    recover(path, manifest, catalog)
    return manifest


def rewritten(manifest: dict[str, Any], catalog: Catalog, gen: int, index: faiss.Index, removable: bool
              ) -> dict[str, Any]:
    """The manifest of generation ``gen`` whose base ``index`` holds everything (an empty log): a repair's."""
    compacted = gen if removable else manifest.get("compacted", 0)
    return dict(manifest, generation=gen, base_generation=gen, base_ntotal=int(index.ntotal), ntotal=int(index.ntotal),
                log=[], log_vectors=0, log_removed=0, count=catalog.count(gen), compacted=compacted,
                tombstones=len(catalog.tombstones(gen, compacted)))


def open_catalog(path: Path) -> Catalog:
    try:
        return Catalog(path / CATALOG_FILE, read_only=not os.access(path, os.W_OK))
    except CatalogError as e:
        raise damaged(path, str(e)) from e


def manifest_stat(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path / MANIFEST)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


# ----------------------------------------------------------------------------------------------- building


def fill_shard(trained_path: str | Path, vectors: np.ndarray, ids: np.ndarray, out: str | Path) -> int:
    """One shard of a sharded build: the trained (empty) IVF + these vectors, written to ``out``."""
    index = faiss.read_index(str(trained_path))
    x = np.ascontiguousarray(vectors, np.float32)
    faiss.normalize_L2(x)
    if len(x):
        index.add_with_ids(x, np.asarray(ids, np.int64))
    faiss.write_index(index, str(out))
    return int(index.ntotal)


def new_manifest(artifact_sha256: str, dim: int, choice: FactoryChoice, requested: str, tuning: dict[str, Any],
                  figures: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    extra = dict(extra or {})
    build_figures = dict(extra.pop("build", {}), **figures, tuning_seconds=tuning.get("seconds"))
    return {
        "format": FORMAT, "generation": 1, "artifact_sha256": artifact_sha256, "dim": int(dim),
        "metric": METRIC, "normalized": True, "factory": choice.factory, "factory_requested": requested,
        "factory_reason": choice.reason, "nlist": choice.nlist, "ivfdata": None,
        "search_params": tuning.get("params", {}), "tuning": tuning, "build": build_figures,
        "faiss_version": faiss.__version__, "created": now(), "updated": now(), **extra,
    }


def commit_first(folder: Path, manifest: dict[str, Any], index: faiss.Index, catalog: Catalog) -> None:
    manifest.update(ntotal=int(index.ntotal), base_ntotal=int(index.ntotal), base_generation=1, count=catalog.count(1),
                    tombstones=0, compacted=1, log=[], log_vectors=0, log_removed=0)
    write_index(index, folder / INDEX_FILE)
    write_json_atomic(folder / MANIFEST, manifest)


@contextlib.contextmanager
def staging(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temp folder beside ``out`` that replaces it (atomically, when it did not exist) on success."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        if (out / MANIFEST).exists():
            raise FileExistsError(f"{out} already holds an index; add to it with `mae index add`, or pass --overwrite")
        if out.is_file() or any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the index is an ordinary folder
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def blocks(x: np.ndarray, ids: np.ndarray, size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i in range(0, len(x), size):
        yield x[i : i + size], ids[i : i + size]
