"""Retrieval benchmark: exact search (the named baseline) against the factories ``auto`` chooses.

For each collection -- low-rank synthetic vectors (a 32-d latent through a fixed map into D dims, plus
noise), clustered synthetic vectors (Gaussian blobs), and optionally real embeddings of bundled images by an
artifact -- it builds an exact ``Flat`` index and the index ``auto`` picks (tuned to recall@10 >= 0.95 on
held-out database vectors), plus the IVF-PQ variant ``auto`` picks when the raw vectors do not fit the memory
budget, and measures on fresh queries: build time (training, adding, tuning, catalogue), size, QPS at batch
1 and batch 1000, recall@1 and @10 against exact search, with every figure also as a ratio to exact.

i.i.d. Gaussian vectors are deliberately absent: with no structure, approximate search loses to exact.

    python bench/retrieval.py                         # 100k vectors, quick
    python bench/retrieval.py --n 1000000 --data lowrank
    python bench/retrieval.py --n 0 --artifact demo/artifact --images mnist5k   # real embeddings only
"""

from __future__ import annotations

import argparse
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
from retrieval.catalog import Item  # noqa: E402


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
    from mae.data import BUNDLED, export_source, load_source
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


def main() -> None:
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
    p.add_argument("--images", default="mnist5k", help="bundled set or folder embedded with --artifact")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    args.max_memory = int(args.max_memory * 2**30) if args.max_memory else None
    extra = [f.strip() for f in args.factories.split(";") if f.strip()]
    generators = {"lowrank": lowrank, "clustered": clustered}
    rows: list[dict[str, Any]] = []
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; timings share the CPU with "
          "whatever else runs: compare the ratios", flush=True)
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
