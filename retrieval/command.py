"""``mae index build|add|remove|info|duplicates|check`` and ``mae search``: thin handlers over retrieval.build,
retrieval.index and retrieval.repair.

``--json`` answers carry each item's ``path`` as the HTTP API shows it (relative to the indexed folders) and,
since the command runs where the files are, its absolute ``file`` too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mae.images import ImageError, read_image
from retrieval import build as build_lib
from retrieval.index import DUPLICATE_THRESHOLD, Hit, Index

THUMB = 128


def index_build(args: argparse.Namespace) -> dict[str, Any] | int:
    summary = build_lib.build_index(
        args.artifact, args.images, args.out, factory=args.factory, batch_size=args.batch_size,
        workers=args.workers, shards=args.shards, backend=args.backend, device=args.device,
        max_memory=_gib(args.max_memory), gpu=_gpu_flag(args.gpu), target_recall=args.recall,
        overwrite=args.overwrite, progress=True, metadata=args.metadata)
    return 0 if summary.get("rank", 0) != 0 else summary  # under torchrun only rank 0 reports


def index_add(args: argparse.Namespace) -> dict[str, Any]:
    return build_lib.add_images(args.index, args.images, artifact=args.artifact, batch_size=args.batch_size,
                                workers=args.workers, backend=args.backend, device=args.device,
                                metadata=args.metadata)


def index_remove(args: argparse.Namespace) -> dict[str, Any]:
    idx = Index.load(args.index, gpu=False)
    result = idx.remove(args.items)
    info = idx.info()
    info.update(removed=result.ids, missing=result.missing, rebuilt=result.rebuilt)
    lines = [f"removed {len(result.ids)} item(s) from {idx.path}; {idx.count} left"]
    if info["tombstones"]:
        lines.append(f"  {info['tombstones']} removed vector(s) stay in the {idx.factory} index as tombstones, "
                     "filtered at search (rebuilt when they pass 20%)")
    if result.rebuilt:
        lines.append(f"  rebuilt the {idx.factory} index without the removed vectors")
    if result.missing:
        lines.append(f"  not in the index: {', '.join(result.missing[:10])}")
    info["text"] = "\n".join(lines)
    if result.missing and not result.ids:
        raise KeyError(f"nothing removed: {', '.join(result.missing[:10])} not in {idx.path}")
    return info


def index_info(args: argparse.Namespace) -> dict[str, Any]:
    idx = Index.load(args.index, gpu=False)
    info = idx.info()
    t = info["tuning"]
    labels = info["labels"]
    lines = [
        f"index      {info['index']}",
        f"items      {info['count']} (generation {info['generation']}, {info['ntotal']} vectors in FAISS, "
        f"{info['tombstones']} tombstones)",
        f"factory    {info['factory']} ({info['factory_reason']})",
        f"search     {info['search_params'] or 'exact'}"
        + (f", recall@10 {t.get('recall@10')} on {t.get('queries')} held-out queries" if t.get("queries") else ""),
        f"artifact   {info['artifact_sha256'][:12]} ({info['artifact']})",
        f"dim        {info['dim']}, {info['metric']} on L2-normalised vectors",
        f"on disk    {info['bytes'] / 2**20:.1f} MiB" + (", memory-mapped inverted lists" if info["on_disk"] else ""),
        "labels     " + (", ".join(f"{k or '(none)'}: {v}" for k, v in list(labels.items())[:12]) or "none"),
        "tags       " + (", ".join(f"{k}: {v}" for k, v in list(info["tags"].items())[:12]) or "none"),
        "folders    " + (", ".join(info["roots"][:-1]) or "none recorded"),
    ]
    if info["auto_factory_now"] != info["factory"] and info["count"]:
        lines.append(f"note       auto would now choose {info['auto_factory_now']} for {info['count']} items "
                     "(rebuild with mae index build to switch)")
    info["text"] = "\n".join(lines)
    return info


def search(args: argparse.Namespace) -> dict[str, Any]:
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    if (args.image is None) == (args.id is None):
        raise ValueError("give a query image or --id N (an item of the index), not both")
    if args.min_score is not None and not math.isfinite(args.min_score):
        raise ValueError(f"--min-score must be a number, got {args.min_score}")
    idx = Index.load(args.index)
    k = min(args.k, max(idx.count, 1))  # more neighbours than items cannot come back
    if args.id is not None:
        if idx.row(args.id) is None:
            raise KeyError(f"no item {args.id} in {idx.path}")
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
        "query": str(query_path.resolve()), "query_id": args.id, "index": str(idx.path), "k": k, "count": idx.count,
        "where": list(args.where or []), "min_score": args.min_score,
        "neighbours": [dict(rank=r + 1, **hit_json(idx, h)) for r, h in enumerate(hits)],
    }
    scope = f" matching {' and '.join(args.where)}" if args.where else ""
    lines = [f"{len(hits)} nearest{scope} of {idx.count} in {idx.path} to {described}:"]
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

    pixels = not args.no_pixel_check
    if args.threshold is None:
        args.threshold = verify.CANDIDATE_THRESHOLD if pixels else DUPLICATE_THRESHOLD
    if not -1.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold is a cosine in [-1, 1], got {args.threshold}")
    if args.pixel_threshold is not None and not pixels:
        raise ValueError("--pixel-threshold is for the pixel check, which --no-pixel-check turns off")
    idx = Index.load(args.index)
    check = None
    if pixels:
        def files(ids: Sequence[int]) -> dict[int, str]:
            return {i: r.path for i, r in idx.catalog.get(list(ids), idx.generation).items()}

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
    rows = idx.catalog.get([i for g in groups for i, _ in g], idx.generation)
    out = [[{"id": i, "best_score": s, "path": idx.relative(rows[i].path), "file": rows[i].path,
             "label": rows[i].label} for i, s in g if i in rows] for g in groups]
    copies = sum(len(g) - 1 for g in out)
    result: dict[str, Any] = {"index": str(idx.path), "threshold": args.threshold, "count": idx.count,
                              "groups": out, "items_in_groups": sum(map(len, out)), "redundant": copies,
                              "pixel_check": None}
    how = f"cosine >= {args.threshold}"
    if check is not None:
        how += f", aligned pixels >= {check.threshold}"
        kept = sum(s >= check.threshold for s in check.scores.values())
        result["pixel_check"] = {"threshold": check.threshold, "pairs_checked": len(check.scores),
                                 "pairs_kept": kept, "unreadable": {str(i): why for i, why in check.unreadable.items()}}
    lines = [f"{len(out)} group(s) of near-copies ({how}) among {idx.count} items in {idx.path}; "
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


def index_check(args: argparse.Namespace) -> dict[str, Any] | int:
    """Exit 0 when the index is sound (or was repaired to soundness), 1 otherwise, after printing the report."""
    from retrieval import repair

    if args.repair:
        report = repair.repair(args.index, args.artifact, progress=True)
    else:
        if args.artifact:
            raise ValueError("--artifact is for --repair (it embeds images again, or names the model)")
        report = repair.check(args.index)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "text"}, default=str))
    else:
        print(report["text"])
    return 0 if report["ok"] else 1


def groups_sheet(groups: Sequence[Sequence[dict[str, Any]]], out: str | Path, per_row: int = 8,
                 max_rows: int = 24) -> Path:
    """A PNG with one row per group of near-copies (first ``max_rows`` groups), each captioned id and score."""
    rows = [g[:per_row] for g in groups[:max_rows]] or [[]]
    pad, caption = 6, 30
    columns = max(1, max(len(r) for r in rows))
    sheet = Image.new("RGB", (columns * (THUMB + pad) + pad, len(rows) * (THUMB + caption + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for y_index, group in enumerate(rows):
        for x_index, m in enumerate(group):
            x, y = pad + x_index * (THUMB + pad), pad + y_index * (THUMB + caption + pad)
            sheet.paste(_thumbnail(m["file"]), (x, y))
            draw.text((x + 2, y + THUMB + 2), f"#{m['id']}  {m['best_score']:.3f}", fill="black")
            draw.text((x + 2, y + THUMB + 15), Path(m["path"]).name[:18], fill=(90, 90, 90))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def contact_sheet(query: str | Path, hits: Sequence[Hit], out: str | Path, columns: int = 6) -> Path:
    """A PNG: the query, then its neighbours in rank order, each captioned with rank, score and label."""
    cells = [(query, "query", Path(query).name[:18])]
    cells += [(h.path, f"#{r + 1}  {h.score:.3f}", (h.label or Path(h.path).name)[:18]) for r, h in enumerate(hits)]
    columns = max(1, min(columns, len(cells)))
    rows = -(-len(cells) // columns)
    pad, caption = 6, 30
    sheet = Image.new("RGB", (columns * (THUMB + pad) + pad, rows * (THUMB + caption + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (path, title, sub) in enumerate(cells):
        x = pad + (j % columns) * (THUMB + pad)
        y = pad + (j // columns) * (THUMB + caption + pad)
        sheet.paste(_thumbnail(path), (x, y))
        if j == 0:
            draw.rectangle([x - 2, y - 2, x + THUMB + 1, y + THUMB + 1], outline=(220, 40, 40), width=2)
        draw.text((x + 2, y + THUMB + 2), title, fill="black")
        draw.text((x + 2, y + THUMB + 15), sub, fill=(90, 90, 90))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _thumbnail(path: str | Path) -> Image.Image:
    """The image fitted into a THUMB square on grey (``mae.visualize.thumbnail``), or "unreadable"."""
    from mae.visualize import thumbnail  # imports torch and timm: only when a sheet is drawn

    cell = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
    try:
        im = thumbnail(read_image(path), THUMB)
    except (ImageError, OSError):
        ImageDraw.Draw(cell).text((8, THUMB // 2 - 6), "unreadable", fill="black")
        return cell
    cell.paste(im, ((THUMB - im.width) // 2, (THUMB - im.height) // 2))
    return cell


def _gib(value: float | None) -> int | None:
    if value is None:
        return None
    if value <= 0:
        raise ValueError(f"--max-memory must be > 0 GiB, got {value}")
    return int(value * 2**30)


def _gpu_flag(value: str) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[value]
