"""``mae serve``: check the artifact and index, then hand over to ``bentoml serve serving.service:MAEService``.

Problems a user can fix (no artifact, a damaged model file, an index built with another model, a port in use) are
reported here as one line, before BentoML starts worker processes that would each fail with a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export.formats import BACKEND_CHOICES, BACKEND_HELP
from mae.errors import UsageError
from mae.flags import add_json_flag
from serving.settings import Limits, Settings

SERVICE = "serving.service:MAEService"
ROOT = Path(__file__).resolve().parents[1]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to ``mae``."""
    p = sub.add_parser("serve", help="serve /embed, /classify, /search and a page to try them (BentoML)")
    add_arguments(p)
    add_json_flag(p)
    p.set_defaults(handler="serving.command:main")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``mae serve`` flags (``register``; tests build a parser of them alone)."""
    d, lim = Settings(), Limits()
    p.add_argument("--artifact", required=True, help="artifact folder (mae export)")
    p.add_argument("--index", help="the index for /search and the page's neighbours: a folder (FAISS, mae index "
                                   "build) or another engine's name (e.g. milvus:PATH.db)")
    p.add_argument("--host", default=d.host,
                   help="address to bind (0.0.0.0 for every interface: see docs/serving.md 'Expose the server')")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--allowed-hosts", default=d.allowed_hosts, metavar="NAMES",
                   help="comma-separated names clients reach the server by (Host header); default: loopback names")
    p.add_argument("--backend", default=d.backend, choices=BACKEND_CHOICES,
                   help=BACKEND_HELP)
    p.add_argument("--no-batching", action="store_true", help="one model call per request (the benchmark baseline)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="most images in one model call")
    p.add_argument("--max-latency-ms", type=int, default=d.max_latency_ms,
                   help="a model call predicted to wait longer than this is shed with a 503")
    p.add_argument("--threads", type=int, default=d.threads, help="model threads on CPU (0: half the cores)")
    p.add_argument("--workers", type=int, default=d.workers, help="front-end processes (HTTP, decoding, search)")
    p.add_argument("--max-images", type=int, default=lim.max_images, help="images per request")
    p.add_argument("--max-image-bytes", type=int, default=lim.max_image_bytes, help="encoded bytes per image")
    p.add_argument("--max-image-pixels", type=int, default=lim.max_image_pixels,
                   help="pixels per image (decompression bombs are refused from the header)")
    p.add_argument("--max-image-side", type=int, default=lim.max_image_side, help="longest side of an image")
    p.add_argument("--max-aspect-ratio", type=int, default=lim.max_aspect_ratio,
                   help="long side / short side of an image (a 100000x1 PNG costs seconds to resize)")
    p.add_argument("--max-request-pixels", type=int, default=lim.max_request_pixels,
                   help="pixels per request, all images together: its decode budget")
    p.add_argument("--max-request-bytes", type=int, default=lim.max_request_bytes, help="multipart body bytes")
    p.add_argument("--max-json-bytes", type=int, default=lim.max_json_bytes,
                   help="JSON body bytes (held in memory whole: send large images as multipart files)")
    g = p.add_argument_group("keys and browsers (serving/auth.py)")
    g.add_argument("--api-keys", metavar="FILE", default=d.api_keys_file,
                   help="API keys, one per line: 'read KEY' or 'write KEY' (writes need a write key; with keys, "
                        "reads need a read key)")
    g.add_argument("--public-read", action="store_true", help="with --api-keys: let reads through without a key")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (https://app.example) whose pages may call the API; repeatable; none: CORS off")
    g.add_argument("--absolute-paths", action="store_true",
                   help="answer absolute server paths instead of paths relative to the indexed folders")


def command_line(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Validate ``args`` and return the ``bentoml serve`` command and its environment.

    The artifact is verified here, weights and every exported file (``export.runtime.verify_artifact``), and the
    backend asked for must be able to run: a model process that cannot load its model is a server that never
    becomes ready, so it is refused before one starts.
    """
    from export.runtime import backend_class, verify_artifact

    artifact = Path(args.artifact).resolve()
    config = verify_artifact(artifact)
    if args.backend != "auto":
        reason = backend_class(args.backend).unavailable(artifact, config, None, None)
        if reason:
            raise UsageError(f"--backend {args.backend} cannot run here: {reason}")
    index = None
    if args.index:
        from retrieval.index import Index, canonical

        index = canonical(args.index)  # a folder made absolute; another engine's name as it is
        Index.open(index, artifact_sha256=config.sha256).close()  # refuses an index of another artifact
    keys = _keys_file(getattr(args, "api_keys", ""))
    origins = [_origin(o) for o in getattr(args, "cors_origin", [])]
    settings = Settings(artifact=str(artifact), index=str(index or ""), backend=args.backend,
                        batching=not args.no_batching, max_batch_size=args.max_batch_size,
                        max_latency_ms=args.max_latency_ms, threads=args.threads, workers=args.workers,
                        api_keys_file=keys, public_read=getattr(args, "public_read", False),
                        cors_origins=",".join(origins), absolute_paths=getattr(args, "absolute_paths", False),
                        host=args.host, allowed_hosts=args.allowed_hosts)
    settings.validate()
    limits = Limits(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                    max_images=args.max_images, max_image_side=args.max_image_side,
                    max_aspect_ratio=args.max_aspect_ratio, max_request_pixels=args.max_request_pixels,
                    max_request_bytes=args.max_request_bytes, max_json_bytes=args.max_json_bytes)
    limits.validate()
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    _check_port(args.host, args.port)
    env = dict(os.environ, **settings.to_env(), **limits.to_env())
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    # bentoml imports serving.service from the working dir; keep the project importable from anywhere.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", args.host, "--port", str(args.port),
           "--working-dir", str(ROOT)]
    return cmd, env


def _keys_file(path: str | None) -> str:
    """The API key file, checked now (a bad line stops ``mae serve`` here, not in every worker)."""
    if not path:
        return ""
    from serving.auth import KeyRing

    KeyRing.load(path)
    return str(Path(path).resolve())


def _origin(value: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
        raise UsageError(f"--cors-origin takes an origin like https://app.example:8443, got {value!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from e


def page_url(host: str, port: int) -> str:
    """The URL that reaches a server bound to ``host`` from this machine (loopback for every-interface binds)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def listening_line(host: str, port: int, allowed_hosts: Sequence[str]) -> str:
    """What the server is bound to, said plainly: every interface is not 'http://127.0.0.1'."""
    import ipaddress

    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    ip = ipaddress.ip_address(host)
    if ip.is_loopback:
        return f"listening on {address} (this machine only)"
    scope = "every interface" if ip.is_unspecified else "a network interface"
    names = "any name" if "*" in allowed_hosts else ", ".join(allowed_hosts)
    return f"listening on {address}, {scope}: reachable from other machines; Host names served: {names}"


def curl_line(url: str, image: str | Path, endpoint: str = "search") -> str:
    return f"curl -s -F images=@{shlex.quote(str(image))} {url}{endpoint}"


def main(args: argparse.Namespace) -> Any:
    cmd, env = command_line(args)
    url = page_url(args.host, args.port)
    allowed = Settings.from_env(env).host_allow_list
    info = {"url": url, "host": args.host, "port": args.port, "allowed_hosts": list(allowed),
            "artifact": env["MAE_ARTIFACT"], "index": env["MAE_INDEX"] or None, "command": shlex.join(cmd)}
    if args.json:
        print(json.dumps(info), flush=True)
    else:
        print(f"mae serve: {listening_line(args.host, args.port, allowed)}", flush=True)
        print(f"mae serve: {url} (page), POST {url}embed | classify | search; stop with Ctrl-C", flush=True)
    os.execvpe(cmd[0], cmd, env)  # BentoML's arbiter takes over this process (and its signals)


def start(artifact: str | Path, index: str | Path | None = None, host: str = "127.0.0.1", port: int | None = None,
          extra: list[str] | None = None, log: Path | None = None, timeout: float = 300.0,
          env: dict[str, str] | None = None):
    """Start ``mae serve`` in the background and wait until it is ready; returns (process, page URL)."""
    proc, url = launch(artifact, index, host, port, extra, log, env)
    wait_ready(proc, url, timeout, log)
    return proc, url


def launch(artifact: str | Path, index: str | Path | None = None, host: str = "127.0.0.1", port: int | None = None,
           extra: list[str] | None = None, log: Path | None = None, env: dict[str, str] | None = None):
    """Start ``mae serve`` in its own process group without waiting; returns (process, page URL).

    For ``mae demo``, the tests and the benchmark: a free port is picked when ``port`` is None or taken; ``env``
    adds variables; output goes to ``log`` (appended) when given. Stop it with ``stop(process)``.
    """
    import subprocess

    if port is None or not _port_free(host, port):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cli", "serve", "--artifact", str(artifact), "--host", host, "--port", str(port)]
    cmd += ["--index", str(index)] if index else []
    cmd += list(extra or [])
    environ = dict(os.environ, **(env or {}))
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    out = open(log, "ab") if log else None  # noqa: SIM115 - the child has its own copy; closed below
    try:
        proc = subprocess.Popen(cmd, env=environ, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
    finally:
        if out:
            out.close()
    return proc, page_url(host, port)


def wait_ready(proc, url: str, timeout: float = 300.0, log: Path | None = None) -> None:
    """Poll BentoML's /readyz until the server (front and encoder) answers 200; stop it and raise if it never does."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mae serve exited with status {proc.returncode}" + (f"; see {log}" if log else ""))
        try:
            with urllib.request.urlopen(url + "readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"mae serve was not ready after {timeout:.0f} s" + (f"; see {log}" if log else ""))


def stop(proc) -> None:
    """Stop a server from ``start`` (BentoML's arbiter stops its workers on SIGTERM).

    The workers run in process groups of their own, so when the arbiter does not finish in time, they are killed
    one by one with it rather than left orphaned.
    """
    import signal
    import subprocess

    import psutil

    if proc.poll() is None:
        try:
            workers = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            workers = []
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


def _port_free(host: str, port: int) -> bool:
    try:
        _check_port(host, port)
    except OSError:
        return False
    return True
