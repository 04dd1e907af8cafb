"""Pictures of search results: a query's contact sheet and the groups of near-copies (``--show PNG``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from mae.images import ImageError, read_image

if TYPE_CHECKING:
    from retrieval.index import Hit

THUMB = 128


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
            sheet.paste(thumbnail_cell(m["file"]), (x, y))
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
        sheet.paste(thumbnail_cell(path), (x, y))
        if j == 0:
            draw.rectangle([x - 2, y - 2, x + THUMB + 1, y + THUMB + 1], outline=(220, 40, 40), width=2)
        draw.text((x + 2, y + THUMB + 2), title, fill="black")
        draw.text((x + 2, y + THUMB + 15), sub, fill=(90, 90, 90))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def thumbnail_cell(path: str | Path) -> Image.Image:
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
