"""Sources that lie or never end (issue 21): counts and sizes read from files are claims, sources are regular files.

Each case runs the real command (or reader) in a subprocess under a memory limit (``RLIMIT_AS``), so that a
reader that sizes anything from a claim dies of it instead of filling the machine: a shard index claiming 10^12
samples, a tar member claiming 2^40 bytes, a gzip bomb (1 MB on disk, 1 GiB inflated), a list naming ``/dev/zero``,
``/dev/urandom``, a FIFO and a socket. Each must end in one line (or a skipped image named in one line), never a
traceback, and the good samples beside the bad ones are still read.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import resource
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, tiny_sets

GiB = 2**30
# Address space for a command that imports torch (about 2.5 GB of mappings before any data) and reads a few images.
COMMAND_AS = 6 * GiB
# Address space for the readers alone (numpy + PIL): a 1 GiB allocation cannot fit.
READER_AS = 768 * 2**20


def png(seed: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def member(name: str, data: bytes | None = None, size: int | None = None) -> bytes:
    """A ustar header (claiming ``size`` bytes, or ``len(data)``) and, when given, the padded data."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    head = info.tobuf(format=tarfile.GNU_FORMAT)  # GNU: base-256 sizes past 8 GiB
    return head + (data + b"\0" * (-len(data) % 512) if data is not None else b"")


def packed_folder(root: Path, claim: int | None = None) -> Path:
    """A folder as `mae data pack` writes it (two small shards of 4 labelled PNGs each); ``claim``: the count its
    index.json gives the first train shard."""
    root.mkdir(parents=True)
    splits = {}
    for split in ("train", "val"):
        name = f"{split}-000000.tar"
        body = b"".join(member(f"{split}{i:06d}.png", png(i)) + member(f"{split}{i:06d}.cls", str(i % 2).encode())
                        for i in range(4))
        (root / name).write_bytes(body + b"\0" * 1024)
        splits[split] = [{"name": name, "count": 4, "bytes": len(body) + 1024, "classes": {}}]
    if claim is not None:
        splits["train"][0]["count"] = claim
    (root / "index.json").write_text(json.dumps({"kind": "mae-webdataset-shards", "format": 1, "source": "test",
                                                 "classes": ["a", "b"], "splits": splits}))
    return root


def gzip_bomb(path: Path, inflated: int = GiB) -> Path:
    """A .tar.gz shard: one good sample, then a member of ``inflated`` zero bytes (gzip members concatenate, so
    1024 copies of one compressed MiB make the GiB: about 1 MB on disk, written in milliseconds)."""
    one_mib = gzip.compress(bytes(2**20), compresslevel=9, mtime=0)
    head = gzip.compress(member("000000000.png", png(0)) + member("000000001.png", size=inflated), mtime=0)
    path.write_bytes(head + one_mib * (inflated // 2**20) + gzip.compress(bytes(1024), mtime=0))
    return path


def limited(address_space: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return apply


def run_limited(*commands: list[str], address_space: int, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """``python ARGS`` for each command, side by side (each mostly waits for its imports), from the repository
    root under an address-space limit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, preexec_fn=limited(address_space))
             for args in commands]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    for w in words:
        assert w in line, line
    return line


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from tests.serving_support import tiny_artifact

    return tiny_artifact(tmp_path_factory.mktemp("artifact") / "a")


def test_a_shard_count_the_shard_cannot_hold_is_one_line_under_a_memory_limit(tmp_path, artifact):
    """index.json claims 10^12 samples in a 5 KB shard: `mae index build` and `mae pretrain` refuse it before
    anything is sized from it (main: 23.6 GB resident; under a limit MemoryError, 'Unable to allocate 7.28 TiB')."""
    lying = packed_folder(tmp_path / "lying", claim=10**12)
    index = ["-m", "cli", "index", "build", "--artifact", str(artifact), "--images", str(lying), "--out",
             str(tmp_path / "index"), "--workers", "0"]
    pretrain = ["-m", "cli", "pretrain", "--data", str(lying), "--out", str(tmp_path / "run"), "--steps", "2",
                *tiny_sets()]
    for done in run_limited(index, pretrain, address_space=COMMAND_AS):
        one_line_error(done, "claims 1,000,000,000,000 samples in train-000000.tar", "hold at most")
    assert not (tmp_path / "index").exists()

    from mae.shards import ShardError, open_shards

    assert open_shards(packed_folder(tmp_path / "honest")).train.total == 4  # the same folder, honest, opens
    for bad, words in [(-1, "not a number of samples"), ("4", "not a number of samples"), (True, "not a number")]:
        index = json.loads((tmp_path / "honest" / "index.json").read_text())
        index["splits"]["train"][0]["count"] = bad
        (tmp_path / "honest" / "index.json").write_text(json.dumps(index))
        with pytest.raises(ShardError, match=words):
            open_shards(tmp_path / "honest")
    index["splits"]["train"][0].update(count=4, name="/dev/zero")
    (tmp_path / "honest" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match="not the file name of a shard"):
        open_shards(tmp_path / "honest")


def test_tar_member_sizes_are_claims(tmp_path):
    """A member claiming 2^40 bytes (GNU base-256) in a 3 KB tar, and a gzip bomb member: refused at the header, the
    samples before it read, under a limit where reading either claim would fail (main: 1.09 GB to read the bomb)."""
    plain = tmp_path / "claims.tar"
    plain.write_bytes(member("000000000.png", png(0)) + member("000000001.png", size=2**40) + bytes(2048))
    bomb = gzip_bomb(tmp_path / "bomb.tar.gz")
    assert bomb.stat().st_size < 1.2 * 2**20
    script = f"""
from mae.shards import count_samples, iter_samples
for url in {[str(plain), str(bomb)]!r}:
    seen = []
    try:
        for j, sample in iter_samples(url):
            seen.append((j, sample.key, len(sample.data)))
    except Exception as e:
        print(url, seen, type(e).__name__, e)
    try:
        count_samples(url)
    except Exception as e:
        print("count", type(e).__name__, e)
"""
    [done] = run_limited(["-c", script], address_space=READER_AS, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 4, done.stdout
    assert "[(0, '000000000', " in lines[0] and "MemberClaimError" in lines[0], lines[0]
    assert "claims 1,099,511,627,776 bytes; only" in lines[0]
    assert "[(0, '000000000', " in lines[2] and "MemberClaimError" in lines[2], lines[2]
    assert "claims 1,073,741,824 bytes, over the limit" in lines[2]
    assert all(line.startswith("count ShardError") for line in lines[1::2]), lines


def test_a_bomb_shard_is_refused_by_the_commands_in_one_line(tmp_path, artifact):
    bomb = gzip_bomb(tmp_path / "bomb.tar.gz")
    [done] = run_limited(["-m", "cli", "embed", "--artifact", str(artifact), str(bomb), "--out",
                          str(tmp_path / "v.npy"), "--workers", "0"], address_space=COMMAND_AS)
    one_line_error(done, "bomb.tar.gz", "over the limit")


def test_members_over_the_limit_and_long_labels_make_bad_samples(tmp_path, monkeypatch):
    """In a plain tar the oversized member is passed over (a seek), its sample is a bad one, the next is read."""
    import mae.shards as shards

    monkeypatch.setattr(shards, "MAX_IMAGE_BYTES", 1000)
    path = tmp_path / "s.tar"
    path.write_bytes(member("a.png", png(0)) + member("a.cls", b"1") + member("b.png", png(1, size=64)) +
                     member("c.png", png(2)) + member("c.cls", b"1" * 100) + bytes(1024))
    samples = {s.key: s for _, s in shards.iter_samples(str(path))}
    assert samples["a"].label == 1 and samples["a"].image().data == png(0)
    assert samples["b"].data is None and "over the limit of 1,000" in samples["b"].problem
    with pytest.raises(shards.ImageTooLargeError, match="b: member .png is"):
        samples["b"].image()
    assert samples["c"].label == -1 and samples["c"].data == png(2)  # a 100-byte .cls is no class number


def test_sources_that_are_not_regular_files_are_skipped_and_named(tmp_path, artifact):
    """A list naming /dev/zero, /dev/urandom, a FIFO and a socket beside two images: `mae index build` and `mae
    embed` index/embed the two and name each of the four in one line (main: read /dev/zero until MemoryError at
    2.6 GB; the FIFO hung forever)."""
    good = []
    for i in range(2):
        good.append(tmp_path / f"g{i}.png")
        good[-1].write_bytes(png(i))
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.png"))
    listing = tmp_path / "list.txt"
    bad = ["/dev/zero", "/dev/urandom", str(fifo), str(tmp_path / "sock.png")]
    listing.write_text("\n".join([*map(str, good), *bad]) + "\n")
    index = ["-m", "cli", "index", "build", "--artifact", str(artifact), "--images", str(listing), "--out",
             str(tmp_path / "idx"), "--workers", "0", "--json"]
    embed = ["-m", "cli", "embed", "--artifact", str(artifact), str(listing), "--out", str(tmp_path / "v.npy"),
             "--workers", "0", "--json"]
    try:
        done = run_limited(index, embed, address_space=COMMAND_AS, timeout=180)
    finally:
        sock.close()
    for proc in done:
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        skipped = [s if isinstance(s, str) else s["error"] for s in json.loads(proc.stdout)["skipped"]]
        assert len(skipped) == 4, skipped
        for path, kind in zip(bad, ["a character device", "a character device", "a FIFO", "a socket"]):
            assert any(s.startswith(f"{path}: {kind}") for s in skipped), (path, skipped)
    assert json.loads(done[0].stdout)["count"] == 2 and np.load(tmp_path / "v.npy").shape[0] == 2

    from cli.main import main  # and mae index add of the same list: the two are there, the four skipped by name

    listing.write_text("\n".join([*map(str, good), "/dev/zero", str(fifo)]) + "\n")
    assert main(["index", "add", "--index", str(tmp_path / "idx"), str(listing), "--workers", "0"]) == 0


def test_packing_skips_sources_that_are_not_regular_files(tmp_path):
    """`mae data pack` of a list naming /dev/zero and a FIFO: both skipped and named in index.json, the image packed
    (main: read /dev/zero until MemoryError; a FIFO hangs)."""
    (tmp_path / "g.png").write_bytes(png(0))
    os.mkfifo(tmp_path / "fifo.png")
    script = f"""
import json, numpy as np
from pathlib import Path
from mae.packing import pack
from mae.sources import Source
items = [Path("{tmp_path}/g.png"), Path("/dev/zero"), Path("{tmp_path}/fifo.png")]
source = Source("list", items, np.full(3, -1), [], [str(p) for p in items])
index = pack(source, "{tmp_path}/packed", {{"train": np.arange(3)}}, shard_size=10**6, progress=False)
print(json.dumps([index["splits"]["train"][0]["count"], index["skipped"]]))
"""
    [done] = run_limited(["-c", script], address_space=READER_AS, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    count, skipped = json.loads(done.stdout)
    assert count == 1 and skipped == ["/dev/zero: a character device, not a regular file",
                                      f"{tmp_path}/fifo.png: a FIFO (named pipe), not a regular file"]


def test_json_files_are_read_only_when_regular_and_bounded(tmp_path, monkeypatch):
    import mae.files as files

    os.symlink("/dev/zero", tmp_path / "config.json")
    with pytest.raises(files.DamagedFileError, match="a character device, not a regular file"):
        files.read_json(tmp_path / "config.json", "artifact config")
    os.mkfifo(tmp_path / "manifest.json")
    with pytest.raises(files.DamagedFileError, match="a FIFO"):  # at once: opening a FIFO would wait for a writer
        files.read_json(tmp_path / "manifest.json", "index manifest")
    from retrieval.index import Index, IndexDamagedError

    (tmp_path / "index").mkdir()
    os.mkfifo(tmp_path / "index" / "manifest.json")  # an index whose manifest is a FIFO is damaged, not a hang
    with pytest.raises(IndexDamagedError, match="a FIFO"):
        Index.load(tmp_path / "index")
    monkeypatch.setattr(files, "MAX_JSON_BYTES", 10)
    (tmp_path / "big.json").write_text(json.dumps({"x": "y" * 20}))
    with pytest.raises(files.DamagedFileError, match="over the limit of 10"):
        files.read_json(tmp_path / "big.json")
