"""Files that must never be seen half-written, the hash that names a file's bytes, and reading our JSON back.

Every writer of a file that something else reads back (checkpoints, config.json, manifests, index files,
caches) goes through ``atomic_path``: the data is written to a temporary file in the same folder, flushed to
disk, and renamed over the target, so a reader or a process killed at any instant sees the old file or the new
one, never a torn one. Disks and people still damage files afterwards, so every JSON file of ours is read back
through ``read_json`` / ``read_json_lines``, whose errors name the file instead of quoting a decoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mae.errors import UserError

CHUNK = 1 << 20


class DamagedFileError(UserError, ValueError):
    """A file of ours that exists but does not hold what we write there (not UTF-8, not JSON, cut short)."""


def sha256_file(path: str | Path, h: Any = None) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks; pass ``h`` to fold the bytes into a running hash."""
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, fsync it and rename it into place.

    On an exception the temporary file is removed and ``path`` is untouched. Temporary names are
    ``NAME.<random>.tmp``, which ``remove_stale_temporaries`` recognises after a kill.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON (non-JSON values through ``str``), atomically."""
    return write_bytes_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file we wrote; a damaged one raises ``DamagedFileError`` naming the file and the damage.

    ``what`` says what the file is for the message ("artifact config", "index manifest"). A missing file raises
    ``FileNotFoundError`` as usual: whether that is an error is the caller's business.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise DamagedFileError(f"{path} is empty: this {what} was cut short or zeroed")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DamagedFileError(f"{path} is not a readable {what}: byte {e.start} is not UTF-8 text "
                               "(the file is damaged)") from None
    except json.JSONDecodeError as e:
        raise DamagedFileError(f"{path} is not valid JSON at line {e.lineno} column {e.colno} ({e.msg}): this {what} "
                               "is damaged or cut short") from None
    except (RecursionError, ValueError) as e:  # absurd nesting, integers past Python's digit limit
        raise DamagedFileError(f"{path} is not a readable {what} ({type(e).__name__}: {e})") from None


def read_json_lines(path: str | Path, what: str = "JSON-lines file", torn_tail: bool = False) -> list[Any]:
    """One JSON value per non-empty line (metrics.jsonl); a damaged line names the file and its line number.

    ``torn_tail``: skip a last line that lacks its newline and does not parse, which is what a process killed
    while appending leaves (appends are not atomic); anything else that does not parse is damage.
    """
    path = Path(path)
    rows = []
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if not (torn_tail and e.start > data.rfind(b"\n")):
            raise DamagedFileError(f"{path} is not a readable {what}: byte {e.start} is not UTF-8 text "
                                   "(the file is damaged)") from None
        text = data[: data.rfind(b"\n") + 1].decode("utf-8")
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError) as e:
            if torn_tail and number == len(lines) and not text.endswith("\n"):
                break
            raise DamagedFileError(f"{path} line {number} is not valid JSON ({type(e).__name__}): "
                                   f"the {what} is damaged") from None
    return rows


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete ``NAME.*.tmp`` files that a killed ``atomic_path`` writer of ``path`` left behind."""
    path = Path(path)
    stale = [p for p in path.parent.glob(path.name + ".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename durable (a folder's entries are data too); some filesystems refuse, which is harmless."""
    with contextlib.suppress(OSError):
        fsync(path)
