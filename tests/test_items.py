"""The index as a live backend over HTTP: items, writes behind keys, CORS, filters, more-like-this, duplicates.

Two real servers (``mae serve`` subprocesses on loopback), started side by side:

- ``keyed``: API keys, two front workers, a CORS origin, a short write wait: writes, their visibility in every
  worker, concurrency with the CLI, 409 under a held lock, keys and CORS;
- ``public``: keys with ``--public-read``, one worker: open reads, keyed writes, no CORS, then a SIGKILL in the
  middle of an HTTP add (this server ends there).

Key handling without a server (every scope rule, the file format) is tested on ``serving.auth`` directly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.index import Index
from tests.serving_support import Server, build_index, export_digits, multipart, request, run_cli, tiny_artifact

READ_KEY = "read-key-5b0c2f7e9a1d4c3b"
WRITE_KEY = "write-key-8e4d1a6c0b9f2e7d"
ORIGIN = "https://app.example"
LABELS = [str(i) for i in range(10)]


def png(seed: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def call(server: Server, path: str, body: bytes | None = None, ctype: str | None = None, method: str | None = None,
         key: str | None = None, origin: str | None = None, headers: dict[str, str] | None = None):
    """(status, JSON or bytes, headers)."""
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    if origin:
        h["Origin"] = origin
    status, raw, head = request(server.url + path, body, ctype, method, headers=h, with_headers=True)
    try:
        return status, json.loads(raw), head
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, raw, head


def upload(images: list[tuple[str, bytes]], **fields: str) -> tuple[bytes, str]:
    return multipart([("images", name, data, "image/png") for name, data in images], fields)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("items")
    artifact = tiny_artifact(tmp / "artifact", labels=LABELS)
    export_digits(tmp / "digits", 30)
    keys = tmp / "keys.txt"
    keys.write_text(f"# test keys\nread {READ_KEY} reader\nwrite {WRITE_KEY} writer\n")
    indexes = {name: build_index(artifact, tmp / "digits", tmp / f"index-{name}") for name in ("keyed", "public")}
    keyed = Server(artifact, indexes["keyed"], tmp / "keyed.log",
                   ["--api-keys", str(keys), "--workers", "2", "--cors-origin", ORIGIN, "--max-images", "128"],
                   env={"MAE_WRITE_WAIT_S": "2"})
    public = Server(artifact, indexes["public"], tmp / "public.log", ["--api-keys", str(keys), "--public-read"])
    try:
        keyed.wait_ready()
        public.wait_ready()
        yield {"keyed": keyed, "public": public, "indexes": indexes, "tmp": tmp, "artifact": artifact,
               "digits": sorted((tmp / "digits").rglob("*.png"))}
    finally:
        keyed.stop()
        public.stop()


# ----------------------------------------------------------------------------------------------- keys and CORS


def test_keys_decide_who_reads_and_who_writes(setup):
    srv = setup["keyed"]
    body, ctype = upload([("a.png", png(1))])
    status, answer, head = call(srv, "/info")
    assert status == 401 and "Bearer" in answer["error"] and head["www-authenticate"].startswith("Bearer")
    assert call(srv, "/info", key=READ_KEY)[0] == 200
    assert call(srv, "/info", key=WRITE_KEY)[0] == 200, "a write key reads too"
    status, answer, _ = call(srv, "/info", key="not-a-key-at-all-xyz")
    assert status == 401 and "not valid" in answer["error"] and "not-a-key" not in json.dumps(answer)
    assert call(srv, "/info", headers={"Authorization": f"Basic {READ_KEY}"})[0] == 401
    status, answer, _ = call(srv, "/items", body, ctype, key=READ_KEY)
    assert status == 403 and "may read but not write" in answer["error"]
    assert call(srv, "/items", body, ctype)[0] == 401
    assert call(srv, "/items/1", method="DELETE", key=READ_KEY)[0] == 403
    for path in ("/", "/web/app.js", "/healthz", "/readyz", "/docs.json"):  # the page and the probes stay open
        assert call(srv, path)[0] == 200, path
    status, _, head = call(srv, "/thumbnail/1")
    assert status == 401


def test_public_read_opens_reads_only(setup):
    srv = setup["public"]
    assert call(srv, "/info")[0] == 200 and call(srv, "/items/1")[0] == 200
    body, ctype = upload([("a.png", png(2))])
    assert call(srv, "/items", body, ctype)[0] == 401
    assert call(srv, "/items", body, ctype, key=READ_KEY)[0] == 403


def test_keys_never_reach_the_logs(setup):
    for srv in (setup["keyed"], setup["public"]):
        call(srv, "/info", key="wrong-key-that-must-not-be-logged")
        call(srv, "/items/1", method="DELETE", key=READ_KEY)
        text = srv.tail() + (srv.log.read_text(errors="replace") if srv.log else "")
        for secret in (READ_KEY, WRITE_KEY, "wrong-key-that-must-not-be-logged"):
            assert secret not in text


def test_cors_is_off_unless_an_origin_is_listed(setup):
    keyed, public = setup["keyed"], setup["public"]
    status, _, head = call(keyed, "/info", key=READ_KEY, origin=ORIGIN)
    assert status == 200 and head["access-control-allow-origin"] == ORIGIN
    status, _, head = call(keyed, "/info", key=READ_KEY, origin="https://evil.example")
    assert status == 200 and "access-control-allow-origin" not in head
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    status, _, head = call(keyed, "/items", method="OPTIONS", origin=ORIGIN, headers=pre)
    assert status == 204 and "Authorization" in head["access-control-allow-headers"]
    assert "DELETE" in head["access-control-allow-methods"]
    assert call(keyed, "/items", method="OPTIONS", origin="https://evil.example", headers=pre)[0] == 403
    status, _, head = call(public, "/info", origin=ORIGIN)
    assert status == 200 and "access-control-allow-origin" not in head, "no --cors-origin: no CORS headers"


def test_the_guard_without_a_server():
    from serving.auth import Guard, KeyRing, required_scope

    assert required_scope("POST", "/items") == "write" and required_scope("DELETE", "/items/7") == "write"
    assert required_scope("GET", "/items/7") == "read" and required_scope("POST", "/search") == "read"
    assert required_scope("GET", "/") is None and required_scope("GET", "/web/app.js") is None
    assert required_scope("GET", "/nowhere") == "read", "unknown paths are not open"

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def status(guard, method, path, auth=None):
        sent = []

        async def send(message):
            sent.append(message)

        headers = [(b"authorization", auth.encode())] if auth else []
        asyncio.run(guard({"type": "http", "method": method, "path": path, "headers": headers}, None, send))
        return sent[0]["status"]

    nobody = Guard(app, KeyRing(), False, [])
    assert status(nobody, "POST", "/search") == 200, "no keys configured: reads open as before"
    assert status(nobody, "POST", "/items") == 403, "no keys configured: no writes at all"
    import hashlib
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"write sha256:{hashlib.sha256(WRITE_KEY.encode()).hexdigest()} bot\nread {READ_KEY}\n")
    ring = KeyRing.load(f.name)
    os.unlink(f.name)
    assert len(ring) == 2 and WRITE_KEY not in repr(ring.keys)
    guard = Guard(app, ring, False, [])
    assert status(guard, "POST", "/items", f"Bearer {WRITE_KEY}") == 200
    assert status(guard, "POST", "/items", f"Bearer {READ_KEY}") == 403
    assert status(guard, "GET", "/items/3") == 401
    assert status(Guard(app, ring, True, []), "GET", "/items/3") == 200
    for text, words in [("read short\n", "at least 16"), ("admin 0123456789abcdefXYZ\n", "expected 'read KEY"),
                        ("write sha256:abc\n", "64 hex digits"), ("# nothing\n", "holds no keys")]:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        with pytest.raises(ValueError, match=words) as e:
            KeyRing.load(f.name)
        os.unlink(f.name)
        assert "0123456789abcdefXYZ" not in str(e.value)


def test_mae_serve_refuses_a_bad_key_file_in_one_line(setup, tmp_path):
    bad = tmp_path / "keys.txt"
    bad.write_text("write tooshort\n")
    done = run_cli("serve", "--artifact", str(setup["artifact"]), "--api-keys", str(bad), check=False)
    assert done.returncode == 1 and "keys.txt:1" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("serve", "--artifact", str(setup["artifact"]), "--cors-origin", "app.example", check=False)
    assert done.returncode == 1 and "--cors-origin takes an origin" in done.stderr


def test_index_access_without_a_server(tmp_path, monkeypatch):
    """``IndexAccess`` (one per front worker) over a real index, through public Index methods only: an add names
    the holder of bytes already held (in the index or earlier in the request); a writer elsewhere that indexed the
    same bytes first keeps its file and ours goes; reads see other writers' commits; the duplicates scan follows
    the generation; a removed upload's file goes with it, a collection's own file stays."""
    import hashlib

    from retrieval.catalog import Item
    from retrieval.index import build
    from serving.errors import RequestError
    from serving.images import Upload
    from serving.index_access import IndexAccess

    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    items = []
    for i in range(6):
        (photos / f"p{i}.png").write_bytes(png(i))
        items.append(Item(str(photos / f"p{i}.png"), hashlib.sha256(png(i)).hexdigest(), "old"))
    vectors = rng.normal(size=(6, 8)).astype(np.float32)
    build(tmp_path / "index", vectors, items, artifact_sha256="a" * 64, factory="Flat")
    access, other = IndexAccess(str(tmp_path / "index"), "a" * 64), Index.load(tmp_path / "index")
    ids = other.ids_by_sha256([it.sha256 for it in items])
    held = ids[items[0].sha256]
    assert asyncio.run(access.duplicates(0.999, 10)).value == ([], 0)

    new = png(50)
    uploads = [Upload("image 1 'new.png'", new, "new.png"), Upload("image 2 'again.png'", new, "again.png"),
               Upload("image 3 'p0.png'", png(0), "p0.png")]
    found = asyncio.run(access.add(uploads, np.stack([vectors[1], vectors[1], vectors[0]]), ["x"] * 3, [None] * 3))
    [row] = found.value.rows
    assert row.path.endswith("-new.png") and Path(row.path).exists() and row.label == "x" and found.count == 7
    assert found.value.duplicates == [("image 2 'again.png'", row.id), ("image 3 'p0.png'", held)]
    assert [p.name for p in (tmp_path / "index" / "uploads").iterdir()] == [Path(row.path).name]
    groups, total = asyncio.run(access.duplicates(0.999, 10)).value  # a new generation: scanned again
    assert total == 1 and sorted(r.id for r, _ in groups[0]) == sorted([row.id, ids[items[1].sha256]])

    raced = png(60)
    store = access._store

    def store_then_race(uploads, items):  # another writer indexes the same bytes between our store and our add
        written = store(uploads, items)
        other.add(vectors[2:3], [Item(str(photos / "elsewhere.png"), items[0].sha256)])
        return written

    monkeypatch.setattr(access, "_store", store_then_race)
    found = asyncio.run(access.add([Upload("image 1", raced, "r.png")], vectors[2:3], [None], [None]))
    winner = other.ids_by_sha256([hashlib.sha256(raced).hexdigest()])
    assert found.value.rows == [] and found.value.duplicates == [("image 1", *winner.values())] and found.count == 8
    assert not list((tmp_path / "index" / "uploads").glob("*-r.png")), "our copy of the bytes went"
    assert asyncio.run(access.row(*winner.values())).path == str(photos / "elsewhere.png"), "reads see it"

    assert asyncio.run(access.remove(row.id)).value == [row.id] and not Path(row.path).exists()
    assert asyncio.run(access.remove(held)).value == [held] and (photos / "p0.png").exists()
    with pytest.raises(RequestError, match=f"no item {held}") as e:
        asyncio.run(access.row(held))
    assert e.value.status == 404
    with pytest.raises(RequestError, match="no index") as e:
        asyncio.run(IndexAccess(None, "a" * 64).row(1))
    assert e.value.status == 400


# ----------------------------------------------------------------------------------------------- reads


def test_search_filters_and_cuts_by_score(setup):
    srv = setup["keyed"]
    query = setup["digits"][4]
    body, ctype = multipart([("images", query.name, query.read_bytes(), "image/png")],
                            {"k": "5", "where": f"label={query.parent.name}"})
    status, answer, _ = call(srv, "/search", body, ctype, key=READ_KEY)
    assert status == 200, answer
    hits = answer["neighbours"][0]
    same_class = len(list(query.parent.glob("*.png")))
    assert len(hits) == min(5, same_class) and all(h["label"] == query.parent.name for h in hits)
    assert hits[0]["path"] == f"digits/{query.parent.name}/{query.name}", "relative to the indexed folder"
    payload = {"images": [base64.b64encode(query.read_bytes()).decode()], "k": 10,
               "where": ["path^=digits/1/", "label!=7"], "min_score": hits[0]["score"] - 1e-6}
    status, answer, _ = call(srv, "/search", json.dumps(payload).encode(), "application/json", key=READ_KEY)
    assert status == 200 and all(h["path"].startswith("digits/1/") for h in answer["neighbours"][0])
    assert all(h["score"] >= payload["min_score"] for h in answer["neighbours"][0])
    for bad, words in [({"where": ["colour=red"]}, "FIELD OP VALUE"), ({"min_score": "high"}, "min_score"),
                       ({"where": "label>3"}, "label takes")]:
        status, answer, _ = call(srv, "/search", json.dumps({**payload, **bad}).encode(), "application/json",
                                 key=READ_KEY)
        assert status == 400 and words in answer["error"], answer


def test_items_similar_thumbnails_and_duplicates(setup):
    srv = setup["keyed"]
    status, item, _ = call(srv, "/items/4", key=READ_KEY)
    assert status == 200 and item["id"] == 4 and item["path"].startswith("digits/") and "/" not in item["path"][:1]
    status, answer, _ = call(srv, "/items/4/similar?k=5&where=label%3D1", key=READ_KEY)
    assert status == 200 and answer["item"]["id"] == 4
    assert 4 not in [h["id"] for h in answer["neighbours"]] and all(h["label"] == "1" for h in answer["neighbours"])
    status, raw, head = call(srv, "/items/4/thumbnail", key=READ_KEY)
    assert status == 200 and head["content-type"] == "image/png" and Image.open(io.BytesIO(raw)).size[0] > 0
    for path, code in [("/items/999999", 404), ("/items/abc", 400), ("/items/99999999999999999999999", 404),
                       ("/thumbnail/99999999999999999999999", 404), ("/items/4/similar?k=0", 400),
                       ("/items/4/similar?colour=red", 400), ("/duplicates?threshold=3", 400)]:
        status, answer, _ = call(srv, path, key=READ_KEY)
        assert status == code and answer["error"], (path, answer)
    status, answer, _ = call(srv, "/duplicates?threshold=0.5&limit=3", key=READ_KEY)
    assert status == 200 and answer["total_groups"] >= 1 and len(answer["groups"]) <= 3
    assert all(len(g) >= 2 and all(m["score"] >= 0.5 for m in g) for g in answer["groups"])


# ----------------------------------------------------------------------------------------------- writes


def seen_by_every_worker(srv: Server, path: str, expect, tries: int = 200) -> set[str]:
    """Ask ``path`` until both workers have answered; every answer must satisfy ``expect``."""
    workers: set[str] = set()
    for _ in range(tries):
        status, answer, head = call(srv, path, key=READ_KEY)
        assert expect(status, answer), (path, status, answer)
        workers.add(head["x-mae-worker"])
        if len(workers) == 2:
            break
    return workers


def test_an_http_add_and_delete_are_seen_by_both_workers_at_once(setup):
    srv = setup["keyed"]
    images = [(f"new{i}.png", png(100 + i)) for i in range(100)]
    body, ctype = upload(images, label="fresh", tags='{"source": "http"}')
    started = time.monotonic()
    status, answer, _ = call(srv, "/items", body, ctype, key=WRITE_KEY)
    answered = time.monotonic()
    assert status == 200, answer
    added = answer["added"]
    assert len(added) == 100 and all(a["label"] == "fresh" and a["tags"] == {"source": "http"} for a in added)
    assert added[0]["path"].startswith("uploads/") and added[0]["path"].endswith("-new0.png")
    index = setup["indexes"]["keyed"]
    assert (index / added[0]["path"]).exists(), "the upload is kept under INDEX/uploads"
    target = added[37]
    workers = seen_by_every_worker(srv, f"/items/{target['id']}", lambda s, a: s == 200 and a["label"] == "fresh")
    assert len(workers) == 2, "two front workers should both have answered"
    # searchable by image in both workers, immediately: the bound is the reload, not a timer
    query = dict(images)["new37.png"]
    q, qtype = upload([("q.png", query)], k="1", where="tag.source=http")
    found_in: dict[str, float] = {}
    for _ in range(200):
        status, answer, head = call(srv, "/search", q, qtype, key=READ_KEY)
        assert status == 200 and answer["neighbours"][0][0]["id"] == target["id"]
        found_in.setdefault(head["x-mae-worker"], time.monotonic() - answered)
        if len(found_in) == 2:
            break
    assert len(found_in) == 2 and max(found_in.values()) < 2.0, found_in
    print(f"100-image add: {answered - started:.2f} s to its 200; searchable in each worker after "
          f"{', '.join(f'{v * 1000:.0f} ms' for v in found_in.values())}")
    # the same bytes again: nothing added, the holder named
    again, atype = upload([("again.png", images[0][1])])
    status, answer, _ = call(srv, "/items", again, atype, key=WRITE_KEY)
    assert status == 200 and answer["added"] == [] and answer["duplicates"][0]["id"] == added[0]["id"]
    status, answer, _ = call(srv, f"/items/{target['id']}", method="DELETE", key=WRITE_KEY)
    assert status == 200 and answer["removed"] == [target["id"]]
    assert not (index / target["path"]).exists(), "a deleted upload's file goes with it"
    seen_by_every_worker(srv, f"/items/{target['id']}", lambda s, a: s == 404)
    assert call(srv, f"/items/{target['id']}", method="DELETE", key=WRITE_KEY)[0] == 404
    checked = run_cli("index", "check", "--index", str(index), check=False)
    assert checked.returncode == 0, checked.stdout


def test_bad_writes_are_4xx_and_change_nothing(setup):
    srv = setup["keyed"]
    index = setup["indexes"]["keyed"]
    before = json.loads((index / "manifest.json").read_text())["generation"]
    cases = [
        (upload([("a.png", png(7)), ("b.png", png(8))], label="x", tags="not json"), "tags are a JSON object"),
        (upload([("broken.png", b"\x89PNG\r\n\x1a\n" + bytes(40))]), "broken.png"),
        (upload([("a.png", png(7))], colour="red"), "unknown field"),
    ]
    for (body, ctype), words in cases:
        status, answer, _ = call(srv, "/items", body, ctype, key=WRITE_KEY)
        assert 400 <= status < 500 and words in answer["error"], answer
    body = json.dumps({"images": [base64.b64encode(png(7)).decode()] * 2, "label": ["a", "b", "c"]}).encode()
    status, answer, _ = call(srv, "/items", body, "application/json", key=WRITE_KEY)
    assert status == 400 and "once per image" in answer["error"]
    assert json.loads((index / "manifest.json").read_text())["generation"] == before


def test_the_same_bytes_twice_in_one_request_are_stored_once(setup):
    srv = setup["keyed"]
    index = setup["indexes"]["keyed"]
    data = png(400)
    body, ctype = upload([("first.png", data), ("second.png", data)])
    status, answer, _ = call(srv, "/items", body, ctype, key=WRITE_KEY)
    assert status == 200 and len(answer["added"]) == 1 and answer["added"][0]["path"].endswith("-first.png")
    assert answer["duplicates"] == [{"image": "image 2 'second.png'", "id": answer["added"][0]["id"]}]
    assert [p.name for p in (index / "uploads").glob("*-second.png")] == []


def test_a_write_waits_for_the_lock_then_answers_409(setup):
    srv = setup["keyed"]
    index = setup["indexes"]["keyed"]
    body, ctype = upload([("locked.png", png(300))])
    with open(index / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # another writer (a CLI add, another server) holds the index
        started = time.monotonic()
        status, answer, _ = call(srv, "/items", body, ctype, key=WRITE_KEY)
        waited = time.monotonic() - started
        fcntl.flock(f, fcntl.LOCK_UN)
    assert status == 409 and "another writer" in answer["error"] and 1.5 < waited < 30
    assert call(srv, "/items", body, ctype, key=WRITE_KEY)[0] == 200, "free again: the same write succeeds"


def test_concurrent_cli_and_http_adds_keep_the_index_consistent(setup, tmp_path):
    srv = setup["keyed"]
    index = setup["indexes"]["keyed"]
    folder = tmp_path / "cli"
    folder.mkdir()
    for i in range(20):
        (folder / f"cli{i}.png").write_bytes(png(1000 + i))
    before = Index.load(index).count
    result: dict = {}
    cli = threading.Thread(target=lambda: result.setdefault("cli", run_cli(
        "index", "add", "--index", str(index), str(folder), "--workers", "0", "--json", check=False)))
    cli.start()
    http_added = 0
    deadline = time.monotonic() + 120
    while cli.is_alive() and time.monotonic() < deadline:
        body, ctype = upload([(f"h{http_added + j}.png", png(2000 + http_added + j)) for j in range(3)])
        status, answer, _ = call(srv, "/items", body, ctype, key=WRITE_KEY)
        assert status in (200, 409), answer
        http_added += len(answer.get("added", []))
    cli.join(60)
    done = result["cli"]
    assert done.returncode == 0, done.stderr
    cli_added = json.loads(done.stdout)["added"]
    idx = Index.load(index)
    assert idx.count == before + cli_added + http_added and cli_added == 20 and http_added > 0
    checked = run_cli("index", "check", "--index", str(index), "--json", check=False)
    assert checked.returncode == 0 and json.loads(checked.stdout)["ok"], checked.stdout


def test_an_index_damaged_while_serving_is_refused_then_served_again(setup, tmp_path):
    srv = setup["keyed"]
    index = setup["indexes"]["keyed"]
    query = setup["digits"][2]
    q, qtype = upload([(query.name, query.read_bytes())])
    (index / "items.sqlite").rename(tmp_path / "items.sqlite")
    try:
        assert call(srv, "/search", q, qtype, key=READ_KEY)[0] == 503  # BentoML words its own 5xx; the log names it
        for path in ("/items/2", "/info", "/items/2/similar", "/thumbnail/2"):
            status, answer, _ = call(srv, path, key=READ_KEY)
            assert status == 503 and "items.sqlite is missing" in answer["error"], (path, answer)
            assert "mae index check" in answer["error"] and str(index) not in answer["error"], "no server paths"
        status, answer, _ = call(srv, "/items", *upload([("x.png", png(77))]), key=WRITE_KEY)
        assert status == 503 and "items.sqlite" in answer["error"]
        assert f"{index}/items.sqlite is missing" in srv.tail(), "the operator's log names the file"
    finally:
        (tmp_path / "items.sqlite").rename(index / "items.sqlite")
    assert call(srv, "/search", q, qtype, key=READ_KEY)[0] == 200


def test_sigkill_during_an_http_add_leaves_the_last_good_generation(setup):
    """The last test of the public server: it is killed (every process) while it adds 64 images."""
    srv = setup["public"]
    index = setup["indexes"]["public"]
    before = Index.load(index).count
    body, ctype = upload([(f"k{i}.png", png(5000 + i)) for i in range(64)])
    outcome: dict = {}

    def add():
        try:
            outcome["status"] = call(srv, "/items", body, ctype, key=WRITE_KEY)[0]
        except OSError as e:
            outcome["error"] = e

    thread = threading.Thread(target=add)
    thread.start()
    import psutil

    tree = [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(recursive=True)]
    time.sleep(float(np.random.default_rng().uniform(0.2, 1.5)))
    for process in tree:  # BentoML's workers have process groups of their own: kill each, as a crash would
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    srv.proc.wait(30)
    psutil.wait_procs(tree[1:], timeout=30)
    thread.join(60)
    idx = Index.load(index)
    assert idx.count in (before, before + 64), idx.count
    if outcome.get("status") == 200:
        assert idx.count == before + 64, "a 200 means committed"
    checked = run_cli("index", "check", "--index", str(index), check=False)
    assert checked.returncode == 0, checked.stdout
    # the next writer carries on from it
    more = Path(setup["tmp"]) / "after"
    more.mkdir(exist_ok=True)
    (more / "after.png").write_bytes(png(9999))
    added = run_cli("index", "add", "--index", str(index), str(more), "--workers", "0", "--json")
    assert json.loads(added.stdout)["count"] == idx.count + 1
