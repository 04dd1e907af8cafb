"""The similarity index, as everything outside ``retrieval/`` uses it: ``Index`` and what its methods answer.

``Index.open(spec)`` opens an index by its name, whichever engine holds it (``retrieval.engine`` defines the
interface and the names; ``retrieval.faiss_index`` is the FAISS folder); ``Index.load(folder)`` opens a FAISS
folder, as it always did. The FAISS folder's own functions (``build``, the file names) are here too, for the
callers that build one directly.
"""

from __future__ import annotations

from retrieval.engine import (
    DUPLICATE_K,
    DUPLICATE_THRESHOLD,
    ENGINES,
    AddResult,
    Hit,
    Index,
    IndexBusyError,
    IndexDamagedError,
    IndexMismatchError,
    IndexSpec,
    ItemNotFoundError,
    RemoveResult,
    accepted_forms,
    canonical,
    parse_spec,
    repair_hint,
)
from retrieval.faiss_index import FaissIndex, build, build_on_disk
from retrieval.faiss_store import (
    FORMAT,
    INDEX_FILE,
    LOCK_FILE,
    MANIFEST,
    METRIC,
    TRAINED_FILE,
    UPLOADS,
    check_artifact,
    fill_shard,
    read_manifest,
    remove_from_file,
    set_threads,
    write_index,
)
from retrieval.faiss_vectors import faiss_ids, max_faiss_id

__all__ = [
    "DUPLICATE_K", "DUPLICATE_THRESHOLD", "ENGINES", "FORMAT", "INDEX_FILE", "LOCK_FILE", "MANIFEST", "METRIC",
    "TRAINED_FILE", "UPLOADS", "AddResult", "FaissIndex", "Hit", "Index", "IndexBusyError", "IndexDamagedError",
    "IndexMismatchError", "IndexSpec", "ItemNotFoundError", "RemoveResult", "accepted_forms", "build", "build_on_disk",
    "canonical", "check_artifact", "faiss_ids", "fill_shard", "max_faiss_id", "parse_spec", "read_manifest",
    "remove_from_file", "repair_hint", "set_threads", "write_index",
]
