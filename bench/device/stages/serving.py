"""Stage 8, serving: ``mae serve`` on the GPU (torch backend), ``POST /embed`` from 32 clients, batching off vs on.
Needs bentoml and aiohttp (the GPU machine gets them from the wheels ``bench/device_wheels.sh`` carries)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from typing import Any

from bench.device.stage import CHILDREN, UNAVAILABLE, Goal, Stage, no_cuda_reason, signal_group

NAME = "serving"
BUDGET = (40, 150)


def run(st: Stage) -> None:
    import argparse as ap
    import asyncio
    import importlib.util
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    missing = [m for m in ("bentoml", "aiohttp") if importlib.util.find_spec(m) is None]
    if missing:
        st.skip("serve", f"{' and '.join(missing)} not installed here (carry the wheels: bash "
                         "bench/device_wheels.sh, then run again)", status=UNAVAILABLE)
        st.result["summary"] = f"not available here: no {', '.join(missing)}"
        return
    import torch

    from bench.serving import Server, load, measure, payload
    from mae import artifact
    from mae.config import get_preset

    cuda = torch.cuda.is_available()
    cfg = get_preset("mae_vit_tiny_patch4_32").override(["model.depth=1"]) if st.dry else get_preset(
        "mae_vit_base_patch16")
    opts = ap.Namespace(max_batch_size=32, threads=1 if st.dry else 0, backend="torch", clients=[32],
                        rounds=2, seconds=4.0 if st.dry else 12.0)
    st.result.update(model="toy ViT (32 px, 1 block)" if st.dry else "ViT-B/16", clients=32,
                     max_batch_size=opts.max_batch_size, backend=opts.backend)
    path = st.work / "serve-artifact"
    shutil.rmtree(path, ignore_errors=True)
    artifact.from_random_init(path, cfg)
    body, ctype = payload()
    servers: dict[str, Any] = {}
    try:
        with st.item("start") as e:
            started = time.perf_counter()
            with ThreadPoolExecutor(2) as pool:  # both start at once: each takes seconds
                futures = {mode: pool.submit(Server, path, mode == "on", opts, st.work / f"server-{mode}.log")
                           for mode in ("off", "on")}
                for mode, f in futures.items():
                    servers[mode] = f.result()
                    CHILDREN.append(servers[mode].proc)
            e["ready_s"] = round(time.perf_counter() - started, 1)
            for server in servers.values():  # first calls: CUDA context, kernels, BentoML's batch-size training
                asyncio.run(load(server.url, body, ctype, 4, 2.0))
            with urllib.request.urlopen(servers["on"].url + "/info", timeout=30) as r:
                e["backend"] = json.load(r)["backend"]
            if cuda and "cuda" not in json.dumps(e["backend"]).lower():
                raise RuntimeError(f"the server's encoder is not on the GPU: {e['backend']}")
        with st.item("load") as e:
            results = measure(servers, opts, body, ctype)
            off, on = results["off"]["levels"][0], results["on"]["levels"][0]
            keep = ("rps", "p50_ms", "p99_ms", "errors", "requests", "images_per_call", "model_ms", "queue_ms",
                    "decode_ms", "first_errors")
            st.result["levels"] = {"off": {k: off.get(k) for k in keep}, "on": {k: on.get(k) for k in keep}}
            st.result["on_over_off"] = round(on["rps"] / max(off["rps"], 1e-9), 3)
            st.result["errors"] = int(off["errors"] + on["errors"])
            e.update(on_over_off=st.result["on_over_off"], errors=st.result["errors"])
            if st.result["errors"]:
                raise RuntimeError(f"{st.result['errors']} failed requests: {off['first_errors'] + on['first_errors']}")
    finally:
        started = time.perf_counter()
        # Together, and bounded: the front worker of `mae serve` was seen ignoring SIGTERM for 30 s and more here
        # (an idle server), and its arbiter waits for it; the run cannot spare that.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda server: stop_server(server.proc, min(5.0, max(1.0, st.left() - 3))),
                          servers.values()))
        st.result["stop_s"] = round(time.perf_counter() - started, 1)
    lv = st.result.get("levels", {})
    st.result["summary"] = (f"32 clients: off {lv.get('off', {}).get('rps', 0):.0f} req/s, on "
                            f"{lv.get('on', {}).get('rps', 0):.0f} req/s ({st.result.get('on_over_off')}x), "
                            f"{st.result.get('errors')} errors")
    if not cuda:
        st.skip("gpu_encoder", no_cuda_reason() + ": the encoder ran on the CPU")


def stop_server(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM a ``mae serve`` process group, then SIGKILL whatever of it (and of BentoML's workers, which run in
    process groups of their own) is left after ``grace`` seconds."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    signal_group(proc, signal.SIGTERM)
    for p in family[1:]:  # the workers too: waiting for the arbiter to stop them one by one took 20 s and more
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def report(result: dict[str, Any]) -> list[str]:
    lv = result.get("levels")
    if not lv:
        return []
    lines = ["", f"## Serving ({result.get('model')}, backend {result.get('backend')}, POST /embed, 32 clients)", "",
             "| batching | req/s | p50 ms | p99 ms | images per model call | errors |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode in ("off", "on"):
        v = lv[mode]
        lines.append(f"| {mode} | {v['rps']:.1f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
                     f"{v.get('images_per_call') or 0:.1f} | {v['errors']} |")
    lines.append(f"\non / off: {result.get('on_over_off')}x")
    return lines


def goals(result: dict[str, Any], dry: bool) -> list[Goal]:
    errors = result.get("errors")
    return [Goal("serving: batching on >= 5x off at 32 clients", result.get("on_over_off"), 5.0, "{:.2f}x"),
            Goal("serving: 0 errors", None if errors is None else -float(errors), 0.0,
                 shown=None if errors is None else f"{errors} errors")]
