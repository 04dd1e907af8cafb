"""``mae index build|add|remove|info`` and ``mae search``: thin handlers over retrieval.build / retrieval.index."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mae.images import ImageError, read_image
from retrieval import build as build_lib
from retrieval.index import Hit, Index

THUMB = 128


def index_build(args: argparse.Namespace) -> dict[str, Any] | int:
    summary = build_lib.build_index(
        args.artifact, args.images, args.out, factory=args.factory, batch_size=args.batch_size,
        workers=args.workers, shards=args.shards, backend=args.backend, device=args.device,
        max_memory=_gib(args.max_memory), gpu=_gpu_flag(args.gpu), target_recall=args.recall,
        overwrite=args.overwrite, progress=True)
    return 0 if summary.get("rank", 0) != 0 else summary  # under torchrun only rank 0 reports


def index_add(args: argparse.Namespace) -> dict[str, Any]:
    return build_lib.add_images(args.index, args.images, artifact=args.artifact, batch_size=args.batch_size,
                                workers=args.workers, backend=args.backend, device=args.device)


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
    ]
    if info["auto_factory_now"] != info["factory"] and info["count"]:
        lines.append(f"note       auto would now choose {info['auto_factory_now']} for {info['count']} items "
                     "(rebuild with mae index build to switch)")
    info["text"] = "\n".join(lines)
    return info


def search(args: argparse.Namespace) -> dict[str, Any]:
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    idx = Index.load(args.index)
    embedder = build_lib.load_embedder(idx, args.artifact, backend=args.backend, device=args.device)
    query = Path(args.image)
    if not query.is_file():
        raise FileNotFoundError(f"no such image: {query}")
    vector = embedder.embed([query])
    hits = idx.search(vector, args.k)[0]
    result: dict[str, Any] = {
        "query": str(query.resolve()), "index": str(idx.path), "k": args.k, "count": idx.count,
        "neighbours": [{"rank": r + 1, "id": h.id, "score": round(h.score, 6), "path": h.path, "label": h.label}
                       for r, h in enumerate(hits)],
    }
    lines = [f"{len(hits)} nearest of {idx.count} in {idx.path} to {query}:"]
    lines += [f"  {r + 1:>3}  {h.score:.4f}  {h.label or '-':<10}  {h.path}" for r, h in enumerate(hits)]
    if not hits:
        lines.append("  (the index is empty)")
    if args.show:
        result["sheet"] = str(contact_sheet(query, hits, args.show))
        lines.append(f"contact sheet: {result['sheet']}")
    result["text"] = "\n".join(lines)
    return result


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
