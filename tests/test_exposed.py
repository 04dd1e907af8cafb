"""Running it exposed (issue 21): what a hostile or merely unusual client can send, against one real server.

One ``mae serve`` (keys with ``--public-read``, one worker) over a small index: a 64 KB ``where`` in each form is
refused at once while ``/embed`` keeps its pace; values out of range (lone surrogates, ids past 64 bits, dates past
year 9999) are 4xx and write nothing; every answer carries the security headers; BentoML's own client drives every
API; and, last (the server ends there), a SIGKILL while ``POST /items`` waits for the index's lock leaves uploads
that the next start removes. ``IndexAccess`` (the duplicates scan's cache and its one-scan-per-client bound, the
orphan sweep) and the request parameters are tested without a server too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import io
import json
import os
import re
import signal
import statistics
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serving_support import Server, build_index, export_digits, multipart, request, tiny_artifact

WRITE_KEY = "write-key-8e4d1a6c0b9f2e7d"
LABELS = [str(i) for i in range(10)]
# The old filter expression backtracked over runs of spaces after a tag name: 64 KB of them held a server minutes.
HOSTILE_WHERE = "tag.a" + " " * (64 * 1024 - 6) + "x"
# What a value past what the index stores is called (serving.params, or retrieval's parser where it says first).
OUT_OF_RANGE = r"out of range|below 2\*\*63"


def png(seed: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def call(server: Server, path: str, body: bytes | None = None, ctype: str | None = None, method: str | None = None,
         key: str | None = None, timeout: float = 60):
    """(status, JSON or bytes, headers)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, raw, head = request(server.url + path, body, ctype, method, timeout=timeout, headers=headers,
                                with_headers=True)
    try:
        return status, json.loads(raw), head
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, raw, head


def as_json(payload: dict) -> tuple[bytes, str]:
    return json.dumps(payload).encode(), "application/json"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exposed")
    artifact = tiny_artifact(tmp / "artifact", labels=LABELS)
    export_digits(tmp / "digits", 24)
    index = build_index(artifact, tmp / "digits", tmp / "index")
    keys = tmp / "keys.txt"
    keys.write_text(f"write {WRITE_KEY} writer\n")
    server = Server(artifact, index, tmp / "server.log", ["--api-keys", str(keys), "--public-read"],
                    env={"MAE_WRITE_WAIT_S": "60"})
    try:
        server.wait_ready()
        yield {"server": server, "index": index, "tmp": tmp, "artifact": artifact,
               "digits": sorted((tmp / "digits").rglob("*.png"))}
    finally:
        server.stop()


def state(srv: Server) -> tuple[int, int]:
    """(count, generation) of the server's index."""
    status, info, _ = call(srv, "/info")
    assert status == 200, info
    return info["index"]["count"], info["index"]["generation"]


# ----------------------------------------------------------------------------------------------- the filter


def test_a_64_kb_where_is_refused_at_once_and_embed_keeps_its_pace(setup, capsys):
    """In a multipart form, a JSON body and a query string (main: minutes each, the whole server held meanwhile).
    The figures are printed, not asserted: wall time on shared cores is noise; the bound is the 20 s timeout."""
    srv, image = setup["server"], setup["digits"][0].read_bytes()
    encoded = base64.b64encode(image).decode()
    forms = {
        "multipart /search": lambda: call(srv, "/search", *multipart([("images", "a.png", image, "image/png")],
                                                                     {"where": HOSTILE_WHERE}), timeout=20),
        "JSON /search": lambda: call(srv, "/search", *as_json({"images": [encoded], "where": [HOSTILE_WHERE]}),
                                     timeout=20),
        "GET /items/1/similar": lambda: call(srv, "/items/1/similar?" + urllib.parse.urlencode(
            {"where": HOSTILE_WHERE}), timeout=20),
        "JSON /search, 16 x 1 KB": lambda: call(srv, "/search", *as_json(
            {"images": [encoded], "where": ["tag.a" + " " * 1000 + "x"] * 16}), timeout=20),
    }
    refusals = {}
    for name, send in forms.items():
        started = time.perf_counter()
        status, answer, _ = send()
        refusals[name] = time.perf_counter() - started
        assert status in (400, 413), (name, answer)
        assert re.search(r"'where' holds 65,536 characters, over the limit of 16,384|no operator", answer["error"]), \
            (name, answer)

    embed_body = multipart([("images", "a.png", image, "image/png")])

    def embed_latency(n: int = 12) -> float:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            assert call(srv, "/embed", *embed_body)[0] == 200
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    idle = embed_latency()
    stop = threading.Event()

    def hostile() -> None:  # 10 filters a second: steady hostility, not a flood (any endpoint would feel one)
        while not stop.is_set():
            for send in forms.values():
                send()
                stop.wait(0.1)

    clients = [threading.Thread(target=hostile) for _ in range(2)]
    for c in clients:
        c.start()
    try:
        busy = embed_latency()
    finally:
        stop.set()
        for c in clients:
            c.join(60)
    with capsys.disabled():
        print("\n  refused in " + ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in refusals.items()) +
              f"; /embed median {1000 * idle:.1f} ms idle, {1000 * busy:.1f} ms beside 2 hostile clients "
              f"at 10/s each ({busy / idle:.2f}x)")
    status, answer, _ = call(srv, "/search", *multipart([("images", "a.png", image, "image/png")],
                                                        {"where": "label=3", "k": "3"}))
    assert status == 200 and all(h["label"] == "3" for h in answer["neighbours"][0]), answer


def test_the_filter_limits_and_forms_without_a_server():
    from serving.errors import RequestError
    from serving.params import parse_id, parse_label, parse_min_score, parse_tags, parse_where

    max_where, max_condition_chars = 16, 4096  # serving.params.MAX_WHERE, MAX_CONDITION_CHARS

    assert parse_where('["label=3", "tag.camera=X100"]') == ["label=3", "tag.camera=X100"]  # BentoML's client
    assert parse_where(['"label=3"']) == ["label=3"] and parse_where("[]") == [] and parse_where(None) == []
    assert parse_where("null") == []  # where=None from BentoML's client
    assert parse_where(["label=[weird]"]) == ["label=[weird]"]
    assert parse_min_score("null") is None and parse_min_score(["0.5"]) == 0.5
    for bad, status, words in [
        (["label=1"] * (max_where + 1), 400, "at most 16 conditions"),
        (["path^=" + "a" * max_condition_chars], 413, "over the limit of 4,096 a condition"),
        ([HOSTILE_WHERE], 413, "over the limit of 16,384"),
        (["tag." + "a" * 200 + "=x"], 400, "no operator"),
        (["label=\ud800"], 400, "lone surrogate"),
        (["id=9223372036854775808"], 400, OUT_OF_RANGE),
        (["added=9999-12-31"], 400, OUT_OF_RANGE),
        (["added<0001-01-01T00:00+01:00"], 400, OUT_OF_RANGE),
        ('["label=3", 4]', 400, "a list of conditions"),
    ]:
        with pytest.raises(RequestError, match=words if words is OUT_OF_RANGE else re.escape(words)) as e:
            parse_where(bad)
        assert e.value.status == status, bad
    with pytest.raises(RequestError, match="lone surrogate"):
        parse_label("cat\udc80")
    with pytest.raises(RequestError, match="lone surrogate"):
        parse_tags({"camera": "\ud800"})
    with pytest.raises(RequestError, match="lone surrogate"):
        parse_tags('{"\\ud800": "x"}')
    with pytest.raises(RequestError, match="no item 9223372036854775808") as e:
        parse_id("9223372036854775808")
    assert e.value.status == 404 and parse_id("9223372036854775807") == 2**63 - 1


# ----------------------------------------------------------------------------------------------- values out of range


def test_values_out_of_range_are_4xx_and_write_nothing(setup):
    """Lone surrogates in JSON labels, tags and filters, ids past 64 bits, dates past year 9999 (main: 500s, and
    the label and tag cases wrote into the index)."""
    srv = setup["server"]
    before = state(srv)
    uploads = sorted((setup["index"] / "uploads").glob("*")) if (setup["index"] / "uploads").exists() else []
    new = base64.b64encode(png(4242)).decode()
    for fields in ({"label": "cat\ud800"}, {"tags": {"camera": "\udfff"}}, {"tags": {"\ud83d": "x"}},
                   {"label": ["ok", "\ud800"]}):
        status, answer, _ = call(srv, "/items", *as_json({"images": [new, new], **fields}), key=WRITE_KEY)
        assert status == 400 and "lone surrogate" in answer["error"], (fields, answer)
    image = base64.b64encode(setup["digits"][1].read_bytes()).decode()
    for where, words in [(["label=\ud800"], "lone surrogate"), (["id=9223372036854775808"], OUT_OF_RANGE),
                         (["id>99999999999999999999"], "id"), (["added=9999-12-31"], OUT_OF_RANGE),
                         (["added<0001-01-01T00:00+01:00"], OUT_OF_RANGE)]:
        status, answer, _ = call(srv, "/search", *as_json({"images": [image], "where": where}))
        assert status == 400 and re.search(words, answer["error"]), (where, answer)
        if "surrogate" not in words:  # a query string is bytes: a server reads them as UTF-8 or U+FFFD
            status, answer, _ = call(srv, "/items/1/similar?" + urllib.parse.urlencode({"where": where[0]}))
            assert status == 400 and re.search(words, answer["error"]), (where, answer)
    for path in ("/items/9223372036854775808", "/thumbnail/9223372036854775808",
                 "/items/9223372036854775808/similar"):
        status, answer, _ = call(srv, path)
        assert status == 404 and "no item" in answer["error"], (path, answer)
    status, answer, _ = call(srv, "/items/9223372036854775808", method="DELETE", key=WRITE_KEY)
    assert status == 404, answer
    assert state(srv) == before, "nothing was written"
    after = sorted((setup["index"] / "uploads").glob("*")) if (setup["index"] / "uploads").exists() else []
    assert after == uploads, "no upload was stored"


# ----------------------------------------------------------------------------------------------- headers


def test_the_page_and_every_answer_carry_the_security_headers(setup):
    srv = setup["server"]
    for path, policy in [("/", "page"), ("/web/app.js", "page"), ("/web/style.css", "page"), ("/info", "api"),
                         ("/items/1", "api"), ("/items/abc", "api"), ("/thumbnail/1", "api"), ("/docs", "docs"),
                         ("/healthz", "api")]:
        status, _, head = call(srv, path)
        assert status in (200, 400), (path, status)
        csp = head.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp, (path, head)
        assert head.get("x-frame-options") == "DENY" and head.get("x-content-type-options") == "nosniff", path
        if policy == "page":  # the page's own scripts and styles, nothing inline, nothing from elsewhere
            assert "script-src 'self';" in csp and "style-src 'self';" in csp and "unsafe" not in csp, csp
        elif policy == "api":
            assert csp.startswith("default-src 'none'"), (path, csp)
    status, _, head = call(srv, "/items", *as_json({"images": []}))  # refused before the route: no key
    assert status == 401 and "frame-ancestors 'none'" in head["content-security-policy"]
    # the page runs under its policy: no inline script, style or handler (tests/test_page.py drives it in Chromium)
    web = Path(__file__).resolve().parents[1] / "serving" / "web"
    html = (web / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) and "<style" not in html
    assert not re.search(r"\s(style|on[a-z]+)\s*=", html)
    js = (web / "app.js").read_text()
    assert not re.search(r"\beval\(|new Function|setAttribute\(\s*['\"](style|on)|cssText|insertAdjacentHTML", js)


# ----------------------------------------------------------------------------------------------- BentoML's client


def test_bentoml_client_drives_every_api(setup):
    """``bentoml.SyncHTTPClient`` sends list and optional fields as JSON text in its multipart forms
    (``where=["label=3"]`` as ``["label=3"]``, ``min_score=None`` as ``null``; main: 400s); the routes beside
    BentoML's APIs go through the same client's ``request``."""
    import bentoml

    srv, digits = setup["server"], setup["digits"]
    query = next(p for p in digits if p.parent.name == "3")
    with bentoml.SyncHTTPClient(srv.url, token=WRITE_KEY, timeout=60) as client:
        embedded = client.embed(images=[digits[0], digits[1]])
        assert len(embedded["embeddings"]) == 2 and embedded["dim"] == len(embedded["embeddings"][0])
        [top] = client.classify(images=[digits[0]], k=2)["predictions"]
        assert len(top) == 2 and top[0]["label"] in LABELS
        for kwargs in ({"where": ["label=3"]}, {"where": ["label=3"], "min_score": None, "k": 3},
                       {"where": "label=3"}, {"where": ["label=3", "path^=digits/3/"], "min_score": -1.0}):
            [hits] = client.search(images=[query], **kwargs)["neighbours"]
            assert hits and all(h["label"] == "3" for h in hits), (kwargs, hits)
            assert len(hits) <= kwargs.get("k", 5)
        [hits] = client.search(images=[query], min_score=None, where=[])["neighbours"]
        assert len(hits) == 5 and hits[0]["path"].endswith(query.name)
        with pytest.raises(bentoml.exceptions.BentoMLException, match="label takes"):
            client.search(images=[query], where=["label>3"])

        added = client.request("POST", "/items", files=[("images", ("new.png", png(7), "image/png"))],
                               data={"label": "fresh", "tags": json.dumps({"camera": "X100"})})
        assert added.status_code == 200, added.text
        [row] = added.json()["added"]
        item = client.request("GET", f"/items/{row['id']}").json()
        assert item["label"] == "fresh" and item["tags"] == {"camera": "X100"}
        similar = client.request("GET", f"/items/{row['id']}/similar", params={"k": 3, "where": ["label!=fresh"]})
        assert similar.status_code == 200 and len(similar.json()["neighbours"]) == 3
        duplicates = client.request("GET", "/duplicates", params={"threshold": 0.5, "limit": 2})
        assert duplicates.status_code == 200 and duplicates.json()["threshold"] == 0.5
        removed = client.request("DELETE", f"/items/{row['id']}")
        assert removed.status_code == 200 and removed.json()["removed"] == [row["id"]]
        assert client.request("GET", f"/items/{row['id']}").status_code == 404


# ----------------------------------------------------------------------------------------------- the index's threads


def test_duplicates_scans_are_cached_and_bounded(tmp_path, monkeypatch):
    """A scan per (generation, threshold), kept; while one runs, a client asking for another of its own, or anyone
    asking for a new one, gets 429 with Retry-After, and anyone asking for the running one shares it; after a scan
    of d seconds no new one starts for 3d (main: one cached answer, a new scan for each threshold, as many at once
    as clients asked for: /search 15.6x slower beside two such clients, bench/exposed.py)."""
    import hashlib

    import serving.index_access as index_access
    from retrieval.catalog import Item
    from retrieval.index import Index, build
    from serving.errors import RequestError

    items = [Item(str(tmp_path / f"p{i}.png"), hashlib.sha256(bytes([i])).hexdigest()) for i in range(6)]
    vectors = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    vectors[1] = vectors[0] + 1e-3  # one pair of near-copies
    build(tmp_path / "index", vectors, items, artifact_sha256="a" * 64, factory="Flat")
    access = index_access.IndexAccess(str(tmp_path / "index"), "a" * 64)
    cached = 8  # serving.index_access.SCAN_CACHE
    scans: list[float] = []
    scan = Index.duplicates

    def slow_scan(self, threshold, *args, **kwargs):
        scans.append(threshold)
        time.sleep(0.3)
        return scan(self, threshold, *args, **kwargs)

    monkeypatch.setattr(Index, "duplicates", slow_scan)

    async def refused(threshold: float, client: str, words: str) -> None:
        with pytest.raises(RequestError, match=words) as e:
            await access.duplicates(threshold, 10, client=client)
        assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1, e.value.headers

    async def scenario() -> None:
        first = asyncio.ensure_future(access.duplicates(0.99, 10, client="a"))
        while not scans:  # its scan has started
            await asyncio.sleep(0.01)
        await refused(0.9, "a", "one at a time per client")
        await refused(0.8, "b", "at most 25% of the server's time")
        shared = await access.duplicates(0.99, 10, client="b")  # the scan under way, not a second one
        assert (await first).value == shared.value and shared.value[1] == 1
        await refused(0.8, "c", "has just run")  # 0.3 s of scanning: none for 0.9 s
        for _ in range(3):
            assert (await access.duplicates(0.99, 1, client="c")).value[1] == 1  # cached: answered at once
        assert scans == [0.99]
        access._next_scan = 0.0  # as if the pause were over
        await access.duplicates(0.9, 10, client="a")
        assert scans == [0.99, 0.9]

        monkeypatch.setattr(index_access, "SCAN_SHARE", 1.0)  # no pause: the cache's own bound
        access._next_scan = 0.0
        for t in range(cached + 1):
            await access.duplicates(0.5 + t / 100, 10, client="a")
        await access.duplicates(0.9, 10, client="a")  # pushed out by the eight after it: scanned again
        assert len(scans) == 2 + cached + 2

    asyncio.run(scenario())


def test_orphan_uploads_are_removed_at_start_and_after_writes(tmp_path):
    import hashlib

    from retrieval.catalog import Item
    from retrieval.index import Index, build
    from retrieval.uploads import ORPHAN_AGE_S, orphan_uploads
    from serving.images import Upload
    from serving.index_access import IndexAccess

    uploads = tmp_path / "index" / "uploads"
    named = uploads / "aaaa-named.png"  # an upload an item names
    build(tmp_path / "index", np.eye(3, 8, dtype=np.float32),
          [Item(str(named), hashlib.sha256(png(1)).hexdigest())] +
          [Item(str(tmp_path / f"p{i}.png"), hashlib.sha256(png(i + 10)).hexdigest()) for i in range(2)],
          artifact_sha256="a" * 64, factory="Flat")
    uploads.mkdir(exist_ok=True)
    named.write_bytes(png(1))
    old = time.time() - ORPHAN_AGE_S - 60
    orphans = [uploads / "bbbb-killed.png", uploads / "cccc-killed.png.x1y2z3.tmp"]
    for path in [*orphans, named]:
        if not path.exists():
            path.write_bytes(b"left by a killed writer")
        os.utime(path, (old, old))
    young = uploads / "dddd-in-flight.png"  # a writer of another process may be waiting for the lock with it
    young.write_bytes(b"waiting for the lock")
    assert orphan_uploads(Index.load(tmp_path / "index")) == sorted(orphans)

    access = IndexAccess(str(tmp_path / "index"), "a" * 64)  # a worker starts
    access._writer.submit(lambda: None).result()  # its start-up sweep is done
    assert sorted(uploads.iterdir()) == sorted([named, young])

    os.utime(young, (old, old))
    another = uploads / "eeee-later.png"
    another.write_bytes(b"x")
    os.utime(another, (old, old))
    access._swept -= 10 * ORPHAN_AGE_S  # the last sweep was long ago: the next write sweeps
    found = asyncio.run(access.add([Upload("image 1", png(99), "n.png")], np.eye(1, 8, 5, dtype=np.float32),
                                   [None], [None]))
    [row] = found.value.rows
    assert sorted(uploads.iterdir()) == sorted([named, Path(row.path)])

    from cli.main import main

    stray = uploads / "ffff-killed.png"  # and mae index check --repair removes what a killed writer left
    stray.write_bytes(b"x")
    os.utime(stray, (old, old))
    assert main(["index", "check", "--index", str(tmp_path / "index"), "--repair"]) == 0
    assert sorted(uploads.iterdir()) == sorted([named, Path(row.path)])


# ----------------------------------------------------------------------------------------------- last: a SIGKILL


def test_sigkill_while_an_add_waits_for_the_lock_leaves_uploads_the_next_start_removes(setup):
    """The server is killed (every process) while ``POST /items`` waits for the index's lock, held here: its stored
    uploads stay (main: for ever). The next start removes them once they are older than any lock wait, and keeps a
    younger upload (another writer's, maybe still waiting)."""
    import psutil

    from retrieval.index import Index
    from serving.index_access import IndexAccess

    orphan_age_s = 3600  # retrieval.uploads.ORPHAN_AGE_S
    srv, index = setup["server"], setup["index"]
    uploads = index / "uploads"
    before = set(uploads.iterdir()) if uploads.exists() else set()
    body, ctype = multipart([("images", f"k{i}.png", png(7000 + i), "image/png") for i in range(4)])
    def add() -> None:
        with contextlib.suppress(OSError):  # the connection dies with the server
            call(srv, "/items", body, ctype, key=WRITE_KEY, timeout=90)

    with open(index / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as another writer would: the add stores its uploads, then waits
        thread = threading.Thread(target=add)
        thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(set(uploads.glob("*")) - before) < 4:
            time.sleep(0.05)
        stored = set(uploads.glob("*")) - before
        assert len(stored) == 4, "the uploads are stored before the lock is taken"
        tree = [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        srv.proc.wait(30)
        psutil.wait_procs(tree[1:], timeout=30)
        fcntl.flock(lock, fcntl.LOCK_UN)
    thread.join(60)
    assert set(uploads.glob("*")) - before == stored, "nothing committed them, nothing removed them"
    assert not Index.load(index).ids_by_path([str(p) for p in stored]), "no item names them"

    sha256 = Index.load(index).artifact_sha256

    def start() -> None:
        """What a server's worker does at start (``IndexAccess``), up to the end of its first sweep."""
        IndexAccess(str(index), sha256)._writer.submit(lambda: None).result()

    start()  # before they are older than any lock wait: kept (they could be a live writer's)
    assert set(uploads.glob("*")) - before == stored
    old = time.time() - orphan_age_s - 1
    for path in stored:
        os.utime(path, (old, old))
    start()
    assert set(uploads.glob("*")) == before, "the next start removed them"
    assert Index.load(index).count == len(setup["digits"])
