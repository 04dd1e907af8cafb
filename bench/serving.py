"""Serving benchmark: adaptive batching on vs off (the named baseline), at 1, 8, 32 and 64 concurrent clients.

Starts ``mae serve`` twice on loopback (``--no-batching``, then the default), sends the same one-image
multipart ``POST /embed`` from N concurrent keep-alive clients for a fixed time per level, and prints:

- requests/s, p50 and p99 latency and errors per level and mode, and the on/off throughput ratio;
- where a request's time goes (from the server's own /metrics): decode (parse + decode + preprocess), queue
  (waiting for the encoder, transfer included, minus the model time), model (the backend call each image was in),
  and the mean number of images per model call;
- resident memory of the server's processes before and after a soak (default 2 minutes at 32 clients, batching on).

Client and server share the machine's cores (and on shared machines, other people's work): compare ratios
measured in one run, not absolute figures across runs.

    python bench/serving.py                       # tiny random-weight artifact of the demo preset
    python bench/serving.py --artifact demo/artifact --seconds 20 --soak-seconds 120
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = ("mae_decode_seconds", "mae_encoder_call_seconds", "mae_model_batch_seconds", "mae_model_batch_images")


def tiny_artifact(out: Path) -> Path:
    """A random-weight artifact of the tiny preset (32x32, patch 4, depth 6): speed does not depend on training."""
    from mae import artifact
    from mae.config import get_preset

    return artifact.from_random_init(out, get_preset("mae_vit_tiny_patch4_32"))


def payload() -> tuple[bytes, str]:
    """One 64x64 RGB PNG as a multipart body: decoded, resized and normalised by the server on every request."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    boundary = "benchboundary9f3"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Server:
    """``mae serve`` on a free loopback port (``serving.command``), in its own process group."""

    def __init__(self, artifact: Path, batching: bool, args: argparse.Namespace, log: Path):
        from serving.command import launch, wait_ready

        extra = ["--max-batch-size", str(args.max_batch_size), "--threads", str(args.threads),
                 "--backend", args.backend] + ([] if batching else ["--no-batching"])
        # A private BENTOML_HOME: BentoML wipes $BENTOML_HOME/prometheus_multiproc_dir when a server starts, which
        # would erase the other server's /metrics.
        env = {"BENTOML_HOME": str(log.parent / f"bentoml-home-{log.stem}"), "BENTOML_DO_NOT_TRACK": "true"}
        self.proc, url = launch(artifact, extra=extra, log=log, env=env)
        self.url = url.rstrip("/")
        wait_ready(self.proc, url, 300, log)

    def rss_mb(self) -> float:
        """Resident memory of the server and every process it started (arbiter, front, encoder)."""
        import psutil

        root = psutil.Process(self.proc.pid)
        procs = [root] + root.children(recursive=True)
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total / 2**20

    def metrics(self) -> dict[str, tuple[float, float]]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        out = {}
        for name in METRICS:
            sums = [float(m) for m in re.findall(rf"^{name}_sum(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)]
            counts = [float(m) for m in re.findall(rf"^{name}_count(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)]
            out[name] = (sum(sums), sum(counts))
        image_seconds = re.findall(r"^mae_model_image_seconds_total(?:{[^}]*})? (\S+)$", text, re.MULTILINE)
        out["mae_model_image_seconds"] = (sum(map(float, image_seconds)), 0.0)
        return out

    def stop(self) -> None:
        from serving.command import stop

        stop(self.proc)


async def load(url: str, body: bytes, ctype: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` concurrent keep-alive clients, each sending one request after another for ``seconds``."""
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=120)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:

        async def client() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    async with session.post(url + "/embed", data=body, headers={"Content-Type": ctype}) as r:
                        answer = await r.read()
                        if r.status != 200 or b'"embeddings"' not in answer:
                            errors.append(f"{r.status}: {answer[:120]!r}")
                            continue
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    errors.append(repr(e))
                    continue
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    return {"latencies": latencies, "errors": errors, "seconds": elapsed}


@contextlib.contextmanager
def sampled(measure: Callable[[], float], every: float) -> Iterator[list[tuple[float, float]]]:
    """Call ``measure`` every ``every`` seconds in a thread while the block runs: [(seconds, value), ...]."""
    import threading

    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    start = time.perf_counter()

    def run() -> None:
        while not stop.wait(every):
            samples.append((time.perf_counter() - start, measure()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def soak_errors(results: dict[str, Any]) -> int:
    return results["on"].get("soak", {}).get("errors", 0)


def summarise(clients: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput and latency percentiles over every run of one (mode, clients) cell."""
    latencies = sorted(x for r in runs for x in r["latencies"])
    errors = [e for r in runs for e in r["errors"]]
    elapsed = sum(r["seconds"] for r in runs)

    def pick(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else 0.0

    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "seconds": elapsed,
            "rps": len(latencies) / elapsed, "p50_ms": pick(0.50), "p99_ms": pick(0.99),
            "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else 0.0, "first_errors": errors[:3]}


def breakdown(deltas: list[dict[str, float]]) -> dict[str, float]:
    """Per-request means (ms) from summed differences of /metrics scrapes."""
    total = {k: sum(d[k] for d in deltas) for k in deltas[0]}
    n = max(total["mae_decode_seconds_count"], 1)
    images = max(total["mae_model_batch_images_sum"], 1)
    model_ms = total["mae_model_image_seconds_sum"] / images * 1e3  # the model call each image was in, averaged
    return {"decode_ms": total["mae_decode_seconds_sum"] / n * 1e3,
            "queue_ms": total["mae_encoder_call_seconds_sum"] / n * 1e3 - model_ms, "model_ms": model_ms,
            "images_per_call": images / max(total["mae_model_batch_images_count"], 1)}


def delta(before: dict, after: dict) -> dict[str, float]:
    out = {}
    for name in after:
        out[f"{name}_sum"] = after[name][0] - before[name][0]
        out[f"{name}_count"] = after[name][1] - before[name][1]
    return out


def measure(servers: dict[str, Server], args: argparse.Namespace, body: bytes, ctype: str) -> dict[str, Any]:
    """Every level, both modes, in alternating rounds (off, on, on, off, ...) so that drifting load from others on
    the machine falls on both modes alike."""
    results: dict[str, Any] = {mode: {"batching": mode == "on", "levels": []} for mode in servers}
    for clients in args.clients:
        runs: dict[str, list] = {mode: [] for mode in servers}
        deltas: dict[str, list] = {mode: [] for mode in servers}
        for r in range(args.rounds):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                server = servers[mode]
                before = server.metrics()
                runs[mode].append(asyncio.run(load(server.url, body, ctype, clients, args.seconds / args.rounds)))
                deltas[mode].append(delta(before, server.metrics()))
        for mode in servers:
            level = summarise(clients, runs[mode])
            level.update(breakdown(deltas[mode]))
            results[mode]["levels"].append(level)
            print(f"  batching {mode:>3}  {clients:>3} clients  {level['rps']:7.1f} req/s  p50 "
                  f"{level['p50_ms']:7.1f} ms  p99 {level['p99_ms']:7.1f} ms  errors {level['errors']}", flush=True)
    return results


def table(off: dict, on: dict) -> str:
    rows = ["| clients | off req/s | on req/s | on/off | off p50 / p99 ms | on p50 / p99 ms | errors off / on |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(off["levels"], on["levels"]):
        rows.append(f"| {a['clients']} | {a['rps']:.1f} | {b['rps']:.1f} | {b['rps'] / max(a['rps'], 1e-9):.2f}x | "
                    f"{a['p50_ms']:.1f} / {a['p99_ms']:.1f} | {b['p50_ms']:.1f} / {b['p99_ms']:.1f} | "
                    f"{a['errors']} / {b['errors']} |")
    rows += ["", "Where a request's time goes (server-side means, ms; queue includes the hop to the encoder):", "",
             "| clients | batching | decode | queue | model | images per model call |",
             "|---:|---|---:|---:|---:|---:|"]
    for mode in (off, on):
        for lvl in mode["levels"]:
            rows.append(f"| {lvl['clients']} | {'on' if mode['batching'] else 'off'} | {lvl['decode_ms']:.1f} | "
                        f"{lvl['queue_ms']:.1f} | {lvl['model_ms']:.1f} | {lvl['images_per_call']:.1f} |")
    if "soak" in on:
        s = on["soak"]
        rows += ["", f"Soak (batching on, {s['clients']} clients, {s['seconds']:.0f} s, {s['requests']} requests, "
                     f"{s['errors']} errors, {s['rps']:.1f} req/s): resident memory {s['rss_before_mb']:.0f} MiB "
                     f"before, {s['rss_after_mb']:.0f} MiB after ({s['rss_after_mb'] - s['rss_before_mb']:+.0f} MiB; "
                     f"{s['rss_second_half_growth_mb']:+.0f} MiB over the second half: warm-up growth levels off, "
                     "a leak does not)."]
        rows += [f"  soak error: {e}" for e in s.get("first_errors", [])]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", help="artifact to serve (default: a random-weight artifact of the tiny preset)")
    p.add_argument("--clients", default="1,8,32,64", help="comma-separated concurrency levels")
    p.add_argument("--seconds", type=float, default=12.0, help="load time per level and mode (split over rounds)")
    p.add_argument("--rounds", type=int, default=4, help="alternating off/on rounds per level")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="model threads (mae serve --threads; 0: half the cores)")
    p.add_argument("--backend", default="auto", help="mae serve --backend")
    p.add_argument("--onnx", action="store_true", help="export the artifact to ONNX first (a copy when --artifact)")
    p.add_argument("--soak-seconds", type=float, default=120.0, help="memory soak with batching on (0 skips it)")
    p.add_argument("--soak-clients", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "serving.json"), help="results as JSON")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    if not 0 < args.seconds <= 600 or not 0 <= args.soak_seconds <= 1800 or max(args.clients) > 256 \
            or not 1 <= args.rounds <= 20:
        p.error("keep it bounded: --seconds in (0, 600], --soak-seconds in [0, 1800], at most 256 clients, "
                "1 to 20 rounds")
    body, ctype = payload()
    with tempfile.TemporaryDirectory(prefix="mae-bench-serving-") as tmp:
        logs = Path(tmp)
        artifact = Path(args.artifact) if args.artifact else tiny_artifact(logs / "artifact")
        if args.onnx and args.artifact:  # never write into the user's artifact
            artifact = Path(shutil.copytree(artifact, logs / "artifact"))
        if args.onnx and not (artifact / "encoder.onnx").exists():
            from export.onnx import export_onnx

            print(f"exporting {artifact} to ONNX (what `mae export --onnx` writes; auto then runs onnxruntime)")
            export_onnx(artifact, parity_images=32)
        print(f"serving {artifact} on 127.0.0.1; {os.cpu_count()} cores shared by client and server", flush=True)
        servers: dict[str, Server] = {}
        try:
            for mode in ("off", "on"):
                servers[mode] = Server(artifact, mode == "on", args, logs / f"server-{mode}.log")
            for server in servers.values():  # first calls, and BentoML's batch-size training
                asyncio.run(load(server.url, body, ctype, 4, 3.0))
            with urllib.request.urlopen(servers["on"].url + "/info", timeout=30) as r:
                backend = json.load(r)["backend"]
            print(f"backend: {backend['backend']}, {backend['threads']} model thread(s)", flush=True)
            results = measure(servers, args, body, ctype)
            servers.pop("off").stop()  # the soak measures the product configuration alone
            if args.soak_seconds > 0:
                on = servers["on"]
                rss_before = on.rss_mb()
                with sampled(on.rss_mb, args.soak_seconds / 10) as rss:
                    soak = asyncio.run(load(on.url, body, ctype, args.soak_clients, args.soak_seconds))
                half = [mb for t, mb in rss if t >= args.soak_seconds / 2] or [on.rss_mb()]
                results["on"]["soak"] = {"seconds": args.soak_seconds, "clients": args.soak_clients,
                                         "rss_before_mb": rss_before, "rss_after_mb": on.rss_mb(),
                                         "rss_second_half_growth_mb": half[-1] - half[0],
                                         "rss_samples": [[round(t, 1), round(mb, 1)] for t, mb in rss],
                                         "requests": len(soak["latencies"]), "errors": len(soak["errors"]),
                                         "first_errors": soak["errors"][:3],
                                         "rps": len(soak["latencies"]) / soak["seconds"]}
            if any(lvl["errors"] for mode in results.values() for lvl in mode["levels"]) or soak_errors(results):
                kept = Path(args.out).with_suffix(".logs")  # the server logs say why; the temp folder goes
                skip = shutil.ignore_patterns("artifact", "bentoml-home-*")
                shutil.copytree(logs, kept, dirs_exist_ok=True, ignore=skip)
                print(f"errors: server logs kept in {kept}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    off, on = results["off"], results["on"]
    report = table(off, on)
    print(f"\nAdaptive batching on vs off (baseline: off), one 64x64 PNG per POST /embed, backend "
          f"{backend['backend']} with {backend['threads']} model thread(s), max batch {args.max_batch_size}\n")
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"off": off, "on": on, "backend": backend, "args": vars(args)}, indent=2))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
