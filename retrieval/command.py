"""``mae index build|add|remove|info|duplicates|compact|check|migrate`` and ``mae search``: their flags, and
thin handlers over retrieval.build and retrieval.index (imported inside the handlers: building ``mae``'s parser
must not load faiss).

Every ``--index`` (and ``--out`` of build) is an index name, whichever engine holds it (``retrieval.engine``):
a folder (FAISS), or an engine's ``SCHEME:...`` form. The handlers use only ``Index``'s public methods.

``--json`` answers carry each item's ``path`` as the HTTP API shows it (relative to the indexed folders) and,
since the command runs where the files are, its absolute ``file`` too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.formats import BACKEND_CHOICES, BACKEND_HELP  # stdlib only
from mae.errors import UsageError
from mae.flags import add_json_flag

if TYPE_CHECKING:
    from retrieval.index import Hit, Index


INDEX_HELP = "the index: a folder (FAISS), or SCHEME:... of another engine (e.g. milvus:PATH.db)"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``index`` (build, add, remove, info, duplicates, compact, check, migrate) and ``search`` to ``mae``."""
    p = sub.add_parser("index", help="build and change a similarity index over an image collection")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    _register_build_and_add(isub)
    _register_changes(isub)
    _register_upkeep(isub)
    _register_search(sub)


def _register_build_and_add(isub: argparse._SubParsersAction) -> None:
    i = isub.add_parser("build", help="embed a collection with an artifact and index it")
    i.add_argument("--artifact", required=True, help="artifact folder (mae export)")
    i.add_argument("--images", required=True, nargs="+",
                   help="folders (class subfolders become labels), files, .txt lists, or WebDataset shards (one spec)")
    i.add_argument("--out", required=True, help="the index to write: " + INDEX_HELP.removeprefix("the index: "))
    i.add_argument("--factory", default="auto",
                   help="auto (exact, HNSW, IVF or IVF-PQ by collection size), any faiss factory string, or for "
                        "a Milvus index FLAT, HNSW, IVF_FLAT or IVF_PQ")
    i.add_argument("--shards", type=int, default=1,
                   help="> 1: train the IVF once, fill this many shards in worker processes, merge on disk (mmap)")
    i.add_argument("--max-memory", type=float, metavar="GIB", help="memory the index may use (default: half the RAM)")
    i.add_argument("--recall", type=float, default=0.95, help="recall@10 the search parameters are tuned to reach")
    i.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto", help="train and search on GPUs (faiss-gpu)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    for q in (i, ia := isub.add_parser("add", help="add images (files already indexed, by sha256, are skipped)")):
        q.add_argument("--metadata", metavar="FILE",
                       help="labels and tags by path: items.jsonl ({\"path\": ..., \"label\": ..., \"tags\": {...}}) "
                            "or items.csv (path,label,TAG...)")
        q.add_argument("--batch-size", type=int, default=64, help="images per embedding batch")
        q.add_argument("--workers", type=int, default=2, help="DataLoader processes reading and decoding images")
        q.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help=BACKEND_HELP)
        q.add_argument("--device", help="torch device for the embedder (default: cuda when available)")
        add_json_flag(q)
    i.set_defaults(handler="retrieval.command:index_build")
    ia.add_argument("--index", required=True, help=INDEX_HELP)
    ia.add_argument("images", nargs="+", metavar="DIR_OR_FILE", help="folders or image files to add")
    ia.add_argument("--artifact", help="artifact (default: the one recorded in the index manifest)")
    ia.set_defaults(handler="retrieval.command:index_add")


def _register_changes(isub: argparse._SubParsersAction) -> None:
    i = isub.add_parser("remove", help="remove items by path or id")
    i.add_argument("--index", required=True, help=INDEX_HELP)
    i.add_argument("items", nargs="+", metavar="PATH_OR_ID", help="image paths or catalogue ids")
    add_json_flag(i)
    i.set_defaults(handler="retrieval.command:index_remove")
    i = isub.add_parser("info", help="what an index holds and how it searches")
    i.add_argument("--index", required=True, help=INDEX_HELP)
    add_json_flag(i)
    i.set_defaults(handler="retrieval.command:index_info")
    i = isub.add_parser("duplicates", help="group near-copies (resized, cropped, re-encoded) of the same image")
    i.add_argument("--index", required=True, help=INDEX_HELP)
    i.add_argument("--threshold", type=float,
                   help="cosine at or above which two items are candidates (default 0.80 with the pixel check, "
                        "0.998 without: both measured, see docs/retrieval.md)")
    i.add_argument("--pixel-threshold", type=float,
                   help="keep a candidate pair when its grey thumbnails, once aligned (scale, rotation, shift), "
                        "correlate at or above this (default 0.9875, measured)")
    i.add_argument("--no-pixel-check", action="store_true",
                   help="group by the cosine alone (no file is read; precise only at a high --threshold)")
    i.add_argument("--show", metavar="PNG", help="write a picture: one row per group")
    add_json_flag(i)
    i.set_defaults(handler="retrieval.command:index_duplicates")


def _register_upkeep(isub: argparse._SubParsersAction) -> None:
    i = isub.add_parser("compact", help="fold what writes appended into the index (FAISS: a new index.faiss; "
                                        "writes do this by themselves past a threshold)")
    i.add_argument("--index", required=True, help=INDEX_HELP)
    i.add_argument("--if-due", action="store_true",
                   help="only when the log has passed the thresholds a write would compact at")
    add_json_flag(i)
    i.set_defaults(handler="retrieval.command:index_compact")
    i = isub.add_parser("check", help="check that the parts of an index agree; --repair rebuilds what survives")
    i.add_argument("--index", required=True, help=INDEX_HELP)
    i.add_argument("--repair", action="store_true",
                   help="keep what the surviving parts agree on, commit it, and list what was dropped")
    i.add_argument("--artifact", help="with --repair: the artifact that built the index (to embed images again "
                                      "when index.faiss is lost, or to name the model when the manifest is)")
    add_json_flag(i)
    i.set_defaults(handler="retrieval.command:index_check")
    i = isub.add_parser("migrate", help="copy an index to another engine (a FAISS folder <-> a Milvus collection) "
                                        "without embedding anything again")
    i.add_argument("--from", dest="source", required=True, metavar="INDEX", help="the index to copy: " + INDEX_HELP
                   .removeprefix("the index: "))
    i.add_argument("--to", dest="target", required=True, metavar="INDEX2",
                   help="the index to make (e.g. milvus://HOST:19530/photos, milvus:PATH.db or a folder)")
    i.add_argument("--factory", help="the target's index type (default: the kind the source has; auto: chosen by "
                                     "size; Milvus: FLAT, HNSW, IVF_FLAT, IVF_PQ)")
    i.add_argument("--batch-size", type=int, default=4096, help="items read from the source per request")
    i.add_argument("--overwrite", action="store_true", help="replace an existing index at --to")
    add_json_flag(i)
    i.set_defaults(handler="retrieval.command:index_migrate")


def _register_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="nearest images of an image (or of an indexed item) in an index")
    p.add_argument("--index", required=True, help=INDEX_HELP + " (mae index build)")
    p.add_argument("image", nargs="?", help="query image file (or --id)")
    p.add_argument("--id", type=int, help="more like this: the item with this id is the query (and left out)")
    p.add_argument("-k", type=int, default=10, help="neighbours to return (at most the size of the index)")
    p.add_argument("--where", action="append", metavar="FILTER",
                   help="only items that match, e.g. label=cat, path^=photos/2024/, added>=2026-01-01, "
                        "tag.camera=X100 (repeat: all must hold; operators = != ^= < <= > >=)")
    p.add_argument("--min-score", type=float, help="leave out neighbours with a cosine below this")
    p.add_argument("--show", metavar="PNG", help="write a contact sheet: the query and its neighbours with scores")
    p.add_argument("--artifact", help="artifact (default: the one recorded in the index manifest)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help=BACKEND_HELP)
    p.add_argument("--device", help="torch device for the embedder")
    add_json_flag(p)
    p.set_defaults(handler="retrieval.command:search")


def index_build(args: argparse.Namespace) -> dict[str, Any] | int:
    from retrieval import build as build_lib

    summary = build_lib.build_index(
        args.artifact, args.images, args.out, factory=args.factory, batch_size=args.batch_size,
        workers=args.workers, shards=args.shards, backend=args.backend, device=args.device,
        max_memory=_gib(args.max_memory), gpu=_gpu_flag(args.gpu), target_recall=args.recall,
        overwrite=args.overwrite, progress=True, metadata=args.metadata)
    return 0 if summary.get("rank", 0) != 0 else summary  # under torchrun only rank 0 reports


def index_add(args: argparse.Namespace) -> dict[str, Any]:
    from retrieval import build as build_lib

    return build_lib.add_images(args.index, args.images, artifact=args.artifact, batch_size=args.batch_size,
                                workers=args.workers, backend=args.backend, device=args.device,
                                metadata=args.metadata)


def index_remove(args: argparse.Namespace) -> dict[str, Any]:
    from retrieval.index import Index, ItemNotFoundError

    idx = Index.open(args.index, gpu=False)
    result = idx.remove(args.items)
    info = idx.info()
    info.update(removed=result.ids, missing=result.missing, rebuilt=result.rebuilt)
    lines = [f"removed {len(result.ids)} item(s) from {idx.name}; {idx.count} left"]
    if info.get("tombstones"):
        lines.append(f"  {info['tombstones']} removed vector(s) stay in the {idx.factory} index as tombstones, "
                     "filtered at search, until a compaction drops them (HNSW: rebuilt past 20%)")
    if result.rebuilt:
        lines.append(f"  rebuilt the {idx.factory} index without the removed vectors")
    if result.missing:
        lines.append(f"  not in the index: {', '.join(result.missing[:10])}")
    info["text"] = "\n".join(lines)
    if result.missing and not result.ids:
        raise ItemNotFoundError(f"nothing removed: {', '.join(result.missing[:10])} not in {idx.name}")
    return info


def index_info(args: argparse.Namespace) -> dict[str, Any]:
    from retrieval.index import Index

    idx = Index.open(args.index, gpu=False)
    info = idx.info()
    t = info.get("tuning") or {}
    labels = info["labels"]
    held = f", {info['ntotal']} vectors" if "ntotal" in info else ""
    held += f", {info['tombstones']} tombstones" if info.get("tombstones") is not None else ""
    lines = [
        f"index      {info['index']} ({info['engine']})",
        f"items      {info['count']} (generation {info['generation']}{held})",
        f"factory    {info['factory']}" + (f" ({info['factory_reason']})" if info.get("factory_reason") else ""),
        f"search     {info.get('search_params') or 'exact'}"
        + (f", recall@10 {t.get('recall@10')} on {t.get('queries')} held-out queries" if t.get("queries") else ""),
        f"artifact   {info['artifact_sha256'][:12]} ({info['artifact']})",
        f"dim        {info['dim']}, {info['metric']} on L2-normalised vectors",
    ]
    if "bytes" in info:
        lines.append(f"on disk    {info['bytes'] / 2**20:.1f} MiB"
                     + (", memory-mapped inverted lists" if info.get("on_disk") else ""))
    lines += [
        "labels     " + (", ".join(f"{k or '(none)'}: {v}" for k, v in list(labels.items())[:12]) or "none"),
        "tags       " + (", ".join(f"{k}: {v}" for k, v in list(info["tags"].items())[:12]) or "none"),
        "folders    " + (", ".join(info["roots"][:-1]) or "none recorded"),
    ]
    if info.get("log"):
        g = info["log"]
        lines.append(f"log        {g['vectors']} added, {g['removed']} removed since index.faiss was compacted at "
                     f"generation {g['base_generation']} ({g['bytes'] / 1024:.0f} KiB); "
                     + (f"due for compaction: {g['compaction_due']}" if g.get("compaction_due") else
                        f"compacts by itself past {g['thresholds']['fraction']:.0%} of the collection and "
                        f"{g['thresholds']['minimum']} changes (mae index compact: now)"))
    if info.get("auto_factory_now") not in (None, info["factory"]) and info["count"]:
        lines.append(f"note       auto would now choose {info['auto_factory_now']} for {info['count']} items "
                     "(rebuild with mae index build to switch)")
    info["text"] = "\n".join(lines)
    return info


def search(args: argparse.Namespace) -> dict[str, Any]:
    from retrieval import build as build_lib
    from retrieval.index import Index, ItemNotFoundError
    from retrieval.pictures import contact_sheet

    if args.k < 1:
        raise UsageError(f"-k must be >= 1, got {args.k}")
    if (args.image is None) == (args.id is None):
        raise UsageError("give a query image or --id N (an item of the index), not both")
    if args.min_score is not None and not math.isfinite(args.min_score):
        raise UsageError(f"--min-score must be a number, got {args.min_score}")
    idx = Index.open(args.index)
    k = min(args.k, max(idx.count, 1))  # more neighbours than items cannot come back
    if args.id is not None:
        if idx.row(args.id) is None:
            raise ItemNotFoundError(f"no item {args.id} in {idx.name}")
        query_path = Path(idx.row(args.id).path)
        hits = idx.similar(args.id, k, where=args.where, min_score=args.min_score)
        described = f"item {args.id} ({query_path})"
    else:
        embedder = build_lib.load_embedder(idx, args.artifact, backend=args.backend, device=args.device)
        query_path = Path(args.image)
        if not query_path.is_file():
            raise FileNotFoundError(f"no such image: {query_path}")
        hits = idx.search(embedder.embed([query_path]), k, where=args.where, min_score=args.min_score)[0]
        described = str(query_path)
    result: dict[str, Any] = {
        "query": str(query_path.resolve()), "query_id": args.id, "index": idx.name, "k": k, "count": idx.count,
        "where": list(args.where or []), "min_score": args.min_score,
        "neighbours": [dict(rank=r + 1, **hit_json(idx, h)) for r, h in enumerate(hits)],
    }
    scope = f" matching {' and '.join(args.where)}" if args.where else ""
    lines = [f"{len(hits)} nearest{scope} of {idx.count} in {idx.name} to {described}:"]
    lines += [f"  {r + 1:>3}  {h.score:.4f}  {h.label or '-':<10}  {h.path}" for r, h in enumerate(hits)]
    if not hits:
        lines.append("  (the index is empty)" if not idx.count else "  (no item matches)")
    if args.k > k:
        lines.append(f"  (-k {args.k} capped at the {idx.count} items of the index)")
    if args.show:
        result["sheet"] = str(contact_sheet(query_path, hits, args.show))
        lines.append(f"contact sheet: {result['sheet']}")
    result["text"] = "\n".join(lines)
    return result


def hit_json(idx: Index, h: Hit) -> dict[str, Any]:
    """One neighbour as --json shows it: the path as answers give it, and the file where it is."""
    return {"id": h.id, "score": round(h.score, 6), "path": idx.relative(h.path), "file": h.path,
            "label": h.label, "tags": h.tags or {}}


def index_duplicates(args: argparse.Namespace) -> dict[str, Any]:
    from retrieval import verify
    from retrieval.index import DUPLICATE_THRESHOLD, Index
    from retrieval.pictures import groups_sheet

    pixels = not args.no_pixel_check
    if args.threshold is None:
        args.threshold = verify.CANDIDATE_THRESHOLD if pixels else DUPLICATE_THRESHOLD
    if not -1.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold is a cosine in [-1, 1], got {args.threshold}")
    if args.pixel_threshold is not None and not pixels:
        raise UsageError("--pixel-threshold is for the pixel check, which --no-pixel-check turns off")
    idx = Index.open(args.index)
    check = None
    if pixels:
        def files(ids: Sequence[int]) -> dict[int, str]:
            return {i: r.path for i, r in idx.rows(ids).items()}

        pixel_threshold = verify.PIXEL_THRESHOLD if args.pixel_threshold is None else args.pixel_threshold
        check = verify.PixelCheck(files, pixel_threshold)
    from tqdm.auto import tqdm

    bar = tqdm(total=idx.count, desc="near-duplicates", unit="item", disable=None, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        groups = idx.duplicates(args.threshold, progress=progress, check=check)
    finally:
        bar.close()
    rows = idx.rows([i for g in groups for i, _ in g])
    out = [[{"id": i, "best_score": s, "path": idx.relative(rows[i].path), "file": rows[i].path,
             "label": rows[i].label} for i, s in g if i in rows] for g in groups]
    copies = sum(len(g) - 1 for g in out)
    result: dict[str, Any] = {"index": idx.name, "threshold": args.threshold, "count": idx.count,
                              "groups": out, "items_in_groups": sum(map(len, out)), "redundant": copies,
                              "pixel_check": None}
    how = f"cosine >= {args.threshold}"
    if check is not None:
        how += f", aligned pixels >= {check.threshold}"
        kept = sum(s >= check.threshold for s in check.scores.values())
        result["pixel_check"] = {"threshold": check.threshold, "pairs_checked": len(check.scores),
                                 "pairs_kept": kept, "unreadable": {str(i): why for i, why in check.unreadable.items()}}
    lines = [f"{len(out)} group(s) of near-copies ({how}) among {idx.count} items in {idx.name}; "
             f"{copies} item(s) could go"]
    if check is not None:
        lines.append(f"  pixel check: {kept} of {len(check.scores)} candidate pairs line up")
        if check.unreadable:
            some = ", ".join(f"{i} ({why})" for i, why in list(check.unreadable.items())[:3])
            lines.append(f"  {len(check.unreadable)} item(s) could not be read, so were not grouped: {some}"
                         + (" ..." if len(check.unreadable) > 3 else ""))
    for n, g in enumerate(out[:20], 1):
        lines.append(f"  group {n}: " + ", ".join(f"{m['id']} {m['path']}" for m in g[:6])
                     + (f", ... ({len(g) - 6} more)" if len(g) > 6 else ""))
    if len(out) > 20:
        lines.append(f"  ... and {len(out) - 20} more groups (see --json)")
    if args.show:
        result["sheet"] = str(groups_sheet(out, args.show))
        lines.append(f"groups sheet: {result['sheet']}")
    result["text"] = "\n".join(lines)
    return result


def index_compact(args: argparse.Namespace) -> dict[str, Any]:
    from retrieval.index import Index

    idx = Index.open(args.index, gpu=False)
    before = idx.info().get("log") or {}
    report = idx.compact(force=not args.if_due)
    if report.get("compacted"):
        text = (f"compacted {idx.name} at generation {report.get('generation')}: folded "
                f"{report.get('folded_vectors', 0)} added vector(s) and {report.get('folded_removals', 0)} removal(s) "
                f"in {report.get('seconds', 0):.2f} s" + ("; rebuilt without its tombstones" if report.get("rebuilt")
                                                          else ""))
    else:
        text = f"{idx.name}: not compacted ({report.get('reason')})"
    report.update(log_before=before, text=text)
    return report


def index_migrate(args: argparse.Namespace) -> dict[str, Any]:
    from retrieval.migrate import migrate

    return migrate(args.source, args.target, factory=args.factory, overwrite=args.overwrite, batch=args.batch_size)


def index_check(args: argparse.Namespace) -> dict[str, Any] | int:
    """Exit 0 when the index is sound (or was repaired to soundness), 1 otherwise, after printing the report."""
    from retrieval.index import Index

    if args.repair:
        report = Index.repair(args.index, args.artifact, progress=True)
        if report["ok"]:  # uploads a killed writer stored but never committed (retrieval.uploads)
            from retrieval.uploads import remove_orphan_uploads

            with contextlib.closing(Index.open(args.index, gpu=False)) as idx:
                removed = remove_orphan_uploads(idx)
            report["orphan_uploads"] = [str(p) for p in removed]
            if removed:
                report["text"] += f"\n  removed {len(removed)} stored upload(s) that no item names"
    else:
        if args.artifact:
            raise UsageError("--artifact is for --repair (it embeds images again, or names the model)")
        report = Index.check(args.index)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "text"}, default=str))
    else:
        print(report["text"])
    return 0 if report["ok"] else 1


def _gib(value: float | None) -> int | None:
    if value is None:
        return None
    if value <= 0:
        raise UsageError(f"--max-memory must be > 0 GiB, got {value}")
    return int(value * 2**30)


def _gpu_flag(value: str) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[value]
