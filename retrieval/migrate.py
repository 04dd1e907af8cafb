"""``mae index migrate --from INDEX --to INDEX2``: move an index to another engine without embedding anything again.

What moves is what the index holds: the vectors (a FAISS folder reconstructs them from its index, exactly for Flat,
HNSW and IVF-Flat and as decoded codes for PQ; a Milvus collection returns the stored ones), every catalogue row
as it is (id, path, label, sha256, date added, tags) and the facts (the artifact's sha256 and path, the indexed
folders). The source is read a batch at a time, through ``Index``'s public methods only, into a temporary
memory-mapped file, so that a collection larger than memory can move to Milvus; then ``Index.create`` makes the
target from it with the rows kept (``rows=``), which makes it appear complete or not at all. A write to the source
while it is read refuses the migration before the target is made (run it again with writers stopped).

The target's index type is ``--factory``, by default the source's kind (Flat, HNSW, IVF, IVF-PQ: both engines read
the FAISS-style name the other records), and its search parameters are tuned again on the target.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mae.errors import UsageError, UserError
from retrieval.catalog import Item
from retrieval.engine import Index, canonical

BATCH = 4096


def migrate(source: str | Path, target: str | Path, *, factory: str | None = None, overwrite: bool = False,
            batch: int = BATCH, progress: bool = True) -> dict[str, Any]:
    """Copy ``source`` into a new index ``target`` (any engines); returns a summary with its ``text``."""
    if batch < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch}")
    if canonical(source) == canonical(target):
        raise UsageError(f"--from and --to name the same index ({source})")
    started = time.perf_counter()
    src = Index.open(source, gpu=False)
    try:
        ids = src.live_ids()
        n, dim = len(ids), src.dim
        facts = src.manifest
        images = list(facts.get("images") or [])
        if src.uploads.is_dir() and any(src.uploads.iterdir()):
            images.append(str(src.uploads))  # files added over HTTP keep their paths: the folder stays a root
        extra = {"artifact": facts.get("artifact"), "images": images, "migrated_from": src.name,
                 "build": {"migrated_from": src.name, "source_factory": src.factory}}
        with tempfile.TemporaryDirectory(prefix="mae-migrate-") as tmp:
            vectors = np.lib.format.open_memmap(Path(tmp) / "vectors.npy", mode="w+", dtype=np.float32,
                                                shape=(n, dim))
            rows = []
            from tqdm.auto import tqdm

            with tqdm(total=n, desc=f"reading {src.name}", unit="item", disable=None if progress else True,
                      file=sys.stderr) as bar:
                for start in range(0, n, batch):
                    part = ids[start : start + batch].tolist()
                    found = src.rows(part)
                    if len(found) != len(part):
                        raise UserError(f"{src.name} changed while it was read (items went away); stop its "
                                           "writers and run the migration again")
                    rows += [found[i] for i in part]
                    vectors[start : start + len(part)] = src.vectors(part)
                    bar.update(len(part))
            read_seconds = time.perf_counter() - started
            if src.reload():
                raise UserError(f"{src.name} changed while it was read (generation {facts['generation']} -> "
                                   f"{src.generation}); stop its writers and run the migration again")
            items = [Item(r.path, r.sha256, r.label, r.tags) for r in rows]
            dst = Index.create(target, vectors, items, rows=rows, artifact_sha256=src.artifact_sha256,
                               factory=factory or src.factory, overwrite=overwrite, extra=extra, progress=progress)
            del vectors
    finally:
        src.close()
    with dst:
        summary = dst.info()
        summary.update(source=src.name, target=dst.name, migrated=n, source_factory=facts["factory"],
                       read_seconds=round(read_seconds, 2), seconds=round(time.perf_counter() - started, 2))
    lossy = "PQ" in str(facts["factory"]).upper()
    lines = [f"migrated {n} item(s) from {src.name} ({src.engine}, {facts['factory']}) to {dst.name} "
             f"({dst.engine}, {summary['factory']}) in {summary['seconds']} s; ids, paths, labels, tags and dates kept",
             f"  artifact {src.artifact_sha256[:12]}, {dim}-d vectors"
             + (" (decoded from PQ codes: approximate)" if lossy else ", copied as stored")]
    if summary.get("search_params"):
        lines.append(f"  search parameters tuned again on the target: {summary['search_params']}")
    summary["text"] = "\n".join(lines)
    return summary
