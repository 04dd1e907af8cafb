"""The append log of a FAISS folder: what writes added and removed since ``index.faiss`` was last compacted.

A write of b items appends one record (b ids and b vectors, or b removed ids) to a segment file ``log.G`` and
commits it by naming the new end of the segment in ``manifest.json``; ``index.faiss`` is not touched. Readers
read only the bytes between the end they have applied and the committed end. The manifest lists the committed
byte ranges (``log``: ``[[file, start, end], ...]``, in order): bytes past a range's end are an interrupted
write's and are cut off by the next writer (``discard_uncommitted``); a compaction that folds the first records
of a segment into ``index.faiss`` moves that range's start past them.

A record::

    header  magic "MAEL", version u8, kind u8 (1 add, 2 remove), reserved u16, generation i64, n i64, dim i32,
            crc32 u32 of the payload                                                    (32 bytes, little-endian)
    payload ids int64 (n,), then for an add the L2-normalised vectors float32 (n, dim)

Counts in a header are claims: a record is read only when its payload fits in the committed range, and its
checksum matches; anything else is damage (``LogDamagedError``), named with the file and offset.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mae.files import fsync_dir

ADD, REMOVE = 1, 2
MAGIC = b"MAEL"
VERSION = 1
HEADER = struct.Struct("<4sBBHqqiI")
PREFIX = "log."


class LogDamagedError(RuntimeError):
    """A committed record cannot be read (missing segment, bad header, short payload, wrong checksum)."""


@dataclass(frozen=True)
class Record:
    """One write's change: ``ids`` int64 (n,) added with ``vectors`` float32 (n, dim), or removed."""

    kind: int
    generation: int
    ids: np.ndarray
    vectors: np.ndarray | None = None


@dataclass(frozen=True)
class Range:
    """The committed bytes [start, end) of one segment file."""

    file: str
    start: int
    end: int


def ranges(manifest: dict[str, Any]) -> list[Range]:
    """The committed ranges a manifest names (none in a manifest from before the log)."""
    return [Range(str(f), int(a), int(b)) for f, a, b in manifest.get("log") or []]


def as_manifest(rs: Sequence[Range]) -> list[list[Any]]:
    return [[r.file, r.start, r.end] for r in rs]


def valid_ranges(value: Any) -> bool:
    """Whether a manifest's ``log`` field is a list of [segment name, start, end] with 0 <= start <= end."""
    if value is None:
        return True
    if not isinstance(value, list):
        return False
    for r in value:
        if not (isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and r[0].startswith(PREFIX)
                and "/" not in r[0] and all(isinstance(v, int) and not isinstance(v, bool) for v in r[1:])
                and 0 <= r[1] <= r[2]):
            return False
    return True


def encode(kind: int, generation: int, ids: np.ndarray, vectors: np.ndarray | None = None) -> bytes:
    """One record as bytes. ``vectors``: (n, dim) float32 for an add, None for a remove."""
    ids = np.ascontiguousarray(ids, "<i8")
    payload = ids.tobytes()
    dim = 0
    if kind == ADD:
        vectors = np.ascontiguousarray(vectors, "<f4")
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"an add record needs (n, dim) vectors for its {len(ids)} ids")
        dim = vectors.shape[1]
        payload += vectors.tobytes()
    return HEADER.pack(MAGIC, VERSION, kind, 0, generation, len(ids), dim, zlib.crc32(payload)) + payload


def append(folder: Path, committed: Sequence[Range], record: bytes, generation: int) -> list[Range]:
    """Write ``record`` after the committed end of the last segment (a new segment ``log.G`` when there is none)
    and make it durable; returns the ranges the manifest must name to commit it. Bytes an interrupted write
    left past the committed end are overwritten (the file is cut at the committed end first)."""
    rs = list(committed)
    if rs:
        last = rs[-1]
        file, start, end = last.file, last.start, last.end
    else:
        file, start, end = f"{PREFIX}{generation}", 0, 0
    path = folder / file
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if os.fstat(fd).st_size != end:
            os.ftruncate(fd, end)
        os.lseek(fd, end, os.SEEK_SET)
        view = memoryview(record)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(folder)
    new = Range(file, start, end + len(record))
    return [*rs[:-1], new] if rs else [new]


def read(folder: Path, rs: Sequence[Range], dim: int, after: tuple[str, int] | None = None
         ) -> Iterator[tuple[Record, tuple[str, int]]]:
    """The committed records of ``rs`` in order, each with the position just past it.

    ``after`` (segment, offset): start there when that segment is still named (only what is new is read);
    otherwise every range is read. Raises LogDamagedError for anything that is not a whole, sound record.
    """
    if after is not None and any(r.file == after[0] for r in rs):
        at = next(i for i, r in enumerate(rs) if r.file == after[0])
        rs = [Range(rs[at].file, max(rs[at].start, after[1]), rs[at].end), *rs[at + 1:]]
    for r in rs:
        if r.end <= r.start:
            continue
        path = folder / r.file
        try:
            with open(path, "rb") as f:
                f.seek(r.start)
                data = f.read(r.end - r.start)
        except FileNotFoundError:
            raise LogDamagedError(f"{path} (an append-log segment the manifest names) is missing") from None
        if len(data) != r.end - r.start:
            raise LogDamagedError(f"{path} is {r.start + len(data)} bytes long but the manifest commits "
                                  f"{r.end}: it was cut short")
        pos = 0
        while pos < len(data):
            record, size = _decode(data, pos, dim, path, r.start + pos)
            pos += size
            yield record, (r.file, r.start + pos)


def _decode(data: bytes, pos: int, dim: int, path: Path, offset: int) -> tuple[Record, int]:
    if len(data) - pos < HEADER.size:
        raise LogDamagedError(f"{path} at byte {offset}: a record header is cut short")
    magic, version, kind, _, generation, n, d, crc = HEADER.unpack_from(data, pos)
    if magic != MAGIC or version != VERSION or kind not in (ADD, REMOVE):
        raise LogDamagedError(f"{path} at byte {offset}: not an append-log record")
    width = 8 + (4 * dim if kind == ADD else 0)  # bytes per item
    if n < 0 or (kind == ADD and d != dim) or (kind == REMOVE and d != 0) or n * width > len(data) - pos - HEADER.size:
        raise LogDamagedError(f"{path} at byte {offset}: a record claims {n} items of dimension {d}, which the "
                              f"committed bytes do not hold (the index has dimension {dim})")
    start = pos + HEADER.size
    payload = data[start : start + n * width]
    if zlib.crc32(payload) != crc:
        raise LogDamagedError(f"{path} at byte {offset}: the record's checksum does not match (damaged bytes)")
    ids = np.frombuffer(payload, "<i8", n).astype(np.int64)
    vectors = np.frombuffer(payload, "<f4", n * dim, 8 * n).reshape(n, dim).astype(np.float32) if kind == ADD else None
    return Record(kind, int(generation), ids, vectors), HEADER.size + n * width


def discard_uncommitted(folder: Path, committed: Sequence[Range]) -> None:
    """Cut what interrupted writes left past the committed end of the last segment, and delete segments the
    manifest no longer names (folded by a compaction, or begun by a write that never committed)."""
    named = {r.file for r in committed}
    if committed:
        last = folder / committed[-1].file
        if last.exists() and last.stat().st_size > committed[-1].end:
            with open(last, "r+b") as f:
                f.truncate(committed[-1].end)
                os.fsync(f.fileno())
    for path in folder.glob(PREFIX + "*"):
        if path.name not in named and path.name[len(PREFIX):].isdigit():
            path.unlink(missing_ok=True)


def committed_bytes(rs: Sequence[Range]) -> int:
    return sum(r.end - r.start for r in rs)
