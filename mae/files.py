"""Files that must never be seen half-written, the hash that names a file's bytes, and reading our JSON back.

Every writer of a file that something else reads back (checkpoints, config.json, manifests, index files,
caches) goes through ``atomic_path``: the data is written to a temporary file in the same folder, flushed to
disk, and renamed over the target, so a reader or a process killed at any instant sees the old file or the new
one, never a torn one. Disks and people still damage files afterwards, so every JSON file of ours is read back
through ``read_json`` / ``read_json_lines``, whose errors name the file instead of quoting a decoder.

Files named by users (images, lists, shards, manifests) are read through ``open_regular`` / ``read_limited``:
only regular files, and never past a stated number of bytes. A path can name ``/dev/zero`` (endless), a FIFO
(``open`` blocks until a writer comes, maybe never) or a socket; a size read from a header is a claim. Neither
may decide how much is read or allocated.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from mae.errors import UserError

CHUNK = 1 << 20
MAX_JSON_BYTES = 64 * 2**20
"""The most bytes ``read_json`` reads: our JSON files (configs, manifests, shard indexes) are far smaller."""
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


class DamagedFileError(UserError, ValueError):
    """A file of ours that exists but does not hold what we write there (not UTF-8, not JSON, cut short)."""


class NotRegularFileError(UserError, OSError):
    """A path that names a device, FIFO, socket or folder where a file's bytes were expected."""


class FileTooLargeError(UserError, OSError):
    """A file (or a member of one) over the bytes its reader allows."""


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | Path, max_bytes: int | None = None, buffering: int = -1) -> io.BufferedReader:
    """``open(path, "rb", buffering)`` for regular files only; ``max_bytes``: refuse a larger file before reading it.

    The file is opened without blocking (``O_NONBLOCK``: opening a FIFO would otherwise wait for a writer, maybe for
    ever; on a regular file the flag changes nothing) and its kind checked on the open descriptor, so a path
    swapped meanwhile cannot slip through. Raises ``NotRegularFileError`` naming the kind, ``FileTooLargeError``,
    or the ``OSError`` of a missing or unreadable file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket (or a device with no driver) cannot be opened at all
            raise NotRegularFileError(f"{path}: {_kind(os.stat(path).st_mode)}, not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(f"{path}: {_kind(info.st_mode)}, not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise FileTooLargeError(f"{path}: {info.st_size:,} bytes is over the limit of {max_bytes:,}")
        return open(fd, "rb", buffering=buffering)  # noqa: SIM115 - the caller closes it
    except BaseException:
        os.close(fd)
        raise


def read_limited(stream: IO[bytes], limit: int, name: str = "the file", size_hint: int = 0) -> bytes:
    """Everything ``stream`` holds, if that is at most ``limit`` bytes; ``FileTooLargeError`` as soon as it is not.

    Memory grows with the bytes actually there, never with a claim: reads are at most 1 MiB unless
    ``size_hint`` (the size the caller has checked, e.g. from ``fstat``) says more are there.
    """
    chunks: list[bytes] = []
    total = 0
    first = min(size_hint, limit) if size_hint > 0 else CHUNK
    while True:
        chunk = stream.read(min(first if not chunks else CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise FileTooLargeError(f"{name}: more than {limit:,} bytes, the limit")


def read_regular(path: str | Path, limit: int) -> bytes:
    """A regular file's bytes, at most ``limit`` of them (``open_regular`` + ``read_limited``)."""
    with open_regular(path, limit) as f:
        return read_limited(f, limit, str(path), os.fstat(f.fileno()).st_size)


def sha256_file(path: str | Path, h: Any = None) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks; pass ``h`` to fold the bytes into a running hash."""
    h = h if h is not None else hashlib.sha256()
    with open_regular(path) as f:
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
    ``FileNotFoundError`` as usual: whether that is an error is the caller's business. A file over
    ``MAX_JSON_BYTES``, or one that is not a regular file, is refused before it is read.
    """
    path = Path(path)
    try:
        data = read_regular(path, MAX_JSON_BYTES)
    except (NotRegularFileError, FileTooLargeError) as e:
        raise DamagedFileError(f"{e} (expected the {what})") from None
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
