"""WebDataset shards: every stage streams them (``mae.packing`` writes them for ``mae data pack``).

A shard is a plain tar of samples; the members of a sample share a key (``000000042.jpg``, ``000000042.cls``,
``000000042.json``), as WebDataset writes and reads them, so shards from elsewhere work too. ``mae data pack``
keeps the encoded bytes as they are (no re-encoding), writes the seeded stratified train/val split of its source
as ``train-NNNNNN.tar`` and ``val-NNNNNN.tar``, and an ``index.json`` with the count of samples per shard (and
per class), the class names and the split it used. ``--data`` takes the packed folder, a brace pattern
(``'DIR/train-{000000..000127}.tar'``) or any URL / ``pipe:`` command that ``webdataset.gopen`` opens.

Training streams are exact and resumable. In data epoch e, shard order is a permutation seeded by (seed, e);
shard i goes to worker slot ``i % (world x workers)`` (every slot reads every shard and keeps every
slots-th sample when there are fewer shards than slots). A slot's samples are shuffled by a buffer of
``data.shuffle_buffer`` samples whose draws come from (seed, e, slot) alone, so the order of emission is a
permutation computed before any byte is read. Each worker streams forever (data epoch after data epoch), and
the DataLoader takes batch b from worker ``b % workers``: the number of micro-batches a run has consumed fixes
how many samples each worker has emitted, and a resumed worker starts at exactly that sample. It skips whole
shards whose samples were all emitted and reads, without decoding, the few it must pass over. The guarantee
is **exact**: N steps straight and N/2 + kill + ``--resume`` see the same samples with the same crops, given the
same world size and ``data.num_workers`` (the slot layout depends on both).

Every number a shard folder states is a claim, checked before anything is sized from it: ``index.json``'s count
of a shard against the shard's bytes (a tar holds at most one sample per 512-byte block: a folder claiming 10^12
samples once drove ``mae index build`` to 23.6 GB), a member's size against the bytes left in the file and
against ``mae.images.MAX_IMAGE_BYTES``. A member over that limit makes its sample a bad one; in a compressed shard,
where passing over it means inflating it, the shard is read no further (a gzip bomb is refused at its header).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from mae.errors import NotFoundError, UserError
from mae.files import CHUNK, MAX_JSON_BYTES, open_regular, read_limited
from mae.images import MAX_IMAGE_BYTES, EncodedImage, ImageError, ImageTooLargeError

log = logging.getLogger(__name__)

INDEX = "index.json"
INDEX_KIND = "mae-webdataset-shards"
INDEX_FORMAT = 1
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "gif", "tif", "tiff", "npy")
BLOCK = 512
"""A tar's block: every member takes a header block, so a shard of B bytes holds at most B // 512 samples."""
MAX_LABEL_BYTES = 64
"""A ``.cls`` member longer than this is not a class number: the sample is read as unlabelled."""
MAX_TAR_META_BYTES = 2**20
"""GNU long names and pax records: far more than any path needs."""


class ShardError(UserError, ValueError):
    """Shards that cannot serve as given: an index of a newer format, an unreadable tar, too few samples for the
    readers that would stream them."""


class MemberClaimError(tarfile.ReadError):
    """A tar member whose header claims more bytes than can be read: the shard is read no further."""

    def __init__(self, member: str, message: str) -> None:
        super().__init__(message)
        self.member = member


# ----------------------------------------------------------------------------------------------- shard sets


@dataclass(frozen=True)
class Shard:
    url: str
    count: int
    """Samples in the shard (from the index, or counted by reading the shard's headers once)."""


@dataclass
class ShardSet:
    """An ordered list of shards: one split of a packed folder, or the shards a pattern names."""

    name: str
    shards: list[Shard]

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def offsets(self) -> np.ndarray:
        """Global index of each shard's first sample, in shard order: (len(shards),)."""
        counts = np.asarray([s.count for s in self.shards], np.int64)
        return np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts


@dataclass
class ShardSource:
    """Shards as a data source: the training split, the validation split when known, and the class names."""

    name: str
    train: ShardSet
    val: ShardSet | None
    classes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def is_shard_spec(spec: str | Path) -> bool:
    """Whether ``--data`` names WebDataset shards: a .tar path or URL, a brace pattern, a ``pipe:`` command, or a
    folder written by ``mae data pack`` (it holds index.json)."""
    s = str(spec)
    if s.startswith("pipe:") or re.search(r"\{[^{}]*\.\.[^{}]*\}", s):
        return True
    if re.search(r"\.(tar|tar\.gz|tgz)$", s):
        return True
    return Path(s).is_dir() and _read_index(Path(s) / INDEX) is not None


def expand(spec: str) -> list[str]:
    """Brace patterns (``{000000..000127}``) expanded; several patterns may be joined with ``::`` (WebDataset's)."""
    from braceexpand import braceexpand

    return [url for part in spec.split("::") for url in braceexpand(part)]


def open_shards(spec: str | Path) -> ShardSource:
    """The shard source ``spec`` names. A packed folder gives both splits; a pattern gives its shards for training
    and, when they are the train shards of a packed folder, that folder's val shards for validation."""
    s = str(spec)
    folder = Path(s)
    if folder.is_dir():
        index = _read_index(folder / INDEX)
        if index is None:
            raise NotFoundError(f"{folder} holds no {INDEX} of packed shards (write them with mae data pack)")
        return ShardSource(str(folder), _split(folder, index, "train"), _split(folder, index, "val") or None,
                           list(index.get("classes") or []))
    urls = expand(s)
    local = [u for u in urls if not _is_remote(u)]
    missing = [u for u in local if not Path(u).exists()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise NotFoundError(f"no such shard: {missing[0]}{more}")
    index = _read_index(Path(urls[0]).parent / INDEX) if not _is_remote(urls[0]) else None
    known: dict[str, int] = {}
    val = None
    classes: list[str] = []
    if index is not None:
        parent = Path(urls[0]).parent
        named = {split: _split(parent, index, split) for split in ("train", "val")}
        known = {str(Path(shard.url)): shard.count for split in named.values() for shard in split.shards}
        classes = list(index.get("classes") or [])
        if set(urls) <= {str(Path(shard.url)) for shard in named["train"].shards}:
            val = named["val"] if named["val"].shards else None
    shards = []
    for url in urls:
        count = known.get(str(Path(url))) if not _is_remote(url) else None
        if count is None:
            count = count_samples(url)
        shards.append(Shard(url, count))
    return ShardSource(s, ShardSet(s, shards), val, classes)


def _split(folder: Path, index: dict[str, Any], split: str) -> ShardSet:
    """One split of a packed folder, each shard's count checked against the shard itself (``checked_count``)."""
    entries = index["splits"].get(split) or []
    where = folder / INDEX
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ShardError(f"{where}: splits.{split} is not a list of shards; repack the folder (mae data pack)")
    shards = []
    for e in entries:
        name = e.get("name")
        if not isinstance(name, str) or not name or name != Path(name).name or name.startswith("."):
            raise ShardError(f"{where}: {name!r} is not the file name of a shard in this folder")
        shards.append(Shard(str(folder / name), checked_count(folder / name, e.get("count"), where)))
    return ShardSet(f"{folder}:{split}", shards)


def checked_count(shard: Path, claimed: Any, index: Path) -> int:
    """The sample count ``index`` claims for ``shard``, if the shard can hold that many; ShardError otherwise.

    Counts size arrays and loops (every sample of a shard is accounted for, read or missing), so a count the
    shard's bytes cannot hold is refused here, before anything is sized from it.
    """
    if isinstance(claimed, bool) or not isinstance(claimed, int) or claimed < 0:
        raise ShardError(f"{index}: the count of {shard.name} is {str(claimed)[:40]!r}, not a number of samples")
    try:
        size = os.stat(shard).st_size
    except OSError as e:
        raise ShardError(f"{index} names {shard.name}, which cannot be read ({e.strerror or e}); repack the folder "
                         "(mae data pack) or give the shards that are there as a pattern") from None
    if claimed > size // BLOCK:
        raise ShardError(f"{index} claims {claimed:,} samples in {shard.name}, whose {size:,} bytes hold at most "
                         f"{size // BLOCK:,} (a sample takes a {BLOCK}-byte block at least): the index does not "
                         "describe these shards; repack the folder (mae data pack), or remove its index.json and "
                         "give the shards as a pattern (their samples are then counted)")
    return claimed


def _read_index(path: Path) -> dict[str, Any] | None:
    try:
        with open_regular(path, MAX_JSON_BYTES) as f:
            index = json.loads(read_limited(f, MAX_JSON_BYTES, str(path)))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(index, dict) or index.get("kind") != INDEX_KIND:
        return None
    if not isinstance(index.get("format", 0), int) or index.get("format", 0) > INDEX_FORMAT:
        raise ShardError(f"{path} has shard index format {index['format']!r}; this version reads up to "
                         f"{INDEX_FORMAT}")
    if not isinstance(index.get("splits"), dict) or not isinstance(index.get("classes") or [], list):
        raise ShardError(f"{path} is damaged: it has no splits, or classes that are not a list; repack the folder "
                         "(mae data pack)")
    return index


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class Sample:
    """One sample of a shard: its key, the image member's bytes and extension, and its label (-1 if none)."""

    key: str
    data: bytes | None
    ext: str
    label: int
    name: str
    """``SHARD#KEY``: what errors, catalogues and embeddings call it."""
    problem: str | None = None
    """Why the image member was not read (over the byte limit): the sample is a bad one."""

    @property
    def seed_key(self) -> str:
        """The name augmentations are seeded from: shard file name and key (moving the shards keeps it)."""
        return f"{self.name.rpartition('#')[0].rsplit('/', 1)[-1]}#{self.key}"

    def image(self) -> EncodedImage:
        if self.problem is not None:
            raise ImageTooLargeError(f"{self.name}: {self.problem}")
        if self.data is None:
            raise ImageError(f"{self.name}: the sample has no image member ({', '.join(IMAGE_MEMBERS)})")
        return EncodedImage(self.data, f"{self.name}.{self.ext}")


def open_stream(url: str) -> IO[bytes]:
    """A readable byte stream of a shard: a local regular file (``mae.files.open_regular``: never a device or a
    FIFO), or anything ``webdataset.gopen`` opens (http, pipe:, ...)."""
    if not _is_remote(url):
        return open_regular(url, buffering=CHUNK)
    from webdataset import gopen  # imports torch: only for remote shards, inside workers that hold it anyway

    return gopen(url, "rb")


def iter_samples(url: str, wanted: Any = None) -> Iterator[tuple[int, Sample]]:
    """(index in the shard, sample) for every sample of a shard, in order; members are grouped by key.

    ``wanted(index) -> bool``: samples it refuses are passed over without their bytes being read (seeked past
    in a local file). Only image and ``.cls`` members are read, at most ``MAX_IMAGE_BYTES`` a sample. A sample
    with no image member is yielded with ``data=None``, one whose image is over the limit with ``problem`` set
    (bad samples, counted where they are consumed).
    """
    with open_stream(url) as stream:
        index, key, members, kept, problem = -1, None, {}, 0, None
        keep = True
        try:
            for name, size, read in tar_members(stream):
                base, ext = _split_key(name)
                if base != key:
                    if key is not None:
                        yield index, _sample(url, key, members, problem)
                    index, key, members, kept, problem = index + 1, base, {}, 0, None
                    keep = wanted is None or wanted(index)
                if not keep or not (ext in IMAGE_MEMBERS or (ext == "cls" and size <= MAX_LABEL_BYTES)):
                    read(False)
                elif kept + size > MAX_IMAGE_BYTES:
                    problem = f"member .{ext} is {size:,} bytes, over the limit of {MAX_IMAGE_BYTES:,} a sample"
                    read(False)
                else:
                    members[ext] = read(True)
                    kept += size
        except MemberClaimError as e:  # refused at a header: the samples before it are whole
            if key is not None and _split_key(e.member)[0] != key:
                yield index, _sample(url, key, members, problem)
            raise
        if key is not None:
            yield index, _sample(url, key, members, problem)


def tar_members(stream: IO[bytes]) -> Iterator[tuple[str, int, Any]]:
    """(name, size, read) of each regular file of a tar stream; ``read(True)`` returns its bytes, ``read(False)``
    passes over them (a seek when the stream allows). Plain, ustar, GNU long names and pax ``path`` records are
    understood; gzip-compressed local shards are decompressed on the fly.

    A member's size is a claim: in a local file it must fit in the bytes that are left, and reading it allocates
    only as its bytes arrive. A compressed member over ``MAX_IMAGE_BYTES`` stops the shard at its header, since
    passing over it would mean inflating all of it (a gzip bomb).

    Python's ``tarfile`` parses each header through several layers of objects: 50-75 us a member here, as much
    as decoding a small image. This reads the 512-byte headers directly.
    """
    head = stream.peek(2)[:2] if hasattr(stream, "peek") else b""
    compressed = head == b"\x1f\x8b"
    end = _size_of(stream) if not compressed else None  # bytes in the file: what a member's size must fit in
    if compressed:
        import gzip

        stream = gzip.GzipFile(fileobj=stream)
    seekable = getattr(stream, "seekable", lambda: False)()
    long_name: str | None = None
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            if header.strip(b"\0"):
                raise tarfile.ReadError("truncated tar header")
            return
        if not header.strip(b"\0"):
            return  # the end-of-archive blocks
        size = _octal(header[124:136])
        kind = header[156:157]
        padded = (size + BLOCK - 1) & ~(BLOCK - 1)
        name = long_name or _ustar_name(header)
        if end is not None and size > end - stream.tell():
            raise MemberClaimError(name, f"member {name!r} claims {size:,} bytes; only "
                                         f"{max(0, end - stream.tell()):,} are left in the file")
        if compressed and size > MAX_IMAGE_BYTES:
            raise MemberClaimError(name, f"member {name!r} claims {size:,} bytes, over the limit of "
                                         f"{MAX_IMAGE_BYTES:,}: a compressed shard is not inflated past it")
        if kind in (b"L", b"x", b"g"):  # GNU long name, pax extended header, pax global header
            if size > MAX_TAR_META_BYTES:
                raise tarfile.ReadError(f"a tar name record of {size:,} bytes (at most {MAX_TAR_META_BYTES:,})")
            meta = _read_exactly(stream, padded)[:size]
            if kind == b"L":
                long_name = meta.rstrip(b"\0").decode("utf-8", "replace")
            elif kind == b"x":
                long_name = _pax_path(meta) or long_name
            continue
        long_name = None
        if kind not in (b"0", b"\0", b"7"):  # not a regular file: skip its data
            _skip(stream, padded, seekable)
            continue
        done = False

        def read(keep: bool, size: int = size, padded: int = padded) -> bytes | None:
            nonlocal done
            done = True
            if keep:
                return _read_exactly(stream, padded)[:size]
            _skip(stream, padded, seekable)
            return None

        yield name, size, read
        if not done:
            _skip(stream, padded, seekable)


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.strip(b"\0 ")
    if not digits:
        return 0
    try:
        return int(digits, 8)
    except ValueError as e:
        raise tarfile.ReadError(f"bad size field {field!r}") from e


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _pax_path(meta: bytes) -> str | None:
    for record in meta.split(b"\n"):
        _, _, kv = record.partition(b" ")
        key, _, value = kv.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
    return None


def _size_of(stream: IO[bytes]) -> int | None:
    """The byte size of a stream over a regular file (a member's size must fit in it); None for a pipe."""
    try:
        return os.fstat(stream.fileno()).st_size if stream.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    """``n`` bytes; memory grows with the bytes that arrive (1 MiB reads), not with ``n``."""
    data = read_limited(stream, n, "a tar member") if n > CHUNK else stream.read(n)
    if len(data) < n:
        raise EOFError(f"the tar ends inside a member ({len(data)} of {n} bytes)")
    return data


def _skip(stream: IO[bytes], n: int, seekable: bool) -> None:
    if seekable:
        stream.seek(n, 1)
        return
    while n > 0:
        block = stream.read(min(n, CHUNK))
        if not block:
            raise EOFError(f"the tar ends inside a member ({n} bytes short)")
        n -= len(block)


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name; the rest, lowered,
    is the member's extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _sample(url: str, key: str, members: dict[str, bytes], problem: str | None = None) -> Sample:
    name = f"{url}#{key}"
    ext = next((e for e in IMAGE_MEMBERS if e in members), "")
    label = -1
    if "cls" in members:
        try:
            label = int(members["cls"].decode().strip())
        except ValueError:
            label = -1
    return Sample(key, members.get(ext) if ext else None, ext, label, name, problem if not ext else None)


def count_samples(url: str) -> int:
    """Samples in a shard, from its member headers (a local tar is seeked through, not read)."""
    try:
        return sum(1 for _ in iter_samples(url, wanted=lambda _: False))
    except (OSError, EOFError, tarfile.TarError) as e:
        raise ShardError(f"{url}: not a readable tar shard ({e})") from e


# ----------------------------------------------------------------------------------------------- the order


def buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The emission order of a ``size``-sample shuffle buffer fed inputs 0..n-1: (n,) permutation.

    The buffer fills, then each new input replaces a uniformly drawn resident, which is emitted; at the end the
    residents leave in a random order. The draws do not depend on the data, so the whole order is known before
    reading, and any position in it can be resumed.
    """
    resident = list(range(min(size, n)))
    out = np.empty(n, np.int64)
    draws = rng.integers(0, max(len(resident), 1), size=max(0, n - len(resident)))
    for t, incoming in enumerate(range(len(resident), n)):
        j = draws[t]
        out[t] = resident[j]
        resident[j] = incoming
    tail = n - len(resident)
    out[tail:] = np.asarray(resident, np.int64)[rng.permutation(len(resident))]
    return out


@dataclass
class _Epoch:
    """What one worker slot reads in one data epoch: (shard, which of its samples) in order, and the order of
    emission."""

    reads: list[tuple[int, np.ndarray]]
    """(shard index, sample indices within it) in reading order."""
    order: np.ndarray
    """(n,) input position emitted at each time."""

    @property
    def size(self) -> int:
        return len(self.order)


def plan_epoch(shards: ShardSet, epoch: int, slot: int, slots: int, seed: int, buffer: int) -> _Epoch:
    counts = [s.count for s in shards.shards]
    perm = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(counts))
    reads: list[tuple[int, np.ndarray]] = []
    if len(counts) >= slots:
        for i in perm[slot::slots]:
            reads.append((int(i), np.arange(counts[i])))
    else:  # fewer shards than slots: every slot reads every shard and keeps every slots-th sample
        g = 0
        for i in perm:
            idx = np.arange(counts[i])
            reads.append((int(i), idx[(g + idx) % slots == slot]))
            g += counts[i]
    n = sum(len(r[1]) for r in reads)
    order = buffer_order(n, buffer, np.random.default_rng([seed, epoch, slot, slots, 0x5348]))
    return _Epoch(reads, order)


def worker_batches(batches: int, worker: int, workers: int) -> int:
    """Batches worker ``worker`` has produced once a DataLoader has yielded ``batches`` (round robin)."""
    return max(0, -(-(batches - worker) // workers))


def check_slots(shards: ShardSet, slots: int) -> None:
    """Refuse a layout where some worker slot could get no sample in a data epoch (its stream would never yield).

    Uneven shards are fine (a pack's last shard is smaller): a slot that finishes its shards starts its next
    data epoch, with other shards, so every stream keeps flowing."""
    counts = [s.count for s in shards.shards]
    if not counts or sum(counts) == 0:
        raise ShardError(f"{shards.name}: the shards hold no sample")
    if (len(counts) >= slots and min(counts) == 0) or (len(counts) < slots and sum(counts) < slots):
        raise ShardError(f"{shards.name}: {len(counts)} shard(s) of {sum(counts)} samples cannot give each of "
                         f"{slots} readers (processes x data.num_workers) a sample; use fewer data.num_workers")


def stream_slot(shards: ShardSet, slot: int, slots: int, seed: int, buffer: int, start: int = 0
                ) -> Iterator[tuple[int, Sample | None, str | None]]:
    """The endless sample stream of one worker slot: (data epoch, sample or None, error or None), starting after
    the first ``start`` samples it would have emitted (see the module docstring)."""
    epoch = 0
    while True:
        plan = plan_epoch(shards, epoch, slot, slots, seed, buffer)
        if plan.size == 0:
            raise ShardError(f"{shards.name}: reader {slot} of {slots} has no sample; use fewer data.num_workers")
        if start >= plan.size:
            start -= plan.size
            epoch += 1
            continue
        for sample, error in _emit(shards, plan, start):
            yield epoch, sample, error
        start = 0
        epoch += 1


def _emit(shards: ShardSet, plan: _Epoch, start: int) -> Iterator[tuple[Sample | None, str | None]]:
    """Samples in emission order from ``start`` on, holding only those read and not yet emitted."""
    emit_time = np.empty(plan.size, np.int64)
    emit_time[plan.order] = np.arange(plan.size)
    bounds = np.cumsum([0] + [len(idx) for _, idx in plan.reads])
    held: dict[int, tuple[Sample | None, str | None]] = {}

    def inputs() -> Iterator[tuple[int, Sample | None, str | None]]:
        for (shard_i, idx), a, b in zip(plan.reads, bounds[:-1], bounds[1:]):
            if b == a or emit_time[a:b].max() < start:
                continue  # every sample of this shard was emitted before the resume point
            url = shards.shards[shard_i].url
            position = {int(j): a + k for k, j in enumerate(idx)}
            needed = {j for j, p in position.items() if emit_time[p] >= start}
            seen: set[int] = set()
            try:
                for j, sample in iter_samples(url, wanted=needed.__contains__):
                    if j in position:
                        seen.add(j)
                        if j in needed:
                            yield position[j], sample, None
            except (OSError, tarfile.TarError, EOFError) as e:
                warnings.warn(f"{url}: unreadable from sample {len(seen)} on ({e}); its other samples are skipped",
                              stacklevel=2)
            for j in sorted(needed - seen):  # truncated or damaged shard: these samples are bad
                yield position[j], None, f"{url}: sample {j} is missing (the shard is shorter than its count)"

    reader = inputs()
    for t in range(start, plan.size):
        p = int(plan.order[t])
        while p not in held:
            got = next(reader, None)
            if got is None:
                held[p] = (None, f"{shards.name}: sample {p} is missing")
                break
            held[got[0]] = (got[1], got[2])
        yield held.pop(p)


def slot_samples(shards: ShardSet, slot: int, slots: int) -> Iterator[tuple[int, Sample | None, str | None]]:
    """Evaluation order (no shuffle): (global index, sample or None, error or None) of the samples a slot owns:
    whole shards ``i % slots == slot``, or every slots-th sample when there are fewer shards than slots."""
    offsets = shards.offsets
    shard_level = len(shards.shards) >= slots
    for i, shard in enumerate(shards.shards):
        if shard_level and i % slots != slot:
            continue
        first = int(offsets[i])

        def mine(j: int, first: int = first) -> bool:
            return shard_level or (first + j) % slots == slot

        seen = set()
        try:
            for j, sample in iter_samples(shard.url, wanted=mine):
                if j < shard.count and mine(j):
                    seen.add(j)
                    yield first + j, sample, None
        except (OSError, tarfile.TarError, EOFError) as e:
            warnings.warn(f"{shard.url}: unreadable from sample {len(seen)} on ({e})", stacklevel=2)
        for j in range(shard.count):
            if mine(j) and j not in seen:
                yield first + j, None, f"{shard.url}: sample {j} is missing (the shard is shorter than its count)"
