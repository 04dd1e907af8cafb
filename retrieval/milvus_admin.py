"""Making and repairing a Milvus index: the work done once per collection, not per request (``retrieval.milvus_index``
holds the index; ``retrieval.milvus_store`` the schema, the ledger and connections)."""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mae.artifact_config import ArtifactConfig, ArtifactError
from mae.errors import UsageError
from retrieval.catalog import Item, Row, check_items
from retrieval.filters import MAX_ID
from retrieval.milvus_store import (
    FORMAT,
    METRIC,
    Target,
    check_lite_type,
    check_sizes,
    choose_index,
    close_client,
    connect,
    create_collection,
    create_indexes,
    create_ledger,
    ensure_loaded,
    index_type_of,
    insert_rows,
    is_lite,
    knob_of,
    ledger_top_id,
    milvus_errors,
    parse_target,
    tune,
    utc_now,
    vector_dim,
)
from retrieval.tuning import TARGET_RECALL, TUNE_QUERIES


def create(target: str, vectors: np.ndarray, items: Sequence[Item], *, artifact_sha256: str, factory: str = "auto",
           overwrite: bool = False, extra: dict[str, Any] | None = None, max_memory: int | None = None,
           target_recall: float = TARGET_RECALL, seed: int = 0, rows: Sequence[Row] | None = None,
           progress: bool = False, **_options: Any) -> None:
    """A new collection from vectors (N, D) and their items; it appears complete or not at all (built under a
    temporary name, then renamed). ``rows``: catalogue rows to keep (ids, dates, tags: ``mae index migrate``);
    ``vectors`` may then be a memory-mapped array, read a batch at a time."""
    t = parse_target(target)
    x = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors, np.float32)
    if x.ndim != 2 or len(x) != len(items) or (rows is not None and len(rows) != len(items)):
        raise ValueError(f"expected vectors (N, D) for {len(items)} items, got shape {x.shape}")
    check_items(items)
    check_sizes(items)
    keep, ids, added = _kept(items, rows)
    n, dim = len(keep), int(x.shape[1])
    choice = choose_index(factory, n, dim, max_memory=max_memory)
    if t.local is not None:
        check_lite_type(t, choice)
    client = connect(t)
    tmp = Target(t.uri, f"{t.collection[:180]}_mae_new_{secrets.token_hex(4)}", t.db_name, t.local)
    try:
        with milvus_errors(t):
            lite = is_lite(client)
            if lite:  # a milvus-lite server process
                check_lite_type(t, choice)
            if client.has_collection(t.collection) and not overwrite:
                raise FileExistsError(f"{t.name} already exists (--overwrite replaces it)")
            create_collection(client, tmp.collection, dim, _properties(artifact_sha256, dim, choice, extra))
            create_ledger(client, tmp.ledger, max(ids, default=0))
            rng = np.random.default_rng(seed)
            held = np.zeros(n, bool)
            if knob_of(choice.index_type) and n > 10 * (10 + 1):
                held[rng.choice(n, min(TUNE_QUERIES, n // 10), replace=False)] = True
            order = [p for p in range(n) if not held[p]]
            bar = _progress(progress, n, f"writing {t.name}")
            insert_rows(client, tmp.collection, x, items, keep, ids, added, order, bar)
            client.flush(tmp.collection)
            create_indexes(client, tmp.collection, choice, scalars=not lite)
            if held.any():  # tuned on held-out items, which are added only afterwards
                tuning = tune(client, tmp.collection, choice, x, keep, ids, held, target_recall)
                client.alter_collection_properties(tmp.collection, properties={
                    "mae.search_params": json.dumps(tuning.pop("params")), "mae.tuning": json.dumps(tuning)})
                insert_rows(client, tmp.collection, x, items, keep, ids, added, list(np.flatnonzero(held)), bar)
                client.flush(tmp.collection)
            bar.close()
            _replace(client, tmp, t)
    except BaseException:
        with contextlib.suppress(Exception):
            for name in (tmp.collection, tmp.ledger):
                if client.has_collection(name):
                    client.drop_collection(name)
        close_client(t, client)
        raise
    close_client(t, client)


def _kept(items: Sequence[Item], rows: Sequence[Row] | None) -> tuple[list[int], list[int], list[str]]:
    """Which items become rows (positions), their ids and their added stamps: new ids from 1 with files indexed
    once (by sha256), or the ``rows`` kept as they are."""
    if rows is None:
        keep, seen = [], set()
        for j, it in enumerate(items):
            if it.sha256 not in seen:
                seen.add(it.sha256)
                keep.append(j)
        return keep, list(range(1, len(keep) + 1)), [utc_now()] * len(keep)
    ids = [int(r.id) for r in rows]
    if len(set(ids)) != len(ids) or any(not 1 <= i <= MAX_ID for i in ids):
        raise ValueError("rows to keep must have distinct ids from 1 to 2**63 - 1")
    return list(range(len(items))), ids, [r.added for r in rows]


def _properties(artifact_sha256: str, dim: int, choice: Any, extra: dict[str, Any] | None) -> dict[str, str]:
    """The facts FAISS keeps in manifest.json, as collection properties."""
    extra = dict(extra or {})
    return {"mae.format": str(FORMAT), "mae.artifact_sha256": artifact_sha256, "mae.dim": str(dim),
            "mae.metric": METRIC, "mae.factory": choice.factory, "mae.factory_reason": choice.reason,
            "mae.index_type": choice.index_type, "mae.index_params": json.dumps(choice.params),
            "mae.created": utc_now(), "mae.artifact": str(extra.pop("artifact", "") or ""),
            "mae.images": json.dumps([str(p) for p in extra.pop("images", []) or []]),
            "mae.build": json.dumps({**extra.pop("build", {}), **extra}, default=str)}


def _replace(client: Any, tmp: Target, t: Target) -> None:
    """Rename the finished collection and ledger into place (``--overwrite``: the old ones go just before)."""
    for name in (t.collection, t.ledger):
        if client.has_collection(name):
            client.drop_collection(name)
    client.rename_collection(tmp.ledger, t.ledger)
    client.rename_collection(tmp.collection, t.collection)
    ensure_loaded(client, t.ledger)
    ensure_loaded(client, t.collection)


def repair(target: str, artifact: str | Path | None) -> list[str]:
    """What can be repaired without the vectors: a missing or emptied ledger is made again above the highest
    id (ids of items removed at the top may then be handed out again) and missing facts are taken from the
    artifact (``--artifact``). Rows themselves are never rewritten: a problem in them is reported by the check.
    Returns what was done."""
    t = parse_target(target)
    client = connect(t, existing=True)
    done: list[str] = []
    try:
        with milvus_errors(t):
            if not client.has_collection(t.collection):
                raise FileNotFoundError(f"no index at {t.name} (no collection {t.collection!r}): nothing to repair")
            desc = client.describe_collection(t.collection)
            props = desc.get("properties") or {}
            dim = vector_dim(desc)
            if dim and not props.get("mae.artifact_sha256") and artifact is not None:
                config = ArtifactConfig.read(artifact)
                if config.embed_dim != dim:
                    raise UsageError(f"{artifact} makes {config.embed_dim}-d vectors; {t.name} holds {dim}-d")
                client.alter_collection_properties(t.collection, properties={
                    "mae.format": str(FORMAT), "mae.artifact_sha256": config.sha256, "mae.dim": str(dim),
                    "mae.metric": METRIC, "mae.artifact": str(Path(artifact).resolve())})
                done.append(f"recorded the artifact {config.sha256[:12]} and the dimension {dim}")
            index_type = index_type_of(client, t.collection)
            if index_type and not props.get("mae.index_type"):
                client.alter_collection_properties(t.collection, properties={
                    "mae.index_type": index_type, "mae.factory": index_type})
                done.append(f"recorded the index type {index_type}")
            ledger_ok = client.has_collection(t.ledger)
            if ledger_ok:
                ensure_loaded(client, t.ledger)
                ledger_ok = bool(client.query(t.ledger, filter="generation > 0", output_fields=["key"],
                                              consistency_level="Strong"))
            if not ledger_ok:
                ensure_loaded(client, t.collection)
                it = client.query_iterator(t.collection, batch_size=4096, filter="", output_fields=["id"])
                top = 0
                while batch := it.next():
                    top = max([top, *(int(r["id"]) for r in batch)])
                it.close()
                if client.has_collection(t.ledger):
                    client.drop_collection(t.ledger)
                create_ledger(client, t.ledger, top)
                ensure_loaded(client, t.ledger)
                done.append(f"made the ledger again (new ids start above {top})")
    finally:
        close_client(t, client)
    return done


def row_problems(idx: Any, report: dict[str, Any]) -> list[str]:
    """The rows of an opened MilvusIndex against its facts: the count, one row per id, every id below what the
    ledger has handed out, unit vectors (a sample), the artifact's sha256 where its folder is here."""
    problems = []
    ids = idx.stored_ids()
    unique = np.unique(ids)
    report.update(count=idx.count, generation=idx.generation, index_type=idx.manifest.get("index_type"), rows=len(ids))
    if len(ids) != idx.count:
        problems.append(f"the collection counts {idx.count} items but lists {len(ids)}")
    if len(unique) != len(ids):
        problems.append(f"{len(ids) - len(unique)} id(s) are held by more than one row")
    top = ledger_top_id(idx.client, idx.target)
    if len(ids) and int(ids.max()) > top:
        problems.append(f"id {int(ids.max())} is past the ids the ledger has handed out (up to {top}): a new item "
                        "could be given an id that is taken")
    sample = [int(i) for i in unique[:: max(1, len(unique) // 64)][:64]]
    if sample and not np.allclose(np.linalg.norm(idx.vectors(sample), axis=1), 1.0, atol=1e-3):
        problems.append("stored vectors are not unit length (not written by this engine?)")
    artifact = idx.manifest.get("artifact")
    if artifact and (Path(artifact) / "config.json").is_file():
        try:
            sha = ArtifactConfig.read(artifact).sha256
        except ArtifactError:
            sha = None  # a damaged artifact is the artifact's problem, not the index's
        if sha and sha != idx.artifact_sha256:
            problems.append(f"the artifact {artifact} now has sha256 {sha[:12]}, not the "
                            f"{idx.artifact_sha256[:12]} that built the index")
    return problems


def _progress(enabled: bool, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=None if enabled else True, file=sys.stderr)
