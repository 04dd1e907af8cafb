"""The FAISS folder's append log: writes that cost what they change, readers that apply only what is new,
compaction by threshold and on demand, and a SIGKILL at every phase of a write and of a compaction (real
processes, killed)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import retrieval  # noqa: F401  (first: sets passive OpenMP waiting before faiss loads its runtime)

pytest.importorskip("faiss")

from retrieval import faiss_log  # noqa: E402
from retrieval.catalog import Item  # noqa: E402
from retrieval.faiss_compact import Thresholds  # noqa: E402
from retrieval.index import Index, IndexDamagedError, build  # noqa: E402
from tests.test_retrieval import assert_consistent, items_for, lowrank  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHA = "a" * 64
NEVER = Thresholds(fraction=1.0, minimum=10**9, bytes=1 << 40)


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_write_appends_and_a_reader_reads_only_what_is_new(tmp_path):
    x = lowrank(300, 1)
    writer = build(tmp_path / "i", x[:200], items_for(200), artifact_sha256=SHA, factory="Flat")
    reader = Index.load(tmp_path / "i")
    base = (tmp_path / "i" / "index.faiss").stat()
    writer.add(x[200:201], items_for(1, "/one/"))
    assert (tmp_path / "i" / "index.faiss").stat().st_mtime_ns == base.st_mtime_ns, "index.faiss is not rewritten"
    segment = writer.manifest["log"][0]
    assert segment[1:] == [0, faiss_log.HEADER.size + 8 + 4 * 64], "one record: a header, an id, a vector"
    reads = []
    real_read = faiss_log.read

    def counting(folder, rs, dim, after=None):
        for record, pos in real_read(folder, rs, dim, after):
            reads.append(len(record.ids))
            yield record, pos

    faiss_log.read, saved = counting, faiss_log.read
    try:
        assert reader.reload() and reader.count == 201
        writer.add(x[201:211], items_for(10, "/ten/"))
        assert reader.reload() and reader.count == 211
    finally:
        faiss_log.read = saved
    assert reads == [1, 10], "each reload read the new record alone"
    assert reader.search(x[205:206], 1)[0][0].path == "/ten/00004.png"
    assert not reader.reload()


def test_tombstones_are_never_returned_before_or_after_compaction(tmp_path):
    x = lowrank(400, 2)
    idx = build(tmp_path / "i", x[:300], [Item(f"/c/{i}.png", f"s{i}", str(i % 2)) for i in range(300)],
                artifact_sha256=SHA, factory="HNSW16,Flat")
    idx.compaction = NEVER
    added = idx.add(x[300:], [Item(f"/d/{i}.png", f"t{i}", str(i % 2)) for i in range(100)]).ids
    dead = [1, 2, 3, added[0], added[1]]
    idx.remove(dead)
    q = np.vstack([x[:3], x[300:302]])  # the removed items' own vectors: each would be its own best match
    for view in (idx, Index.load(tmp_path / "i")):
        for where in (None, ["label=0"], ["label=1"]):
            got = {h.id for row in view.search(q, 20, where=where) for h in row}
            assert not got & set(dead), where
        with pytest.raises(KeyError):
            view.vectors([added[0]])
    assert idx.manifest["tombstones"] == 5 and idx.compaction_due() is None
    assert idx.compact()["compacted"]
    again = assert_consistent(tmp_path / "i")
    assert again.manifest["tombstones"] == 5, "HNSW keeps its tombstones below the rebuild fraction"
    assert not {h.id for row in again.search(q, 20) for h in row} & set(dead)


def test_compaction_thresholds_by_fraction_bytes_and_tombstones(tmp_path):
    x = lowrank(700, 3)
    idx = build(tmp_path / "i", x[:500], items_for(500), artifact_sha256=SHA, factory="Flat")
    idx.compaction = Thresholds(fraction=0.05, minimum=10, bytes=1 << 40)  # 5% of 500: 25 changes
    for i in range(24):
        idx.add(x[500 + i : 501 + i], items_for(1, f"/a{i}/"))
    assert idx.manifest["log_vectors"] == 24 and idx.compaction_due() is None
    idx.add(x[524:525], items_for(1, "/a24/"))  # the 25th change: folded by the write itself
    assert idx.manifest["log"] == [] and idx.manifest["base_ntotal"] == 525
    assert idx.manifest["base_generation"] == idx.generation - 1
    record = faiss_log.HEADER.size + 8 + 4 * 64  # bytes of a one-item record (64-d)
    idx.compaction = Thresholds(fraction=1.0, minimum=10**6, bytes=int(2.5 * record))
    idx.add(x[525:527], items_for(2, "/b/"))  # 2 items: a header and two items, under 2.5 records
    assert idx.compaction_due() is None
    idx.add(x[527:528], items_for(1, "/c/"))
    assert idx.manifest["log"] == [], "the log's bytes passed the threshold"
    idx.compaction = Thresholds(fraction=0.001, minimum=5, bytes=1 << 40)
    idx.remove(range(1, 5))
    assert idx.compaction_due() is None and idx.manifest["log_removed"] == 4
    idx.remove([5])  # removals count as changes too
    assert idx.manifest["log"] == [] and idx.manifest["tombstones"] == 0 and idx.index.ntotal == idx.count == 523
    assert_consistent(tmp_path / "i")
    assert Index.check(tmp_path / "i")["ok"]


def test_a_lagging_reader_loads_the_new_base_and_a_current_one_keeps_its_own(tmp_path):
    x = lowrank(400, 4)
    writer = build(tmp_path / "i", x[:200], items_for(200), artifact_sha256=SHA, factory="IVF8,Flat")
    writer.compaction = NEVER
    current, lagging = Index.load(tmp_path / "i"), Index.load(tmp_path / "i")
    writer.add(x[200:300], items_for(100, "/a/"))
    assert current.reload()
    base = current.index
    writer.compact()
    writer.add(x[300:400], items_for(100, "/b/"))
    assert current.reload() and current.index is base, "applied up to the fold: it keeps its base and log"
    assert lagging.reload() and lagging.index is not base and lagging.store.base_ntotal == 300
    for view in (current, lagging):
        assert view.count == 400
        np.testing.assert_array_equal(view.search_ids(x[::40], 5)[1], writer.search_ids(x[::40], 5)[1])
    current.compaction = Thresholds(fraction=0.01, minimum=10, bytes=1 << 40)
    writer.compact()
    writer.add(x[:1] * 0.5 + x[1:2] * 0.5, [Item("/mid.png", "mid")])
    assert current.reload()  # its delta (200) outgrew two compactions' worth: the new base loads beside it
    current.settle(timeout=60)
    assert current.index is not base and current.store.base_ntotal == 400 and current.count == 401


def test_readers_search_while_another_process_compacts(tmp_path):
    x = lowrank(20_000, 5)
    writer = build(tmp_path / "i", x[:18_000], items_for(18_000), artifact_sha256=SHA, factory="Flat")
    writer.compaction = NEVER
    writer.add(x[18_000:], items_for(2_000, "/new/"))
    reader = Index.load(tmp_path / "i")
    errors, answers, stop = [], [], threading.Event()

    def search() -> None:
        while not stop.is_set():
            try:
                reader.reload()
                hits = reader.search(x[18_000:18_004], 3)
                answers.append((reader.generation, [row[0].id for row in hits]))
            except Exception as e:  # noqa: BLE001 - collected and asserted on below
                errors.append(e)

    thread = threading.Thread(target=search)
    thread.start()
    try:
        compaction = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from retrieval.index import Index; "
                      f"print(Index.load({str(tmp_path / 'i')!r}).compact())")
        done = subprocess.run([sys.executable, "-c", compaction], capture_output=True, text=True, timeout=120,
                              cwd=ROOT)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert done.returncode == 0 and "'compacted': True" in done.stdout, done.stderr
    assert not errors, errors[:3]
    expected = [18_001, 18_002, 18_003, 18_004]
    assert answers and all(ids == expected for _, ids in answers)
    assert {g for g, _ in answers} >= {writer.generation + 1}, "the reader saw the compaction commit"
    reader.settle(timeout=60)  # its log (2,000) passed a compaction's worth: the new base loaded in the background
    assert reader.manifest["log"] == [] and reader.store.base_ntotal == 20_000 and reader.store.logged == 0
    assert [row[0].id for row in reader.search(x[18_000:18_004], 3)] == expected


def test_a_damaged_log_is_refused_checked_and_repaired(tmp_path):
    x = lowrank(60, 6)
    idx = build(tmp_path / "i", x[:40], items_for(40), artifact_sha256=SHA, factory="Flat")
    idx.add(x[40:50], items_for(10, "/a/"))
    idx.add(x[50:60], items_for(10, "/b/"))
    segment = tmp_path / "i" / idx.manifest["log"][0][0]
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the second record's last vector
    segment.write_bytes(bytes(data))
    with pytest.raises(IndexDamagedError, match="checksum"):
        Index.load(tmp_path / "i")
    report = Index.check(tmp_path / "i")
    assert not report["ok"] and any("checksum" in p for p in report["problems"])
    fixed = Index.repair(tmp_path / "i")
    assert fixed["ok"] and fixed["count"] == 50 and len(fixed["dropped"]) == 10
    again = assert_consistent(tmp_path / "i")
    assert again.manifest["log"] == [] and again.search(x[45:46], 1)[0][0].path == "/a/00005.png"


# ----------------------------------------------------------------------------------------------- SIGKILL

CRASH_SCRIPT = textwrap.dedent("""
    import os, re, signal, sys
    sys.path.insert(0, {root!r})
    import faiss
    from retrieval import faiss_log
    from retrieval.faiss_compact import Thresholds
    from retrieval.index import Index
    from tests.test_retrieval import items_for, lowrank

    phase = sys.argv[2]
    real_replace, real_write, real_append = os.replace, faiss.write_index, faiss_log.append
    compacting = False

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def append(*args, **kwargs):
        if phase == "catalogue":
            die()  # rows for the new generation are in the catalogue; nothing in the log
        out = real_append(*args, **kwargs)
        if phase == "log":
            die()  # the record is in the log, past the committed end
        return out

    def replace(src, dst):
        real_replace(src, dst)
        name = os.path.basename(str(dst))
        if phase == "manifest" and name == "manifest.json" and not compacting or \\
                compacting and (phase == "staged" and re.fullmatch(r"index[.][0-9]+[.]faiss", name)
                                or phase == "commit" and name == "manifest.json"
                                or phase == "renamed" and name == "index.faiss"):
            die()

    def write_index(index, path):
        real_write(index, path)
        if compacting and phase == "fold":
            die()  # the folded index is written; nothing is committed

    faiss_log.append, os.replace, faiss.write_index = append, replace, write_index
    idx = Index.load(sys.argv[1])
    if phase == "loop":
        idx.compaction = Thresholds(fraction=0.2, minimum=60, bytes=1 << 40)
        for i in range(10_000):
            idx.add(lowrank(20, 100 + i), items_for(20, f"/loop{{i}}/"))
    elif phase in ("catalogue", "log", "manifest"):
        idx.add(lowrank(50, 99), items_for(50, "/crash/"))
    else:
        idx.add(lowrank(50, 99), items_for(50, "/crash/"))
        idx.remove([3])
        compacting = True
        idx.compact()
    print("finished")
""")

ALLOWED = {".lock", ".compact.lock", "index.faiss", "items.sqlite", "manifest.json"}


def run_crash(tmp_path: Path, phase: str) -> None:
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "i"), phase], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


def assert_clean(folder: Path) -> None:
    """Only the parts of the committed generation are left: no staged file, no uncommitted log segment."""
    manifest = json.loads((folder / "manifest.json").read_text())
    named = {r[0] for r in manifest["log"]}
    assert files(folder) - named <= ALLOWED, files(folder)
    for r in manifest["log"]:
        assert (folder / r[0]).stat().st_size == r[2], "no uncommitted bytes past the log's end"


@pytest.mark.parametrize("phase, committed", [("catalogue", False), ("log", False), ("manifest", True)])
def test_sigkill_at_each_phase_of_a_write(tmp_path, phase, committed):
    x = lowrank(100, 7)
    build(tmp_path / "i", x, items_for(100), artifact_sha256=SHA, factory="IDMap2,Flat")
    before = Index.load(tmp_path / "i")  # a reader open across the crash
    run_crash(tmp_path, phase)
    reader = assert_consistent(tmp_path / "i")  # a reader, before any writer has cleaned up
    assert reader.count == (150 if committed else 100) and reader.search(x[:1], 1)[0][0].id == 1
    assert before.reload() == committed and before.count == reader.count
    writer = Index.load(tmp_path / "i")  # the next writer finishes or undoes what was left, and carries on
    writer.add(lowrank(5, 8), items_for(5, "/after/"))
    after = assert_consistent(tmp_path / "i")
    assert after.count == reader.count + 5 and Index.check(tmp_path / "i")["ok"]
    assert_clean(tmp_path / "i")


@pytest.mark.parametrize("phase, committed", [("fold", False), ("staged", False), ("commit", True),
                                              ("renamed", True)])
def test_sigkill_at_each_phase_of_a_compaction(tmp_path, phase, committed):
    x = lowrank(100, 9)
    build(tmp_path / "i", x, items_for(100), artifact_sha256=SHA, factory="IDMap2,Flat")
    before = Index.load(tmp_path / "i")
    run_crash(tmp_path, phase)
    reader = assert_consistent(tmp_path / "i")
    assert reader.count == 149 and (reader.manifest["log"] == []) == committed
    assert reader.search(x[2:3], 1)[0][0].id != 3 and reader.search(x[4:5], 1)[0][0].id == 5
    assert before.reload() and before.count == 149 and before.search(x[2:3], 1)[0][0].id != 3
    writer = Index.load(tmp_path / "i")
    writer.add(lowrank(5, 10), items_for(5, "/after/"))
    after = assert_consistent(tmp_path / "i")
    assert after.count == 154 and Index.check(tmp_path / "i")["ok"]
    assert_clean(tmp_path / "i")
    assert writer.compact()["compacted"] and assert_consistent(tmp_path / "i").manifest["log"] == []


def test_sigkill_at_a_random_moment_of_writes_and_compactions(tmp_path):
    build(tmp_path / "i", lowrank(100, 11), items_for(100), artifact_sha256=SHA, factory="HNSW16,Flat")
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "i"), "loop"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while json.loads((tmp_path / "i" / "manifest.json").read_text())["base_generation"] < 4:
            assert proc.poll() is None and time.time() < deadline, "the writer died early"
            time.sleep(0.02)
        time.sleep(np.random.default_rng().uniform(0, 0.3))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    idx = assert_consistent(tmp_path / "i")
    assert idx.count >= 100 + 3 * 20 and (idx.count - 100) % 20 == 0
    assert len(idx.search(lowrank(1, 12), 10)[0]) == 10
    Index.load(tmp_path / "i").add(lowrank(1, 13), items_for(1, "/last/"))
    assert_clean(tmp_path / "i")


def test_an_index_from_before_the_log_opens_and_takes_writes(tmp_path):
    """Format 1 (every write rewrote index.faiss): no log fields in the manifest; it reads as a base alone."""
    x = lowrank(60, 14)
    build(tmp_path / "i", x[:50], items_for(50), artifact_sha256=SHA, factory="HNSW16,Flat").close()
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    for key in ("base_generation", "base_ntotal", "log", "log_vectors", "log_removed", "compacted"):
        manifest.pop(key)
    manifest["format"] = 1
    (tmp_path / "i" / "manifest.json").write_text(json.dumps(manifest))
    idx = Index.load(tmp_path / "i")
    assert idx.count == 50 and idx.manifest["base_generation"] == 1
    idx.add(x[50:], items_for(10, "/new/"))
    idx.remove([1])
    again = assert_consistent(tmp_path / "i")
    assert again.manifest["format"] == 2 and again.count == 59 and again.search(x[55:56], 1)[0][0].id == 56


def test_a_write_past_the_threshold_can_leave_the_fold_to_a_thread(tmp_path):
    x = lowrank(260, 15)
    idx = build(tmp_path / "i", x[:200], items_for(200), artifact_sha256=SHA, factory="Flat")
    idx.compaction = Thresholds(fraction=0.1, minimum=20, bytes=1 << 40)
    idx.compact_in_background = True
    idx.add(x[200:260], items_for(60, "/bulk/"))  # 60 changes, over 20: due, folded on a thread
    idx.settle(timeout=60)
    assert idx.manifest["log"] == [] and idx.manifest["base_ntotal"] == 260
    assert_consistent(tmp_path / "i")
