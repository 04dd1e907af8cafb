"""``mae data pack``: a source written as WebDataset shards (the writer side of ``mae.shards``).

The encoded bytes are kept as they are (no re-encoding); arrays become PNG or .npy. Each split goes to
``NAME-NNNNNN.tar`` shards of about ``--shard-size`` bytes, written deterministically (zero mtimes and owners)
to a temporary name and renamed when complete, and ``index.json`` is written last, so a folder with an index
is a complete one.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from mae.errors import AlreadyExistsError, UsageError
from mae.images import EncodedImage, ImageError, is_npy, read_bytes
from mae.shards import IMAGE_MEMBERS, INDEX, INDEX_FORMAT, INDEX_KIND

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """``512MB``, ``1GiB``, ``200k`` -> bytes (decimal units; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"--shard-size: expected a size such as 512MB or 1GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def encode_item(item: Any) -> tuple[bytes, str]:
    """A source item's bytes and member extension: files keep their bytes, arrays become PNG (8-bit grey, RGB,
    RGBA) or .npy (anything else)."""
    if isinstance(item, np.ndarray):
        if item.dtype == np.uint8 and (item.ndim == 2 or item.shape[2] in (3, 4)):
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(item).save(buf, format="PNG")
            return buf.getvalue(), "png"
        buf = io.BytesIO()
        np.save(buf, item, allow_pickle=False)
        return buf.getvalue(), "npy"
    if isinstance(item, EncodedImage):
        return item.data, "npy" if is_npy(item.data) else _ext_of(item.name) or "png"
    data = read_bytes(item)  # a regular file within the byte limit, or an ImageError naming it
    return data, "npy" if is_npy(data) else _ext_of(str(item)) or "jpg"


def _ext_of(name: str) -> str:
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    return ext if ext in IMAGE_MEMBERS else ""


class _ShardWriter:
    """Deterministic tars (zero mtimes and owners) written to a temporary name and renamed when complete."""

    def __init__(self, out: Path, prefix: str, max_bytes: int):
        self.out, self.prefix, self.max_bytes = out, prefix, max_bytes
        self.entries: list[dict[str, Any]] = []
        self.tar: tarfile.TarFile | None = None

    def add(self, key: str, members: dict[str, bytes], label_name: str | None) -> None:
        size = sum(len(v) + 1024 for v in members.values())  # + a header and padding per member
        current = self.entries[-1] if self.entries and self.tar is not None else None
        if current is None or (current["count"] and current["bytes"] + size > self.max_bytes):
            self._start()
            current = self.entries[-1]
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            self.tar.addfile(info, io.BytesIO(data))
        current["count"] += 1
        current["bytes"] += size
        if label_name is not None:
            current["classes"][label_name] = current["classes"].get(label_name, 0) + 1

    def _start(self) -> None:
        self.close()
        name = f"{self.prefix}-{len(self.entries):06d}.tar"
        self.tmp = self.out / f".{name}.tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close())
        self.entries.append({"name": name, "count": 0, "bytes": 0, "classes": {}})

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            entry = self.entries[-1]
            final = self.out / entry["name"]
            entry["bytes"] = self.tmp.stat().st_size
            os.replace(self.tmp, final)
            self.tar = None


def pack(source: Any, out: str | Path, splits: dict[str, np.ndarray], *, shard_size: int,
         split_info: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Write ``source`` (a ``mae.sources.Source``) as shards in ``out``: each split (name -> item indices, e.g. the
    seeded stratified train/val split every stage computes for the source) as ``NAME-NNNNNN.tar``, and
    index.json (``split_info``: how the split was made). Returns the index."""
    from tqdm.auto import tqdm

    from mae.files import write_json_atomic

    out = Path(out)
    if (out / INDEX).exists():
        raise AlreadyExistsError(f"{out / INDEX} exists: pack into an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"kind": INDEX_KIND, "format": INDEX_FORMAT, "source": source.name,
                             "classes": list(source.classes), **(split_info or {}), "splits": {}, "skipped": []}
    total = sum(len(v) for v in splits.values())
    with tqdm(total=total, desc="packing", unit="img", disable=not progress or None, leave=False) as bar:
        for split, chosen in splits.items():
            writer = _ShardWriter(out, split, shard_size)
            for i in chosen:
                i = int(i)
                try:
                    data, ext = encode_item(source.items[i])
                except ImageError as e:  # unreadable, not a regular file, over the byte limit: named
                    index["skipped"].append(str(e))
                    bar.update(1)
                    continue
                label = int(source.labels[i])
                members = {ext: data, "json": json.dumps({"id": source.ids[i]}).encode()}
                if label >= 0:
                    members["cls"] = str(label).encode()
                writer.add(f"{i:09d}", members, source.classes[label] if label >= 0 else None)
                bar.update(1)
            writer.close()
            index["splits"][split] = writer.entries
    write_json_atomic(out / INDEX, index)
    return index

