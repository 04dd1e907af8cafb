"""Retrieval benchmark: exact search (the named baseline) against the factories ``auto`` chooses.

For each collection -- low-rank synthetic vectors (a 32-d latent through a fixed map into D dims, plus
noise), clustered synthetic vectors (Gaussian blobs), and optionally real embeddings of bundled images by an
artifact -- it builds an exact ``Flat`` index and the index ``auto`` picks (tuned to recall@10 >= 0.95 on
held-out database vectors), plus the IVF-PQ variant ``auto`` picks when the raw vectors do not fit the memory
budget, and measures on fresh queries: build time (training, adding, tuning, catalogue), size, QPS at batch
1 and batch 1000, recall@1 and @10 against exact search, with every figure also as a ratio to exact.

i.i.d. Gaussian vectors are deliberately absent: with no structure, approximate search loses to exact.

``--filtered`` measures filtered search (``search(where=...)``) instead: low-rank vectors, each item tagged
with a random bucket 000-999 (a filter independent of the vectors, the hard case), filters keeping 50%, 10%,
1% and 0.1% of the collection; recall@10 against exact filtered search and queries per second one query at a
time, against the named baseline "over-fetch 10k then filter" (the unfiltered top 10,000, then the first 10
that match), for an HNSW and an IVF index.

``--writes`` measures what a write costs with the append log (``retrieval.faiss_log``): Flat indexes of 256-d
low-rank vectors at each of ``--sizes``; ``--writes`` single-item adds, each timed, while a reader in another
process polls ``reload()`` as a server does before every request and reports when the new item answers a
search, how long that reload took and how many log bytes it read. The named baseline is what a write and
another worker's reload cost before the log, when every write rewrote index.faiss: writing the whole index
(temp file + fsync + rename) and reading it, timed in the same run. Then, at the largest size (and at
``--qps-n`` for ``--qps-factories``), 1% of the collection is added through the log and searches (one query at
a time, recall@10 against exact search) are timed against the same collection compacted, query by query
alternating between the two. The 1% arrives in writes of ``--qps-batch`` items (uploads); a write of more than
``faiss_vectors.IN_PLACE_MAX`` goes beside an HNSW or IVF base until the compaction it triggers.

``--parse`` times the filter parser on filters of 1-64 KB built to make a backtracking expression quadratic,
against the expression it replaced.

``--duplicates`` measures near-duplicate grouping (``Index.duplicates``) with an artifact: held-out images and
edited copies of some of them (resized, cropped to 90%, JPEG quality 30, rotated a few degrees, brightness and
contrast changed) among distractors, written as files and indexed; pairwise precision and recall of the groups
per threshold, by the cosine alone and with the pixel check (``retrieval.verify``) of the candidates; then every
pair ranked by its score as DISC2021 scores copy detection (micro-AP, recall at precision 0.9 and 0.95), the
share of each kind of copy among its original's 16 nearest, and the bundled photographs' edited copies (is each
copy's nearest photograph its original, by the cosine alone).

    python bench/retrieval.py                         # 100k vectors, quick
    python bench/retrieval.py --n 1000000 --data lowrank
    python bench/retrieval.py --n 0 --artifact demo/artifact --images mnist5k   # real embeddings only
    python bench/retrieval.py --filtered --n 1000000  # filtered search, HNSW and IVF
    python bench/retrieval.py --duplicates --artifact demo/artifact             # the default threshold
    python bench/retrieval.py --writes --sizes 10000,100000,1000000                # the append log
    python bench/retrieval.py --parse                 # the filter parser, against the old expression
    python bench/retrieval.py --milvus --artifact demo/artifact --queries 500   # Milvus against FAISS

``--milvus`` compares the Milvus engine (embedded milvus-lite, as in CI) with FAISS on ``--milvus-n`` real embeddings
(versions of the ``--images`` images embedded by the artifact): FLAT against FAISS exact search at filter
selectivities 100/50/10/1/0.1% (the same top-10, the same number of answers), HNSW recall@10 against FAISS HNSW (M=32
on both; each at its tuned setting and both at the same ef), the same again after 500 removes, 500 adds and 500 tag
changes on both, and ``mae index migrate`` FAISS -> Milvus -> FAISS (counts, ids, rows, vectors).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before any OpenMP runtime loads: retrieval/__init__.py

import faiss  # noqa: E402

from retrieval import index as index_lib  # noqa: E402
from retrieval import tuning  # noqa: E402
from retrieval.catalog import Item, Row, parse_filters  # noqa: E402
from retrieval.metadata import UNSET  # noqa: E402


def lowrank(n: int, dim: int, seed: int, rank: int = 32, noise: float = 0.5) -> np.ndarray:
    """x = z W + noise, z ~ N(0, I_rank), W fixed (seed 0): most variance in a 32-d subspace, like embeddings."""
    w = np.random.default_rng(0).standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    out = np.empty((n, dim), np.float32)
    rng = np.random.default_rng(seed)
    for i in range(0, n, 100_000):  # in blocks: 1M x 256 floats is 1 GiB, its float64 temporaries more
        m = min(100_000, n - i)
        out[i : i + m] = rng.standard_normal((m, rank), dtype=np.float32) @ w
        out[i : i + m] += noise * rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
    faiss.normalize_L2(out)
    return out


def clustered(n: int, dim: int, seed: int, clusters: int = 1000, spread: float = 0.6) -> np.ndarray:
    """Gaussian blobs around ``clusters`` fixed random centres (seed 0), overlapping at ``spread``."""
    centres = np.random.default_rng(0).standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    rng = np.random.default_rng(seed)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        out[i : i + m] = centres[rng.integers(0, clusters, m)]
        out[i : i + m] += spread * rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
    faiss.normalize_L2(out)
    return out


def measure(name: str, factory: str, x: np.ndarray, q: np.ndarray, gt: np.ndarray | None, work: Path,
            max_memory: int | None, batch1: int) -> dict[str, Any]:
    items = [Item(f"/bench/{i}", str(i)) for i in range(len(x))]
    started = time.perf_counter()
    idx = index_lib.build(work / name, x, items, artifact_sha256="bench", factory=factory, max_memory=max_memory)
    build_s = time.perf_counter() - started
    size = (work / name / index_lib.INDEX_FILE).stat().st_size
    idx.search_ids(q[:10], 10)  # warm up
    started = time.perf_counter()
    for i in range(batch1):
        idx.search_ids(q[i : i + 1], 10)
    qps1 = batch1 / (time.perf_counter() - started)
    started = time.perf_counter()
    _, ids = idx.search_ids(q[:1000], 10)
    qps1000 = len(q[:1000]) / (time.perf_counter() - started)
    ids = ids - 1  # catalogue ids start at 1; the ground truth counts rows from 0
    if gt is None:
        gt = ids
    r1 = float(np.mean(ids[:, 0] == gt[:, 0]))
    r10 = float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(ids, gt)]))
    row = {"index": name, "factory": idx.factory, "params": idx.manifest.get("search_params", {}),
           "build_s": build_s, "mib": size / 2**20, "qps1": qps1, "qps1000": qps1000, "recall1": r1, "recall10": r10,
           "train_s": idx.manifest["build"].get("train_seconds"), "tuned_recall10": idx.manifest["tuning"].get(
               "recall@10")}
    idx.close()
    return row, ids


def run_collection(label: str, x: np.ndarray, q: np.ndarray, work: Path, args: argparse.Namespace,
                   extra_factories: list[str]) -> list[dict[str, Any]]:
    n, dim = x.shape
    print(f"\n== {label}: {n:,} x {dim}, {len(q)} fresh queries", flush=True)
    exact, gt = measure(f"{label}-exact", "Flat", x, q, None, work, None, args.batch1)
    exact["index"] = "exact (baseline)"
    rows = [exact]
    auto = tuning.choose_factory(n, dim, max_memory=args.max_memory)
    factories = [("auto", auto.factory, args.max_memory)]
    # the compressed variant auto falls back to when the raw vectors exceed the budget
    squeezed = int(n * 4 * dim * args.pq_budget)
    pq = tuning.choose_factory(n, dim, max_memory=squeezed) if squeezed else auto
    if pq.factory != auto.factory and n >= 20_000:
        factories.append((f"auto, {squeezed / 2**20:.0f} MiB budget", pq.factory, squeezed))
    factories += [(f, f, None) for f in extra_factories if f != auto.factory]
    for name, factory, budget in factories:
        print(f"   building {factory} ({name}) ...", flush=True)
        row, _ = measure(f"{label}-{len(rows)}", factory, x, q, gt, work, budget, args.batch1)
        row["index"] = name
        rows.append(row)
        print(f"   {name}: {json.dumps({k: v for k, v in row.items() if k != 'index'}, default=float)}", flush=True)
    for r in rows:
        r["collection"] = label
        for key in ("build_s", "mib", "qps1", "qps1000"):
            r[f"{key}_x"] = r[key] / exact[key] if exact[key] else float("nan")
    print_table(rows)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'index':<24} {'factory':<34} {'params':<16} {'build s':>12} {'MiB':>12} {'QPS@1':>14} "
            f"{'QPS@1000':>15} {'R@1':>6} {'R@10':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        params = ",".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        print(f"{r['index']:<24} {r['factory']:<34} {params:<16} "
              f"{r['build_s']:>6.1f} ({r['build_s_x']:>4.1f}x) {r['mib']:>6.0f} ({r['mib_x']:>4.2f}x) "
              f"{r['qps1']:>7.0f} ({r['qps1_x']:>4.1f}x) {r['qps1000']:>7.0f} ({r['qps1000_x']:>5.1f}x) "
              f"{r['recall1']:>6.3f} {r['recall10']:>6.3f}")


def real_embeddings(args: argparse.Namespace, work: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Embed bundled images (exported to PNG) with the artifact through the real build pipeline."""
    from mae.sources import BUNDLED, export_source, load_source
    from retrieval.build import build_index

    images = Path(args.images)
    if args.images in BUNDLED:
        images = work / args.images
        export_source(load_source(args.images), images)
    summary = build_index(args.artifact, [images], work / "real-index", factory="Flat", batch_size=args.batch_size,
                          workers=args.workers, progress=False)
    idx = index_lib.Index.load(work / "real-index")
    ids = idx.catalog.live_ids(idx.generation)
    x = idx.index.reconstruct_batch(ids)
    rng = np.random.default_rng(0)
    held = rng.choice(len(x), min(1000, len(x) // 5), replace=False)  # queries: images left out of the index
    mask = np.ones(len(x), bool)
    mask[held] = False
    figures = {"images": summary["images_embedded"], "images_per_s": summary["images_per_s"],
               "embed_backend": idx.manifest.get("embed_backend"), "dim": idx.dim}
    idx.close()
    return x[mask], x[held], figures


# ----------------------------------------------------------------------------------------------- filtered search

SELECTIVITIES = (("50%", "tag.r<500", lambda r: r < 500), ("10%", "tag.r<100", lambda r: r < 100),
                 ("1%", "tag.r<010", lambda r: r < 10), ("0.1%", "tag.r=000", lambda r: r == 0))


def run_filtered(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Filtered search against exact filtered search and against over-fetch-then-filter (module docstring)."""
    n, dim = args.n, args.dim
    started = time.perf_counter()
    x = lowrank(n, dim, seed=1)
    q = lowrank(args.queries, dim, seed=2)
    buckets = np.random.default_rng(3).integers(0, 1000, n)
    items = [Item(f"/bench/{i}", str(i), None, {"r": f"{b:03d}"}) for i, b in enumerate(buckets)]
    print(f"generated {n:,} x {dim} and their tags in {time.perf_counter() - started:.1f} s", flush=True)
    truth = {}
    for name, _, keep in SELECTIVITIES:
        chosen = np.flatnonzero(keep(buckets))
        started = time.perf_counter()
        _, found = faiss.knn(q, x[chosen], 10, metric=faiss.METRIC_INNER_PRODUCT)
        truth[name] = chosen[found] + 1  # catalogue ids start at 1
        print(f"   exact filtered top-10 at {name} ({len(chosen):,} items): {time.perf_counter() - started:.1f} s",
              flush=True)
    nlist = tuning.nlist_for(n)
    factories = [f.strip() for f in (args.factories or f"HNSW32,Flat;IVF{nlist}_HNSW32,Flat").split(";") if f.strip()]
    rows = []
    for factory in factories:
        print(f"\n== {factory}: building over {n:,} vectors ...", flush=True)
        started = time.perf_counter()
        idx = index_lib.build(work / f"filtered-{len(rows)}", x, items, artifact_sha256="bench", factory=factory)
        print(f"   built in {time.perf_counter() - started:.0f} s; tuned {idx.manifest.get('search_params')}",
              flush=True)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(args.search_threads)  # as a server's search thread, one query at a time
        for name, where, keep in SELECTIVITIES:
            rows.append(measure_filtered(idx, factory, name, where, keep(buckets), q, truth[name], args))
            print_filtered(rows[-1:])
        faiss.omp_set_num_threads(threads)
        idx.close()
    print()
    print_filtered(rows)
    return rows


def measure_filtered(idx: index_lib.Index, factory: str, name: str, where: str, selected: np.ndarray,
                     q: np.ndarray, truth: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    conditions = parse_filters([where])
    started = time.perf_counter()
    sel = idx.selection(conditions)  # the catalogue query and the bitmap: once per filter and generation
    selection_s = time.perf_counter() - started
    assert len(sel.ids) == int(selected.sum())
    _, ids = idx.search_ids(q, 10, where=conditions)
    recall = float(np.mean([len(np.intersect1d(a[a >= 0], b)) / 10 for a, b in zip(ids, truth)]))
    assert np.isin(ids[ids >= 0], sel.ids).all(), "an answer outside the filter"
    exactly_k = float(np.mean((ids >= 0).sum(axis=1) == 10))
    # the baseline: the unfiltered top OVERFETCH (HNSW needs efSearch >= k to return k), then the first 10 matching
    params = dict(idx.manifest.get("search_params", {}))
    if "efSearch" in params:
        params["efSearch"] = max(params["efSearch"], args.overfetch)
    member = np.zeros(int(sel.ids.max()) + 1 if len(sel.ids) else 1, bool)
    member[sel.ids] = True
    fetch = min(args.overfetch, idx.index.ntotal)

    def overfetch(batch: np.ndarray) -> np.ndarray:
        tuning.apply_params(idx.index, params)
        _, found = idx.index.search(batch, fetch)
        tuning.apply_params(idx.index, idx.manifest.get("search_params", {}))
        out = np.full((len(batch), 10), -1, np.int64)
        for j, row in enumerate(found):
            row = row[row >= 0]
            hit = row[member[np.minimum(row, len(member) - 1)] & (row < len(member))][:10]
            out[j, : len(hit)] = hit
        return out

    timed = q[: args.batch1]
    ours, base = [], []
    for _ in range(args.rounds):  # interleaved rounds: both sides see the same background load
        started = time.perf_counter()
        for i in range(len(timed)):
            idx.search_ids(timed[i : i + 1], 10, where=conditions)
        ours.append(len(timed) / (time.perf_counter() - started))
        started = time.perf_counter()
        for i in range(len(timed)):
            overfetch(timed[i : i + 1])
        base.append(len(timed) / (time.perf_counter() - started))
    base_ids = overfetch(q)
    base_recall = float(np.mean([len(np.intersect1d(a[a >= 0], b)) / 10 for a, b in zip(base_ids, truth)]))
    mode = "exact" if idx.exact_for(len(sel.ids)) else "selector " + ",".join(
        f"{k}={v}" for k, v in idx.filtered_params(len(sel.ids) / idx.count).items())
    return {"factory": factory, "selectivity": name, "where": where, "selected": int(len(sel.ids)), "mode": mode,
            "selection_s": selection_s, "recall10": recall, "exactly_k": exactly_k,
            "qps": float(np.median(ours)), "qps_rounds": ours, "overfetch_recall10": base_recall,
            "overfetch_qps": float(np.median(base)), "overfetch_rounds": base,
            "speedup": float(np.median(ours) / np.median(base))}


def print_filtered(rows: list[dict[str, Any]]) -> None:
    head = (f"{'factory':<22} {'kept':>5} {'items':>9} {'how':<26} {'select s':>8} {'R@10':>6} {'=k':>5} "
            f"{'QPS':>8} {'overfetch R@10':>14} {'QPS':>8} {'ratio':>7}")
    print(head)
    for r in rows:
        print(f"{r['factory']:<22} {r['selectivity']:>5} {r['selected']:>9,} {r['mode']:<26} {r['selection_s']:>8.2f} "
              f"{r['recall10']:>6.3f} {r['exactly_k']:>5.2f} {r['qps']:>8.0f} {r['overfetch_recall10']:>14.3f} "
              f"{r['overfetch_qps']:>8.0f} {r['speedup']:>6.1f}x", flush=True)


# ----------------------------------------------------------------------------------------------- Milvus


def milvus_embeddings(args: argparse.Namespace, work: Path) -> tuple[np.ndarray, list[Row], dict[str, Any]]:
    """Real embeddings of ``args.milvus_copies`` versions of each bundled image (the original, then shifted,
    rotated and rescaled copies), embedded by the artifact through the real build pipeline (a FAISS Flat folder)."""
    from PIL import Image

    from mae.sources import export_source, load_source
    from retrieval.build import build_index

    originals = work / "originals"
    export_source(load_source(args.images), originals)
    files = sorted(originals.rglob("*.png"))
    rng = np.random.default_rng(5)
    for copy in range(1, args.milvus_copies):
        for f in files:
            img = Image.open(f)
            angle, dx, dy = rng.uniform(-12, 12), *rng.integers(-2, 3, 2)
            scale = rng.uniform(0.85, 1.1)
            w, h = img.size
            out = img.rotate(angle, resample=Image.BILINEAR, translate=(int(dx), int(dy)))
            out = out.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BILINEAR).resize((w, h))
            target = work / f"copy{copy}" / f.parent.name / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            out.save(target)
    roots = [originals, *(work / f"copy{c}" for c in range(1, args.milvus_copies))]
    summary = build_index(args.artifact, roots, work / "embedded", factory="Flat", batch_size=args.batch_size,
                          workers=args.workers, progress=False)
    with index_lib.Index.open(work / "embedded") as idx:
        ids = idx.live_ids()
        rows = idx.rows(ids.tolist())
        x = idx.vectors(ids)
        figures = {"images": summary["images_embedded"], "images_per_s": summary["images_per_s"], "dim": idx.dim,
                   "artifact_sha256": idx.artifact_sha256}
    return x, [rows[int(i)] for i in ids], figures


def run_milvus(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Milvus (embedded milvus-lite) against FAISS on the same real embeddings: FLAT against exact search at each
    filter selectivity, HNSW recall against FAISS HNSW, the same deletes, adds and tag changes on both, then
    ``mae index migrate`` there and back."""
    from retrieval.migrate import migrate

    started = time.perf_counter()
    x_all, rows_all, figures = milvus_embeddings(args, work)
    print(f"embedded {figures['images']:,} images ({figures['dim']}-d) at {figures['images_per_s']} images/s in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x_all))
    n = min(args.milvus_n, len(x_all) - args.queries - 500)
    db, queries, spare = order[:n], order[n : n + args.queries], order[n + args.queries : n + args.queries + 500]
    buckets = rng.integers(0, 1000, len(x_all))

    def item(i: int) -> Item:
        r = rows_all[i]
        return Item(r.path, r.sha256, r.label, {"r": f"{buckets[i]:03d}"})

    x, items, q = x_all[db], [item(i) for i in db], x_all[queries]
    sha = figures["artifact_sha256"]
    made: dict[str, index_lib.Index] = {}
    for name, spec, factory in (("faiss Flat", work / "faiss-flat", "Flat"),
                                ("milvus FLAT", f"milvus:{work / 'flat.db'}", "FLAT"),
                                ("faiss HNSW", work / "faiss-hnsw", "HNSW32,Flat"),
                                ("milvus HNSW", f"milvus:{work / 'hnsw.db'}", "HNSW")):
        started = time.perf_counter()
        made[name] = index_lib.Index.create(spec, x, items, artifact_sha256=sha, factory=factory)
        print(f"   {name}: built {n:,} in {time.perf_counter() - started:.1f} s, search "
              f"{made[name].manifest.get('search_params') or 'exact'}", flush=True)
    flat, mflat = made["faiss Flat"], made["milvus FLAT"]
    out: list[dict[str, Any]] = []
    out += compare_filtered("built", flat, mflat, q, args)
    print_compared(out)
    out.append(hnsw_recall(made["faiss HNSW"], made["milvus HNSW"], flat, q))
    print_hnsw(out[-1])
    # the same writes on both: 500 removed, 500 added, 500 re-tagged (a metadata upsert)
    gone = rng.choice(np.arange(1, n + 1), 500, replace=False).tolist()
    moved = rng.choice(np.setdiff1d(np.arange(1, n + 1), gone), 500, replace=False).tolist()
    new = [item(i) for i in spare]
    for idx in (flat, mflat):
        started = time.perf_counter()
        paths = {i: r.path for i, r in idx.rows(moved).items()}
        idx.remove(gone)
        idx.add(x_all[spare], new)
        idx.annotate({paths[i]: (UNSET, {"r": f"{(buckets[db[i - 1]] + 500) % 1000:03d}"}) for i in moved})
        print(f"   {idx.engine}: removed 500, added 500, re-tagged 500 in {time.perf_counter() - started:.1f} s; "
              f"{idx.count:,} items", flush=True)
    after = compare_filtered("after writes", flat, mflat, q, args)
    print_compared(after)
    out += after
    out.append(migrate_round_trip(flat, work, migrate))
    print_migrate(out[-1])
    for idx in made.values():
        idx.close()
    print()
    print_compared([r for r in out if r.get("kind") == "filtered"])
    print_hnsw(next(r for r in out if r.get("kind") == "hnsw"))
    print_migrate(out[-1])
    return out


def compare_filtered(when: str, a: index_lib.Index, b: index_lib.Index, q: np.ndarray,
                     args: argparse.Namespace) -> list[dict[str, Any]]:
    """The same top-10 (as item paths: ids differ once each engine has added items), and as many answers?"""
    rows = []
    for name, where, _ in (("100%", None, None), *SELECTIVITIES):
        w = [where] if where else None
        ha, hb = a.search(q, 10, where=w), b.search(q, 10, where=w)
        pa = [[h.path for h in r] for r in ha]
        pb = [[h.path for h in r] for r in hb]
        same = float(np.mean([x == y for x, y in zip(pa, pb)]))
        # two engines sum a dot product in different orders (scores differ by ~1e-7): neighbours whose scores tie
        # that closely may come back in either order, or either may be the tenth
        tied = float(np.mean([same_up_to_ties(ra, rb) for ra, rb in zip(ha, hb)]))
        same_count = float(np.mean([len(x) == len(y) for x, y in zip(pa, pb)]))
        score = max((abs(x.score - y.score) for ra, rb in zip(ha, hb) for x, y in zip(ra, rb)), default=0.0)
        timed = q[: args.batch1]
        speed = {}
        for idx in (a, b):
            started = time.perf_counter()
            for i in range(len(timed)):
                idx.search(timed[i : i + 1], 10, where=w)
            speed[idx.engine] = (time.perf_counter() - started) / len(timed) * 1000
        matching = a.search_ids(q[:1], a.count, where=w)[1]
        rows.append({"kind": "filtered", "when": when, "selectivity": name, "where": where or "",
                     "matching": int((matching >= 0).sum()), "same_ids": same, "same_up_to_ties": tied,
                     "same_count": same_count,
                     "answers": float(np.mean([len(x) for x in pb])), "max_score_diff": score,
                     "faiss_ms": speed["faiss"], "milvus_ms": speed["milvus"],
                     "ratio": speed["milvus"] / speed["faiss"]})
    return rows


def same_up_to_ties(a: list[Any], b: list[Any], tie: float = 1e-5) -> bool:
    """The same answers, where items whose scores are within ``tie`` may swap places or swap out at the end."""
    if len(a) != len(b):
        return False
    if [h.path for h in a] == [h.path for h in b]:
        return True
    if any(abs(x.score - y.score) > tie for x, y in zip(a, b)):
        return False
    last = min(a[-1].score, b[-1].score) if a else 0.0
    firm = lambda hits: {h.path for h in hits if h.score > last + tie}  # noqa: E731
    return firm(a) == firm(b)


def print_compared(rows: list[dict[str, Any]]) -> None:
    print(f"{'':<13} {'kept':>5} {'items':>7} {'same top-10':>11} {'up to ties':>10} {'same count':>10} "
          f"{'answers':>7} {'|d score|':>9} {'faiss ms':>8} {'milvus ms':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['when']:<13} {r['selectivity']:>5} {r['matching']:>7,} {r['same_ids']:>11.3f} "
              f"{r['same_up_to_ties']:>10.3f} {r['same_count']:>10.3f} {r['answers']:>7.2f} "
              f"{r['max_score_diff']:>9.1e} {r['faiss_ms']:>8.2f} {r['milvus_ms']:>9.2f} {r['ratio']:>5.1f}x",
              flush=True)


def hnsw_recall(fh: index_lib.Index, mh: index_lib.Index, flat: index_lib.Index, q: np.ndarray) -> dict[str, Any]:
    """recall@10 against exact search: each at its tuned setting, and both at the same ef."""
    _, truth = flat.search_ids(q, 10)

    def recall(found: np.ndarray) -> float:
        return float(np.mean([len(np.intersect1d(a[a >= 0], t)) / 10 for a, t in zip(found, truth)]))

    def milvus_at(ef: int) -> np.ndarray:
        answers = mh.client.search(mh.target.collection, data=list(q), anns_field="vector", limit=10,
                                   search_params={"metric_type": "IP", "params": {"ef": ef}})
        return np.asarray([[int(h["id"]) for h in r] + [-1] * (10 - len(r)) for r in answers])

    def faiss_at(ef: int) -> np.ndarray:
        tuning.apply_params(fh.index, {"efSearch": ef})
        _, found = fh.index.search(q, 10)
        tuning.apply_params(fh.index, fh.manifest["search_params"])
        return found

    row: dict[str, Any] = {"kind": "hnsw", "faiss_tuned": fh.manifest["search_params"],
                           "milvus_tuned": mh.manifest["search_params"],
                           "faiss_tuned_recall": recall(fh.search_ids(q, 10)[1]),
                           "milvus_tuned_recall": recall(mh.search_ids(q, 10)[1]), "sweep": []}
    for ef in (16, 32, 64, 128):
        row["sweep"].append({"ef": ef, "faiss": recall(faiss_at(ef)), "milvus": recall(milvus_at(ef))})
    return row


def print_hnsw(r: dict[str, Any]) -> None:
    print(f"{'HNSW M=32':<22} {'faiss R@10':>10} {'milvus R@10':>11} {'milvus - faiss':>14}")
    print(f"{'tuned':<8} {str(r['faiss_tuned']) + ' / ' + str(r['milvus_tuned']):<13} {r['faiss_tuned_recall']:>10.3f} "
          f"{r['milvus_tuned_recall']:>11.3f} {r['milvus_tuned_recall'] - r['faiss_tuned_recall']:>+14.3f}")
    for s in r["sweep"]:
        gap = s["milvus"] - s["faiss"]
        print(f"{'ef = ' + str(s['ef']):<22} {s['faiss']:>10.3f} {s['milvus']:>11.3f} {gap:>+14.3f}", flush=True)


def migrate_round_trip(flat: index_lib.Index, work: Path, migrate: Any) -> dict[str, Any]:
    started = time.perf_counter()
    migrate(flat.name, f"milvus:{work / 'moved.db'}", progress=False)
    there = time.perf_counter() - started
    started = time.perf_counter()
    migrate(f"milvus:{work / 'moved.db'}", work / "back", progress=False)
    back = time.perf_counter() - started
    with index_lib.Index.open(f"milvus:{work / 'moved.db'}") as m, index_lib.Index.open(work / "back") as b:
        ids = flat.live_ids()
        ra = flat.rows(ids.tolist())
        same_rows = all(
            (ra[i].path, ra[i].label, ra[i].sha256, ra[i].added, ra[i].tags) ==
            (o[i].path, o[i].label, o[i].sha256, o[i].added, o[i].tags)
            for o in (m.rows(ids.tolist()), b.rows(ids.tolist())) for i in ra)
        x = flat.vectors(ids)
        return {"kind": "migrate", "count": flat.count, "milvus_count": m.count, "back_count": b.count,
                "same_ids": bool(np.array_equal(m.live_ids(), ids) and np.array_equal(b.live_ids(), ids)),
                "same_rows": same_rows, "max_vector_diff": float(max(np.abs(m.vectors(ids) - x).max(),
                                                                     np.abs(b.vectors(ids) - x).max())),
                "there_s": there, "back_s": back}


def print_migrate(r: dict[str, Any]) -> None:
    print(f"migrate faiss -> milvus -> faiss: {r['count']:,} / {r['milvus_count']:,} / {r['back_count']:,} items, "
          f"same ids {r['same_ids']}, same rows (paths, labels, sha256, dates, tags) {r['same_rows']}, max |vector "
          f"difference| {r['max_vector_diff']:.1e}; {r['there_s']:.1f} s there, {r['back_s']:.1f} s back", flush=True)


# ----------------------------------------------------------------------------------------------- near-duplicates

EDITS = ("resize", "crop90", "jpeg30", "rotate", "jitter")


def edit(arr: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """An edited copy of a uint8 image, as people make them: smaller, cropped, re-encoded, tilted, recoloured."""
    import io

    from PIL import Image, ImageEnhance

    im = Image.fromarray(arr)
    w, h = im.size
    if how == "resize":
        im = im.resize((max(8, int(w * 0.7)), max(8, int(h * 0.7))), Image.Resampling.BILINEAR)
    elif how == "crop90":
        dx, dy = round(w * 0.05), round(h * 0.05)
        ox, oy = int(rng.integers(0, 2 * dx + 1)), int(rng.integers(0, 2 * dy + 1))
        im = im.crop((ox, oy, ox + w - 2 * dx, oy + h - 2 * dy))
    elif how == "jpeg30":
        buf = io.BytesIO()
        im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode).save(buf, "JPEG", quality=30)
        im = Image.open(io.BytesIO(buf.getvalue()))
    elif how == "rotate":
        im = im.rotate(float(rng.choice([-1, 1]) * rng.uniform(3, 8)), Image.Resampling.BILINEAR)
    elif how == "jitter":
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.8, 1.2)))
        im = ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.8, 1.2)))
    return np.asarray(im)


def run_duplicates(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Groups of near-copies against the truth: by the cosine alone per threshold, then with the pixel check
    (``retrieval.verify``) on the candidates at ``--candidate-threshold`` per pixel threshold."""
    from PIL import Image

    from export.runtime import Embedder
    from mae.sources import load_source, split_data
    from retrieval import verify

    source = load_source(args.images)
    val = split_data(source).val  # images pretraining never saw
    rng = np.random.default_rng(args.seed)
    val = rng.permutation(val)
    originals, distractors = val[: args.originals], val[args.originals : args.originals + args.distractors]
    images, family, kinds = [], [], []
    for f, i in enumerate(originals):
        arr = source.read(i)
        images.append(arr)
        family.append(f)
        kinds.append("original")
        for how in EDITS:
            images.append(edit(arr, how, rng))
            family.append(f)
            kinds.append(how)
    for i in distractors:
        images.append(source.read(i))
        family.append(-1 - len(family))  # a family of its own
        kinds.append("distractor")
    embedder = Embedder.load(args.artifact, batch_size=args.batch_size)
    started = time.perf_counter()
    x = np.concatenate([embedder.embed(images[i : i + 256]) for i in range(0, len(images), 256)])
    print(f"{len(images)} images ({len(originals)} originals x {1 + len(EDITS)}, {len(distractors)} distractors) "
          f"from {args.images}'s held-out split (draw {args.seed}), embedded with {embedder.backend_name} in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    files = work / "images"  # the pixel check reads files, as it does in an index; PNG keeps the edits' pixels
    files.mkdir()
    items = []
    for j, arr in enumerate(images):
        Image.fromarray(arr).save(files / f"{j:05d}.png")
        items.append(Item(str(files / f"{j:05d}.png"), str(j)))
    idx = index_lib.build(work / "duplicates", x, items, artifact_sha256="bench", factory="Flat")
    family = np.asarray(family)
    truth = {(a, b) for f in set(family[family >= 0].tolist()) for a in np.flatnonzero(family == f) + 1
             for b in np.flatnonzero(family == f) + 1 if a < b}

    def score(groups: list, **row: Any) -> dict[str, Any]:
        pairs = {(a, b) for g in groups for a, _ in g for b, _ in g if a < b}
        hit = pairs & truth
        precision = len(hit) / len(pairs) if pairs else 1.0
        recall = len(hit) / len(truth)
        caught = {how: 0 for how in EDITS}  # originals grouped with their copy of each kind
        for a, b in hit:
            ka, kb = kinds[a - 1], kinds[b - 1]
            if ka == "original" and kb in caught:
                caught[kb] += 1
            elif kb == "original" and ka in caught:
                caught[ka] += 1
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        r = {**row, "groups": len(groups), "pairs": len(pairs), "precision": precision, "recall": recall, "f1": f1,
             **{f"recall_{how}": caught[how] / len(originals) for how in EDITS}}
        print(f"{r['method']:<12} {r['threshold']:>9.4f} {r['groups']:>6} {precision:>9.3f} {recall:>6.3f} {f1:>5.3f}  "
              + " ".join(f"{r[f'recall_{how}']:>7.2f}" for how in EDITS), flush=True)
        return r

    print(f"\n{'method':<12} {'threshold':>9} {'groups':>6} {'precision':>9} {'recall':>6} {'F1':>5}  "
          + " ".join(f"{how:>7}" for how in EDITS) + "   (pairwise; last columns: originals grouped with that copy)")
    cosines = [float(t) for t in args.thresholds.split(",")]
    rows = [score(idx.duplicates(t), method="cosine", threshold=t) for t in cosines]
    # How separable the embedding makes copies at all, whatever the threshold: for each original, is its least
    # similar copy still closer than the most similar image that is not a copy?
    v = x / np.linalg.norm(x, axis=1, keepdims=True)
    originals_at = np.flatnonzero(np.asarray(kinds) == "original")
    own = [(v[j] @ v[family == family[j]].T) for j in originals_at]
    other = [(v[j] @ v[family != family[j]].T).max() for j in originals_at]
    separable = float(np.mean([np.sort(o)[0] > b for o, b in zip(own, other)]))
    print(f"originals whose every copy is closer than any other image: {separable:.2f}")
    upper = np.triu_indices(len(v), 1)
    same = (family[:, None] == family[None, :])[upper]
    ranked = ranking_figures((v @ v.T)[upper], same, len(truth))
    nearest = among_nearest(v, kinds, family, DUPLICATE_K)
    print(f"cosine alone, every pair ranked (DISC2021's measures): micro-AP {ranked['micro_ap']:.3f}, recall at "
          f"precision 0.9 {ranked['recall_at_p90']:.3f} (threshold {ranked['threshold_at_p90']:.4f}), at 0.95 "
          f"{ranked['recall_at_p95']:.3f} (threshold {ranked['threshold_at_p95']:.4f})")
    print(f"copies among their original's {DUPLICATE_K} nearest: "
          + ", ".join(f"{how} {share:.2f}" for how, share in nearest.items()), flush=True)

    def paths(ids: Any) -> dict[int, str]:
        return {i: r.path for i, r in idx.catalog.get(list(ids), idx.generation).items()}

    recorder = verify.PixelCheck(paths, threshold=-1.0)  # aligns every candidate pair once, keeps all scores
    started = time.perf_counter()
    idx.duplicates(args.candidate_threshold, check=recorder)
    took = time.perf_counter() - started
    print(f"pixel check: {len(recorder.scores)} candidate pairs (cosine >= {args.candidate_threshold}) aligned in "
          f"{took:.1f} s, {took / max(len(recorder.scores), 1) * 1e3:.2f} ms a pair (thumbnails read included)",
          flush=True)
    for t in (float(t) for t in args.pixel_thresholds.split(",")):
        def kept(pairs: np.ndarray, t: float = t) -> np.ndarray:
            return np.array([recorder.scores[(a, b)] >= t for a, b in pairs.tolist()], bool)

        rows.append(score(idx.duplicates(args.candidate_threshold, check=kept), method="+pixels", threshold=t,
                          candidate_threshold=args.candidate_threshold, seconds_per_pair=took / len(recorder.scores)))
    pairs = list(recorder.scores)
    pixel_ranked = ranking_figures(np.array([recorder.scores[p] for p in pairs], np.float64),
                                   np.array([p in truth for p in pairs], bool), len(truth))
    print(f"cosine >= {args.candidate_threshold}, then pixels, candidate pairs ranked by aligned correlation: "
          f"micro-AP {pixel_ranked['micro_ap']:.3f}, recall at precision 0.9 {pixel_ranked['recall_at_p90']:.3f}, "
          f"at 0.95 {pixel_ranked['recall_at_p95']:.3f}", flush=True)
    rows.append({"method": "ranking", "cosine": ranked, "pixels": pixel_ranked,
                 **{f"among_{DUPLICATE_K}_nearest_{how}": share for how, share in nearest.items()}})
    pixel_baseline(images, family)
    rows.append({"method": "photographs", **photo_copies(embedder, args.seed)})
    for method in ("cosine", "+pixels"):
        ok = [r for r in rows if r["method"] == method and r["precision"] >= 0.95]
        best = max(ok, key=lambda r: (r["recall"], -r["threshold"])) if ok else max(
            (r for r in rows if r["method"] == method), key=lambda r: r["f1"])
        rule = "best recall at precision >= 0.95" if ok else "no threshold reaches precision 0.95; best F1"
        print(f"{method}: {rule}: threshold {best['threshold']} (precision {best['precision']:.3f}, recall "
              f"{best['recall']:.3f})", flush=True)
    idx.close()
    return rows


DUPLICATE_K = 16  # the neighbours Index.duplicates searches per item (retrieval.index.DUPLICATE_K)


def ranking_figures(scores: np.ndarray, is_copy: np.ndarray, total: int) -> dict[str, float]:
    """DISC2021's measures of a ranked list of pairs: micro-AP (precision averaged over the ranks of the true pairs,
    pairs never proposed counting as missed) and the best recall at precision >= 0.9 and >= 0.95, with the
    score at which it is reached (the threshold that would give it)."""
    order = np.argsort(-scores, kind="stable")
    hits = is_copy[order].astype(np.float64)
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    out = {"micro_ap": float((precision * hits).sum() / max(total, 1))}
    for name, floor in (("p90", 0.9), ("p95", 0.95)):
        ok = np.flatnonzero(precision >= floor)
        best = ok[np.argmax(tp[ok])] if len(ok) else None
        out[f"recall_at_{name}"] = float(tp[best] / max(total, 1)) if best is not None else 0.0
        out[f"threshold_at_{name}"] = float(scores[order][best]) if best is not None else float("nan")
    return out


def among_nearest(v: np.ndarray, kinds: list[str], family: np.ndarray, k: int) -> dict[str, float]:
    """For each kind of edit: the share of originals that have that copy among their k nearest other images."""
    found = {how: 0 for how in EDITS}
    originals = np.flatnonzero(np.asarray(kinds) == "original")
    for j in originals:
        sim = v @ v[j]
        sim[j] = -np.inf
        for i in np.argsort(-sim)[:k]:
            if family[i] == family[j]:
                found[kinds[i]] += 1
    return {how: n / max(len(originals), 1) for how, n in found.items()}


def photo_copies(embedder: Any, seed: int) -> dict[str, float]:
    """The bundled photographs (pictures, not textures; chelsea is cat) and their edited copies: for each kind of
    edit, the share of copies whose nearest photograph by the cosine is their own original."""
    from mae.sources import PHOTOS, load_source

    source = load_source("photos")
    names = [n for n in PHOTOS if n not in ("chelsea", "brick", "grass", "gravel")]
    originals = [source.read(PHOTOS.index(n)) for n in names]
    rng = np.random.default_rng(seed)
    reference = embedder.embed(originals)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    out = {}
    for how in EDITS:
        copies = embedder.embed([edit(a, how, rng) for a in originals])
        copies /= np.linalg.norm(copies, axis=1, keepdims=True)
        out[how] = float(np.mean((copies @ reference.T).argmax(1) == np.arange(len(names))))
    print(f"photographs ({len(names)}): copies whose nearest photograph is their original: "
          + ", ".join(f"{how} {share:.2f}" for how, share in out.items()), flush=True)
    return out


def pixel_baseline(images: list[np.ndarray], family: np.ndarray, side: int = 16) -> None:
    """The classic second-stage check, for comparison: normalised correlation of grey side x side thumbnails,
    pairwise precision / recall per threshold over the same images."""
    from PIL import Image

    def thumb(arr: np.ndarray) -> np.ndarray:
        grey = Image.fromarray(arr if arr.ndim == 2 else arr[..., :3]).convert("L")
        v = np.asarray(grey.resize((side, side), Image.Resampling.BOX), np.float32).ravel()
        v -= v.mean()
        return v / (np.linalg.norm(v) + 1e-6)

    t = np.stack([thumb(a) for a in images])
    upper = np.triu_indices(len(t), 1)
    score = (t @ t.T)[upper]
    same = (family[:, None] == family[None, :])[upper]
    print(f"pixel baseline (correlation of {side}x{side} thumbnails):")
    for threshold in (0.8, 0.85, 0.9, 0.95):
        kept = score >= threshold
        hit = int((kept & same).sum())
        print(f"  threshold {threshold:.2f}: pair precision {hit / max(int(kept.sum()), 1):.3f}, "
              f"recall {hit / int(same.sum()):.3f}", flush=True)


# ----------------------------------------------------------------------------------------------- --writes


def watch(folder: str) -> None:
    """The other worker of ``--writes``: poll ``reload()`` (as a server does before each request) and report, for
    each new generation, when the newest item answered a search of its own vector, the reload's cost and the log
    bytes it read (JSON lines on stdout)."""
    from retrieval import faiss_log

    idx = index_lib.Index.load(folder)
    logged = faiss_log.committed_bytes(faiss_log.ranges(idx.manifest))
    print("ready", flush=True)
    while True:
        started = time.monotonic()
        changed = idx.reload()
        reloaded = time.monotonic()
        if not changed:
            time.sleep(0.0005)
            continue
        newest = int(idx.live_ids()[-1])  # checked after the timing: the reload alone made it searchable
        found = idx.search_ids(idx.vectors([newest]), 1)[1][0, 0] == newest
        now_logged = faiss_log.committed_bytes(faiss_log.ranges(idx.manifest))
        print(json.dumps({"generation": idx.generation, "seen_at": reloaded, "found": bool(found),
                          "reload_s": reloaded - started, "bytes": now_logged - logged}), flush=True)
        logged = now_logged


def run_writes(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    import subprocess

    rows = []
    sizes = [int(v) for v in args.sizes.split(",")]
    for n in sizes:
        x = lowrank(n + args.writes, args.dim, seed=5)
        folder = work / f"writes-{n}"
        started = time.perf_counter()
        idx = index_lib.build(folder, x[:n], [Item(f"/w/{i}.png", f"w{i}") for i in range(n)], artifact_sha256="b",
                              factory="Flat")
        print(f"\n== {n:,} x {args.dim} Flat built in {time.perf_counter() - started:.1f} s", flush=True)
        row = {"vectors": n, "index_mib": (folder / index_lib.INDEX_FILE).stat().st_size / 2**20}
        started = time.perf_counter()  # the baseline: a write and a reload when every write rewrote index.faiss
        index_lib.write_index(idx.index, folder / "rewrite.faiss")
        row["rewrite_s"] = time.perf_counter() - started
        started = time.perf_counter()
        faiss.read_index(str(folder / "rewrite.faiss"))
        row["reread_s"] = time.perf_counter() - started
        (folder / "rewrite.faiss").unlink()
        reader = subprocess.Popen([sys.executable, __file__, "--watch", str(folder)], stdout=subprocess.PIPE, text=True)
        assert reader.stdout.readline().strip() == "ready"
        adds, seen, reloads, read = [], [], [], []
        for j in range(args.writes):
            started = time.monotonic()
            idx.add(x[n + j : n + j + 1], [Item(f"/new/{j}.png", f"new{j}")])
            returned = time.monotonic()
            report = json.loads(reader.stdout.readline())
            assert report["found"] and report["generation"] == idx.generation, report
            adds.append(returned - started)
            seen.append(report["seen_at"] - returned)
            reloads.append(report["reload_s"])
            read.append(report["bytes"])
            time.sleep(0.02)
        reader.kill()
        row.update(add_s=float(np.median(adds)), add_max_s=float(np.max(adds)), seen_s=float(np.median(seen)),
                   seen_max_s=float(np.max(seen)), reload_s=float(np.median(reloads)), read_bytes=int(np.median(read)))
        print(f"   {json.dumps(row, default=float)}", flush=True)
        rows.append(row)
        if n == sizes[-1]:
            rows += log_qps(idx, folder, x, args, "Flat")  # x: the collection and the items just added
        idx.close()
        del x
    print_writes(rows)
    return rows


def log_qps(idx: index_lib.Index, folder: Path, x: np.ndarray, args: argparse.Namespace, factory: str
            ) -> list[dict[str, Any]]:
    """1% of the collection added through the log, searched against the same vectors compacted."""
    n = len(x)
    more = lowrank(n // 100, args.dim, seed=6)  # x are the collection's vectors in id order: ids 1..n
    q = lowrank(args.batch1, args.dim, seed=7)
    idx.compaction = type(idx.compaction)(fraction=1.0, minimum=10**12, bytes=1 << 50)
    for i in range(0, len(more), args.qps_batch):  # as uploads arrive: writes of --qps-batch items
        batch = more[i : i + args.qps_batch]
        idx.add(batch, [Item(f"/more/{j}.png", f"m{j}") for j in range(i, i + len(batch))])
    logged = index_lib.Index.load(folder)  # a reader holding the base and 1% in its delta
    idx.compact()
    compacted = index_lib.Index.load(folder)
    _, gt = faiss.knn(q, np.concatenate([x, more]), 10, metric=faiss.METRIC_INNER_PRODUCT)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(args.search_threads)
    views = {"log": logged, "compacted": compacted}
    seconds: dict[str, list[float]] = {name: [] for name in views}
    found: dict[str, list[np.ndarray]] = {name: [] for name in views}
    for r in range(args.rounds):  # query by query, alternating: the load of a shared machine drifts in between
        for i in range(len(q)):
            for name in (("log", "compacted") if (i + r) % 2 else ("compacted", "log")):
                started = time.perf_counter()
                ids = views[name].search_ids(q[i : i + 1], 10)[1][0]
                seconds[name].append(time.perf_counter() - started)
                if r == 0:
                    found[name].append(ids)
    times = {name: [1 / float(np.median(seconds[name]))] for name in views}  # medians: robust to spikes
    recall = {name: float(np.mean([len(np.intersect1d(a - 1, b)) / 10 for a, b in zip(found[name], gt)]))
              for name in views}  # catalogue ids start at 1, ground-truth rows at 0
    faiss.omp_set_num_threads(threads)
    rows = []
    for name in ("compacted", "log"):
        rows.append({"qps": name, "factory": factory, "vectors": n + len(more), "logged": 0 if name == "compacted"
                     else len(more), "qps1": float(np.median(times[name])), "recall10": recall[name]})
    rows[1]["qps1_x"] = rows[1]["qps1"] / rows[0]["qps1"]
    rows[0]["qps1_x"] = 1.0
    logged.close()
    compacted.close()
    return rows


def run_log_qps(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """``log_qps`` for the approximate factories at ``--qps-n``."""
    rows = []
    for factory in [f for f in args.qps_factories.split(";") if f]:
        x = lowrank(args.qps_n, args.dim, seed=8)
        folder = work / f"qps-{len(rows)}"
        idx = index_lib.build(folder, x, [Item(f"/q/{i}.png", f"q{i}") for i in range(len(x))], artifact_sha256="b",
                              factory=factory)
        print(f"\n== {factory} at {args.qps_n:,}: tuned {idx.manifest.get('search_params')}", flush=True)
        rows += log_qps(idx, folder, x, args, factory)
        idx.close()
    return rows


def print_writes(rows: list[dict[str, Any]]) -> None:
    writes = [r for r in rows if "add_s" in r]
    if writes:
        first = writes[0]
        head = (f"{'vectors':>10} {'index.faiss':>12} {'add 1 item':>18} {'seen by a reader':>17} {'its reload':>11} "
                f"{'read':>7} {'before: write':>14} {'before: reload':>15}")
        print("\n" + head + "\n" + "-" * len(head))
        for r in writes:
            ratio = r["add_s"] / first["add_s"]
            print(f"{r['vectors']:>10,} {r['index_mib']:>8.0f} MiB {r['add_s'] * 1e3:>7.1f} ms ({ratio:>4.1f}x) "
                  f"{r['seen_s'] * 1e3:>11.1f} ms {r['reload_s'] * 1e3:>8.2f} ms {r['read_bytes']:>6} B "
                  f"{r['rewrite_s']:>12.2f} s {r['reread_s']:>13.2f} s")
    qps = [r for r in rows if "qps" in r]
    if qps:
        head = f"{'factory':<24} {'vectors':>10} {'in the log':>11} {'QPS@1':>16} {'recall@10':>10}"
        print("\n" + head + "\n" + "-" * len(head))
        for r in qps:
            print(f"{r['factory']:<24} {r['vectors']:>10,} {r['logged']:>11,} {r['qps1']:>8.1f} ({r['qps1_x']:>4.2f}x) "
                  f"{r['recall10']:>10.3f}")


# ----------------------------------------------------------------------------------------------- --parse

OLD_WHERE = r"^\s*(label|path|added|id|sha256|tag\.[^=!<>^\s][^=!<>^]*?)\s*(\^=|!=|>=|<=|=|>|<)(.*)$"  # the baseline


def run_parse(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time to parse (or refuse) a filter of n characters that made the old expression backtrack: ``tag.a``,
    n spaces, ``b`` (no operator); the old expression is timed up to 8 KB (it is quadratic: 64 KB took minutes)."""
    import re

    from retrieval.filters import FilterError

    old = re.compile(OLD_WHERE, re.DOTALL)
    rows = []
    for n in (1024, 4000, 8192, 65536):  # 4,000: the worst case under the limit, parsed; longer: refused unread
        text = "tag.a" + " " * n + "b"
        started = time.perf_counter()
        for _ in range(args.rounds):
            with contextlib.suppress(FilterError):
                parse_filters([text])
        new_s = (time.perf_counter() - started) / args.rounds
        old_s = None
        if n <= 8192:
            started = time.perf_counter()
            old.match(text)
            old_s = time.perf_counter() - started
        rows.append({"chars": n, "new_ms": new_s * 1e3, "old_ms": None if old_s is None else old_s * 1e3})
    print(f"\n{'filter chars':>12} {'this parser':>12} {'old expression':>15}")
    for r in rows:
        old_text = "-" if r["old_ms"] is None else f"{r['old_ms']:.1f} ms"
        print(f"{r['chars']:>12,} {r['new_ms']:>9.3f} ms {old_text:>15}")
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="synthetic collection size (0: none)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--batch1", type=int, default=200, help="queries timed one by one")
    p.add_argument("--data", default="lowrank,clustered", help="synthetic collections: lowrank, clustered")
    p.add_argument("--factories", default="", help="more factory strings to compare, separated by ';'")
    p.add_argument("--max-memory", type=float, help="GiB budget for auto (default: half the RAM)")
    p.add_argument("--pq-budget", type=float, default=0.25,
                   help="also build what auto picks when the budget is this fraction of the raw vectors (0: skip)")
    p.add_argument("--artifact", help="artifact for the real-embedding collection")
    p.add_argument("--images", default="mnist5k",
                   help="bundled set or folder embedded with --artifact (--duplicates: its held-out 20%% is used)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--filtered", action="store_true", help="filtered search at 50/10/1/0.1%% selectivity instead")
    p.add_argument("--overfetch", type=int, default=10_000, help="--filtered: the baseline's unfiltered k")
    p.add_argument("--rounds", type=int, default=3, help="--filtered: interleaved timing rounds (medians reported)")
    p.add_argument("--search-threads", type=int, default=1, help="--filtered: FAISS threads while searching")
    p.add_argument("--duplicates", action="store_true", help="near-duplicate grouping with --artifact instead")
    p.add_argument("--originals", type=int, default=200, help="--duplicates: images given edited copies")
    p.add_argument("--distractors", type=int, default=800, help="--duplicates: images without copies")
    p.add_argument("--thresholds", default="0.8,0.85,0.9,0.95,0.98,0.99,0.995,0.997,0.998",
                   help="--duplicates: cosine thresholds to try (the cosine alone)")
    p.add_argument("--candidate-threshold", type=float, default=0.80,
                   help="--duplicates: cosine that proposes pairs to the pixel check")
    p.add_argument("--pixel-thresholds", default="0.98,0.985,0.9875,0.99,0.9925,0.995",
                   help="--duplicates: aligned-correlation thresholds to try with the pixel check")
    p.add_argument("--seed", type=int, default=4, help="--duplicates: which originals, distractors and edits")
    p.add_argument("--milvus", action="store_true",
                   help="Milvus (embedded milvus-lite) against FAISS on real embeddings by --artifact instead")
    p.add_argument("--milvus-n", type=int, default=20_000, help="--milvus: items in the collection")
    p.add_argument("--milvus-copies", type=int, default=5,
                   help="--milvus: versions of each --images image embedded (the original and shifted, rotated, "
                        "rescaled copies), so that a bundled set gives enough real embeddings")
    p.add_argument("--writes", type=int, nargs="?", const=20, default=0,
                   help="the append log instead: this many single-item adds per size (default 20)")
    p.add_argument("--sizes", default="10000,100000,1000000", help="--writes: Flat index sizes")
    p.add_argument("--qps-factories", default="", help="--writes: also these factories with 1%% in the log (';')")
    p.add_argument("--qps-n", type=int, default=200_000, help="--writes: collection size for --qps-factories")
    p.add_argument("--qps-batch", type=int, default=100, help="--writes: items per write of the 1%% logged")
    p.add_argument("--parse", action="store_true", help="the filter parser on 1-64 KB filters instead")
    p.add_argument("--watch", help=argparse.SUPPRESS)  # the other worker of --writes
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.watch:
        return watch(args.watch)
    if args.parse:
        rows = run_parse(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
        return
    args.max_memory = int(args.max_memory * 2**30) if args.max_memory else None
    extra = [f.strip() for f in args.factories.split(";") if f.strip()]
    generators = {"lowrank": lowrank, "clustered": clustered}
    rows: list[dict[str, Any]] = []
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; timings share the CPU with "
          "whatever else runs: compare the ratios", flush=True)
    if args.writes:
        with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
            rows = run_writes(args, Path(tmp))
            if args.qps_factories:
                rows += run_log_qps(args, Path(tmp))
                print_writes([r for r in rows if r.get("factory") not in (None, "Flat")])
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
        return
    if args.filtered or args.duplicates or args.milvus:
        with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
            if (args.duplicates or args.milvus) and not args.artifact:
                raise SystemExit("--duplicates and --milvus need --artifact (the demo's: demo/artifact)")
            if args.milvus:
                rows = run_milvus(args, Path(tmp))
            else:
                rows = run_filtered(args, Path(tmp)) if args.filtered else run_duplicates(args, Path(tmp))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
        return
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        work = Path(tmp)
        if args.n:
            for name in [d for d in args.data.split(",") if d]:
                if name not in generators:
                    raise SystemExit(f"unknown --data {name!r}; choose from {', '.join(generators)}")
                started = time.perf_counter()
                x = generators[name](args.n, args.dim, seed=1)
                q = generators[name](args.queries, args.dim, seed=2)
                print(f"generated {name} in {time.perf_counter() - started:.1f} s", flush=True)
                rows += run_collection(name, x, q, work, args, extra)
                del x
        if args.artifact:
            x, q, figures = real_embeddings(args, work)
            print(f"\nreal embeddings: {figures['images']} images embedded at {figures['images_per_s']} images/s "
                  f"({figures['embed_backend']}, {figures['dim']}-d)", flush=True)
            nlist = tuning.nlist_for(len(x))
            real_extra = extra + [f"HNSW{tuning.HNSW_M},Flat", f"IVF{nlist}_HNSW{tuning.HNSW_M},Flat"]
            real_rows = run_collection(f"real-{Path(args.images).name}", x, q, work, args, real_extra)
            for r in real_rows:
                r["embedding"] = figures
            rows += real_rows
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
