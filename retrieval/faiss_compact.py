"""Compaction of a FAISS folder: the append log folded into a new ``index.faiss``.

A write appends to the log (``retrieval.faiss_log``) and leaves ``index.faiss`` alone, so readers pay only for
what changed; searching then costs the base plus the log's vectors, and removed vectors stay as tombstones.
Compaction bounds both: when the log holds more than ``COMPACT_FRACTION`` of the collection (and at least
``COMPACT_MIN`` changes) or ``COMPACT_BYTES``, or when tombstones pass ``REBUILD_FRACTION`` of an index that
cannot drop vectors (HNSW, which is then rebuilt), the base and the log as of a committed generation B are
read from disk and folded into one index (``fold``), written beside the folder's files. Only the compaction
lock is held meanwhile: writers go on appending after B and readers never wait. The commit (under the write
lock, by ``retrieval.faiss_index``) names the new base as of B and keeps in the log what was appended after B.

Measured (bench/retrieval.py --writes): at 1% of a 1M x 256 Flat collection in the log, search runs at about
the compacted index's rate; a compaction of that index costs a rewrite of ``index.faiss`` (seconds), once per
1% of the collection written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss

from retrieval import faiss_log
from retrieval.catalog import Catalog
from retrieval.faiss_log import ADD, Range
from retrieval.faiss_store import COMPACTING, read_base, write_index
from retrieval.faiss_vectors import fold, rebuilt, supports_remove

# Fold when the log's changes (vectors added + ids removed) reach this fraction of the base and at least
# COMPACT_MIN of them, or when its bytes reach COMPACT_BYTES. At 1% the log's vectors cost a search about 1% of
# the base's; a fold rewrites the base, so a smaller fraction means more rewrites per item written.
COMPACT_FRACTION = 0.01
COMPACT_MIN = 1024
COMPACT_BYTES = 256 << 20
# An index that cannot drop vectors (HNSW) is rebuilt without its tombstones once they pass this fraction.
REBUILD_FRACTION = 0.2


@dataclass(frozen=True)
class Thresholds:
    """When a folder compacts by itself (``FaissIndex.compaction``)."""

    fraction: float = COMPACT_FRACTION
    minimum: int = COMPACT_MIN
    bytes: int = COMPACT_BYTES


def due(manifest: dict[str, Any], thresholds: Thresholds, removable: bool) -> str | None:
    """Why the committed log should be folded now (None: it need not)."""
    changes = manifest["log_vectors"] + manifest["log_removed"]
    size = faiss_log.committed_bytes(faiss_log.ranges(manifest))
    limit = max(thresholds.minimum, thresholds.fraction * max(manifest["base_ntotal"], 1))
    if changes and changes >= limit:
        return f"the log holds {changes} changes, over {limit:g} ({thresholds.fraction:.0%} of the base)"
    if changes and size >= thresholds.bytes:
        return f"the log holds {size / 2**20:.0f} MiB, over {thresholds.bytes / 2**20:.0f} MiB"
    if not removable and not manifest.get("ivfdata") and \
            manifest["tombstones"] > REBUILD_FRACTION * max(manifest["ntotal"], 1):
        return f"{manifest['tombstones']} tombstones, over {REBUILD_FRACTION:.0%} of the vectors: rebuild"
    return None


def worth_folding(manifest: dict[str, Any], removable: bool) -> bool:
    """Whether a fold would change anything: log records to fold in, or tombstones that a rebuild would drop."""
    logged = manifest["log_vectors"] + manifest["log_removed"] > 0
    crowded = not removable and not manifest.get("ivfdata") and \
        manifest["tombstones"] > REBUILD_FRACTION * max(manifest["ntotal"], 1)
    return logged or crowded


def fold_to_disk(path: Path, plan: dict[str, Any], catalog: Catalog, gpu: bool | None = None
                 ) -> tuple[faiss.Index, bool, dict[str, float]]:
    """The base and the log of ``plan`` (the manifest at the fold's generation B), read from disk and folded into
    one index, written as ``index.compacting.faiss``; returns it, whether it was rebuilt, and timings.

    Needs no write lock: a committed generation's files do not change (writers only append after it).
    """
    started = time.perf_counter()
    b = plan["generation"]
    base = read_base(path, plan, mmap=False)
    adds = [(r.ids, r.vectors) for r, _ in faiss_log.read(path, faiss_log.ranges(plan), plan["dim"]) if r.kind == ADD]
    read = time.perf_counter()
    dead = catalog.tombstones(b, plan["compacted"])
    removable = supports_remove(base)
    lists = path / f"lists.{b}.ivfdata" if plan.get("ivfdata") else None
    index = fold(base, adds, dead, removable, lists)
    was_rebuilt = False
    if not removable and lists is None and len(dead) > REBUILD_FRACTION * max(index.ntotal, 1):
        index = rebuilt(index, plan["factory"], catalog.live_ids(b), plan.get("search_params", {}), gpu=gpu)
        was_rebuilt = True
    folded = time.perf_counter()
    write_index(index, path / COMPACTING)
    return index, was_rebuilt, {"read_seconds": round(read - started, 3), "fold_seconds": round(folded - read, 3),
                                "write_seconds": round(time.perf_counter() - folded, 3)}


def after_fold(plan: dict[str, Any], current: dict[str, Any], index: faiss.Index, was_rebuilt: bool,
               catalog: Catalog) -> dict[str, Any]:
    """The manifest that commits a fold of ``plan`` (generation B) on top of ``current`` (B or later): the new
    base as of B, and in the log only what was appended after B."""
    b = plan["generation"]
    gen = current["generation"] + 1
    rest = remaining(faiss_log.ranges(plan), faiss_log.ranges(current))
    vectors = current["log_vectors"] - plan["log_vectors"]
    removed = current["log_removed"] - plan["log_removed"]
    compacted = b if supports_remove(index) or was_rebuilt else current["compacted"]
    lists = f"lists.{b}.ivfdata" if plan.get("ivfdata") else None
    return dict(current, generation=gen, base_generation=b, base_ntotal=int(index.ntotal),
                ntotal=int(index.ntotal) + vectors, log=faiss_log.as_manifest(rest), log_vectors=vectors,
                log_removed=removed, compacted=compacted, tombstones=len(catalog.tombstones(gen, compacted)),
                ivfdata=lists or current.get("ivfdata"))


def remaining(folded: list[Range], current: list[Range]) -> list[Range]:
    """The ranges of ``current`` past the end of ``folded`` (what was appended after the fold's generation)."""
    if not folded:
        return current
    end = folded[-1]
    gone = {r.file for r in folded}
    out = []
    for r in current:
        if r.file == end.file:
            if r.end > max(r.start, end.end):
                out.append(Range(r.file, max(r.start, end.end), r.end))
        elif r.file not in gone:
            out.append(r)
    return out
