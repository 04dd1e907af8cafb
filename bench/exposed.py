"""Exposure benchmark (issue 21): what hostile filters and near-duplicate scans cost the other clients.

Starts ``mae serve`` on loopback (one worker) over an index of scikit-learn's 1,797 digits, then measures:

1. **where**: the time to answer a ``--where-kb`` KB ``where`` (runs of spaces after a tag name: the input the old
   filter expression was quadratic in) in a multipart form, a JSON body and a query string; and the median of a
   good ``POST /embed`` idle (the baseline) and beside 2 clients sending those filters in a loop: the ratio.
2. **duplicates**: one ``GET /duplicates`` scan against one ``POST /search`` (medians); and the median of a good
   ``/search`` idle (the baseline) and beside 2 clients asking ``/duplicates`` with a new threshold each time: the
   ratio, and how those clients were answered.

Client and server share the machine's cores: compare ratios measured in one run, not absolute figures across
runs or machines. Run it from another checkout (``python OTHER/bench/exposed.py``) to measure that code.

    python bench/exposed.py                       # 64 KB filters, 10 s per loaded measurement
    python bench/exposed.py --where-kb 8          # what an old server answers in seconds rather than minutes
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def send(url: str, body: bytes | None = None, ctype: str | None = None, timeout: float = 600) -> int:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code
    except OSError:
        return 0


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    started = time.perf_counter()
    status = fn()
    return time.perf_counter() - started, status


def median_latency(fn: Callable[[], int], seconds: float, at_least: int = 5) -> float:
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or len(times) < at_least:
        dt, status = timed(fn)
        if status != 200:
            raise RuntimeError(f"a good request was answered {status}")
        times.append(dt)
    return statistics.median(times)


def _loop(load: Callable[[int], int], c: int, rate: float, stop: Any, answers: Any) -> None:
    i = 0
    counts: Counter = Counter()
    next_at = time.monotonic()
    while not stop.is_set():
        counts[load(c * 1_000_000 + i)] += 1
        i += 1
        if rate > 0:
            next_at += 1 / rate
            stop.wait(max(0.0, next_at - time.monotonic()))
    answers.put(counts)


def beside(load: Callable[[int], int], clients: int, rate: float, measure: Callable[[], float]
           ) -> tuple[float, Counter]:
    """``measure()`` while ``clients`` processes (not threads: they would take the measuring thread's GIL) call
    ``load(i)``, each ``rate`` times a second (0: back to back); i counts each client's calls."""
    ctx = multiprocessing.get_context("fork")
    stop, answers = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_loop, args=(load, c, rate, stop, answers), daemon=True) for c in range(clients)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.5)  # the load is under way
        figure = measure()
        stop.set()
        return figure, sum((answers.get(timeout=120) for _ in procs), Counter())
    finally:
        stop.set()
        for p in procs:
            p.join(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--where-kb", type=int, default=64, help="size of the hostile filters (default 64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per loaded measurement (default 10)")
    parser.add_argument("--rate", type=float, default=10.0, help="requests a second from each of the 2 hostile "
                        "clients (default 10; 0: back to back, a flood that any endpoint would feel)")
    parser.add_argument("--keep", help="folder to build the index in and keep (default: a temporary one)")
    args = parser.parse_args()

    from serving.command import launch, stop, wait_ready
    from tests.serving_support import build_index, export_digits, multipart, tiny_artifact

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-exposed-"))
    artifact = work / "artifact"
    if not (artifact / "config.json").exists():
        tiny_artifact(artifact, labels=[str(i) for i in range(10)])
    if not (work / "index").exists():
        export_digits(work / "digits", 1797)
        build_index(artifact, work / "digits", work / "index")
    image = sorted((work / "digits").rglob("*.png"))[0].read_bytes()
    proc, url = launch(artifact, work / "index", log=work / "server.log")
    url = url.rstrip("/")
    try:
        wait_ready(proc, url + "/", 300, work / "server.log")
        hostile = "tag.a" + " " * (args.where_kb * 1024 - 6) + "x"
        b64 = base64.b64encode(image).decode()
        forms: dict[str, Callable[[], int]] = {
            "multipart": lambda: send(url + "/search", *multipart([("images", "a.png", image, "image/png")],
                                                                  {"where": hostile})),
            "JSON": lambda: send(url + "/search", json.dumps({"images": [b64], "where": [hostile]}).encode(),
                                 "application/json"),
            "query string": lambda: send(url + "/items/1/similar?" + urllib.parse.urlencode({"where": hostile})),
        }
        embed_body = multipart([("images", "a.png", image, "image/png")])
        search_body = multipart([("images", "a.png", image, "image/png")], {"k": "10"})

        def embed() -> int:
            return send(url + "/embed", *embed_body)

        def search() -> int:
            return send(url + "/search", *search_body)

        rate = f"{args.rate:g}/s each" if args.rate > 0 else "back to back"
        print(f"exposure benchmark: {ROOT}, one worker, index of 1,797 digits; {args.seconds:g} s per measurement")
        print(f"\n{args.where_kb} KB where         status   seconds")
        for name, fn in forms.items():
            dt, status = timed(fn)
            print(f"  {name:<18} {status:>6}   {dt:8.3f}")
        idle = median_latency(embed, args.seconds)
        busy, answers = beside(lambda i: list(forms.values())[i % 3](), 2, args.rate,
                               lambda: median_latency(embed, args.seconds))
        print(f"\n/embed p50 idle (baseline) {1000 * idle:.1f} ms; beside 2 clients sending them ({rate}) "
              f"{1000 * busy:.1f} ms: {busy / idle:.2f}x  (their answers: {dict(answers)})")

        scan, status = timed(lambda: send(url + "/duplicates?threshold=0.95"))
        one_search = median_latency(search, 2)
        print(f"\n/duplicates scan {1000 * scan:.1f} ms ({status}); /search p50 {1000 * one_search:.1f} ms: "
              f"a scan costs {scan / one_search:.1f} searches")
        idle = median_latency(search, args.seconds)
        busy, answers = beside(lambda i: send(url + f"/duplicates?threshold={0.9 + (i % 99_991) * 1e-6:.6f}"), 2,
                               args.rate, lambda: median_latency(search, args.seconds))
        print(f"/search p50 idle (baseline) {1000 * idle:.1f} ms; beside 2 clients asking /duplicates with a new "
              f"threshold each time ({rate}) {1000 * busy:.1f} ms: {busy / idle:.2f}x  (their answers: "
              f"{dict(answers)})")
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
