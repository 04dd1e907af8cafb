"""Two ``mae serve`` processes on one Milvus collection, under load: clients mixing /search and POST /items.

Starts a ``milvus-lite server`` process (the stand-in for a Milvus cluster; ``--uri`` names a real server instead),
builds an index of the artifact's embeddings of ``--index-images`` bundled images in a collection on it, starts two
``mae serve --index milvus://...`` processes with a write key, then runs ``--clients`` threads for ``--seconds``:
each request goes to a random server and is a search (multipart image, k=5) or, one time in ``--add-every``, an add
of one new image (a bundled image not in the index, one pixel changed: unique bytes). Afterwards every added item
is looked up through both servers (``GET /items/{id}``) and searched for by its image (the top hit must be the item
itself). Prints the requests, the errors, latency percentiles and throughput per kind, and the found-through-both
counts.

    python bench/milvus_servers.py --artifact demo/artifact                 # 32 clients, 60 s
    python bench/milvus_servers.py --artifact A --uri http://HOST:19530     # a real Milvus server
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WRITE_KEY = "bench-write-key-4c1d9e7a"


def multipart(name: str, data: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "----maebench5f2a"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def call(url: str, body: bytes | None = None, ctype: str | None = None, method: str | None = None,
         timeout: float = 60) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"))
    req.add_header("Authorization", f"Bearer {WRITE_KEY}")
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


class LiteServer:
    def __init__(self, data_dir: Path, port: int) -> None:
        import subprocess

        self.log = data_dir.with_suffix(".log")
        with open(self.log, "wb") as out:  # one worker: milvus-lite takes no concurrent writers to a collection
            self.proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
                                          "--host", "127.0.0.1", "--port", str(port), "--max-workers", "1"],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        from pymilvus import MilvusClient

        for _ in range(600):
            try:
                MilvusClient(f"http://127.0.0.1:{port}", timeout=2, dedicated=True,
                             grpc_options={"grpc.keepalive_time_ms": 300_000}).close()
                return
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.2)
        raise RuntimeError(f"milvus-lite server did not start:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--images", default="mnist5k", help="bundled set: the index and the images clients send")
    p.add_argument("--index-images", type=int, default=1000, help="images indexed before the load starts")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--add-every", type=int, default=4, help="one request in this many is an add")
    p.add_argument("--uri", help="a real Milvus server (http://HOST:19530) instead of a milvus-lite process")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()

    from mae.sources import load_source
    from retrieval.build import build_index
    from serving.command import launch, stop, wait_ready

    source = load_source(args.images)
    with tempfile.TemporaryDirectory(prefix="bench-milvus-servers-") as tmp:
        work = Path(tmp)
        from mae.sources import export_source

        files = export_source(source, work / "images", indices=range(args.index_images))
        others = export_source(source, work / "others", indices=range(args.index_images, len(source)))
        lite = None
        if args.uri:
            host = args.uri.split("://", 1)[-1].rstrip("/")
        else:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            lite = LiteServer(work / "server.db", port)
            host = f"127.0.0.1:{port}"
        spec = f"milvus://{host}/bench_servers_{int(time.time())}"
        servers = []
        try:
            started = time.perf_counter()
            build_index(args.artifact, [work / "images"], spec, workers=0, progress=False)
            print(f"indexed {len(files)} images into {spec} in {time.perf_counter() - started:.1f} s", flush=True)
            keys = work / "keys.txt"
            keys.write_text(f"write {WRITE_KEY} bench\n")
            env = {"MAE_MILVUS_UPLOADS": str(work / "uploads"), "BENTOML_DO_NOT_TRACK": "true"}
            started = time.perf_counter()
            for name in ("a", "b"):
                home = work / f"bentoml-{name}"
                home.mkdir()
                servers.append(launch(args.artifact, spec, extra=["--api-keys", str(keys)], log=work / f"{name}.log",
                                      env={**env, "BENTOML_HOME": str(home)}))
            for (proc, url), name in zip(servers, "ab"):
                wait_ready(proc, url.rstrip("/") + "/", 600, work / f"{name}.log")
            print(f"two servers ready in {time.perf_counter() - started:.1f} s", flush=True)
            urls = [url.rstrip("/") for _, url in servers]
            figures = load(urls, others, args)
            figures.update(check(urls, figures.pop("added_items")))
            report(figures, args)
        finally:
            for proc, _ in servers:
                stop(proc)
            if lite is not None:
                lite.stop()


def load(urls: list[str], images: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """``args.clients`` threads for ``args.seconds``: searches and adds against random servers."""
    order = itertools.count()
    lock = threading.Lock()
    results: list[tuple[str, int, int, float]] = []  # kind, server, status, seconds
    added: list[tuple[int, int, bytes]] = []  # id, server that added it, the image
    deadline = time.monotonic() + args.seconds
    from PIL import Image

    arrays = [np.asarray(Image.open(f).convert("L")) for f in images]

    def client(c: int) -> None:
        rng = random.Random(c)
        n = 0
        while time.monotonic() < deadline:
            server = rng.randrange(len(urls))
            n += 1
            if n % args.add_every == 0:
                with lock:
                    j = next(order)
                arr = arrays[j % len(arrays)].copy()
                arr[j % arr.shape[0], (j // arr.shape[0]) % arr.shape[1]] ^= 1 + j // (arr.shape[0] * arr.shape[1])
                data, kind = png(arr), "add"
                body, ctype = multipart(f"new{j}.png", data, {"label": "added", "tags": json.dumps({"by": str(c)})})
                url = urls[server] + "/items"
            else:
                data, kind = png(arrays[rng.randrange(len(arrays))]), "search"
                body, ctype = multipart("q.png", data, {"k": "5"})
                url = urls[server] + "/search"
            started = time.perf_counter()
            try:
                status, answer = call(url, body, ctype)
            except Exception:  # noqa: BLE001 - a timeout or a dropped connection is an error like a 5xx
                status, answer = 0, None
            seconds = time.perf_counter() - started
            with lock:
                results.append((kind, server, status, seconds))
                if kind == "add" and status == 200:
                    for a in answer["added"]:
                        added.append((a["id"], server, data))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    out: dict[str, Any] = {"clients": args.clients, "seconds": wall, "added_items": added, "kinds": {}}
    for kind in ("search", "add"):
        rows = [r for r in results if r[0] == kind]
        lat = np.asarray([r[3] for r in rows]) * 1000
        errors = [r for r in rows if r[2] != 200]
        out["kinds"][kind] = {"requests": len(rows), "errors": len(errors),
                              "error_statuses": sorted({r[2] for r in errors}), "per_s": len(rows) / wall,
                              "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                              "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
                              "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
                              "by_server": [sum(1 for r in rows if r[1] == s) for s in range(len(urls))]}
    return out


def check(urls: list[str], added: list[tuple[int, int, bytes]]) -> dict[str, Any]:
    """Every added item through both servers: by id, and as the top hit of a search with its own image."""
    by_id = [0] * len(urls)
    by_search = [0] * len(urls)
    for item_id, _, data in added:
        body, ctype = multipart("q.png", data, {"k": "1"})
        for s, url in enumerate(urls):
            status, _ = call(f"{url}/items/{item_id}")
            by_id[s] += status == 200
            status, answer = call(f"{url}/search", body, ctype)
            by_search[s] += status == 200 and answer["neighbours"][0][0]["id"] == item_id
    infos = [call(f"{url}/info")[1]["index"] for url in urls]
    return {"added": len(added), "found_by_id": by_id, "found_by_search": by_search,
            "added_via": [sum(1 for _, s, _ in added if s == i) for i in range(len(urls))],
            "counts": [i["count"] for i in infos], "generations": [i["generation"] for i in infos]}


def report(f: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{f['clients']} clients for {f['seconds']:.0f} s against two servers on one collection")
    print(f"{'kind':<8} {'requests':>8} {'errors':>6} {'per s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'server a / b':>13}")
    for kind, k in f["kinds"].items():
        p = [f"{k[q]:>8.0f}" if k[q] is not None else f"{'-':>8}" for q in ("p50_ms", "p95_ms", "p99_ms")]
        print(f"{kind:<8} {k['requests']:>8} {k['errors']:>6} {k['per_s']:>7.1f} {' '.join(p)} "
              f"{k['by_server'][0]:>6} / {k['by_server'][1]:<6}" + (f" statuses {k['error_statuses']}"
                                                                   if k["errors"] else ""))
    print(f"added {f['added']} items (via a / b: {f['added_via'][0]} / {f['added_via'][1]}); found by id through "
          f"a / b: {f['found_by_id'][0]} / {f['found_by_id'][1]}; top hit of their own image through a / b: "
          f"{f['found_by_search'][0]} / {f['found_by_search'][1]}; count a / b: {f['counts'][0]} / {f['counts'][1]}, "
          f"generation a / b: {f['generations'][0]} / {f['generations'][1]}")
    if args.json:
        Path(args.json).write_text(json.dumps(f, indent=2, default=float))


if __name__ == "__main__":
    main()
