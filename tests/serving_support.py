"""Helpers for the serving tests: tiny artifacts and a real server started the way a user starts it.

Not in conftest.py: only test_serving.py and test_page.py use these.
"""

from __future__ import annotations

import json
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tests.conftest import run_cli

if TYPE_CHECKING:
    import subprocess

    import psutil


def tiny_artifact(out: Path, labels: list[str] | None = None, depth: int = 1, seed: int = 0) -> Path:
    """A random-weight artifact of the tiny preset (32x32, patch 4); with ``labels``, avg pooling + fc_norm + head."""
    from mae import artifact
    from mae.config import get_preset

    cfg = get_preset("mae_vit_tiny_patch4_32").override([f"model.depth={depth}"])
    return artifact.from_random_init(out, cfg, labels=labels, seed=seed, head_std=0.2)  # spread logits: real top-k


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mae serve`` in a subprocess on a free loopback port (``serving.command.start``), stopped as a whole."""

    def __init__(self, artifact: Path, index: Path | None = None, log: Path | None = None,
                 extra: Sequence[str] = (), env: dict[str, str] | None = None):
        self.artifact, self.index, self.log, self.extra = artifact, index, log, list(extra)
        # Each server its own BENTOML_HOME: BentoML keeps /metrics in $BENTOML_HOME/prometheus_multiproc_dir and
        # wipes it when a server starts, so two servers on one machine would otherwise erase each other's metrics.
        self._home = tempfile.TemporaryDirectory(prefix="bentoml-home-")
        from serving.command import launch

        self.proc, url = launch(artifact, index, port=free_port(), extra=self.extra, log=log,
                                env={"BENTOML_HOME": self._home.name, "BENTOML_DO_NOT_TRACK": "true", **(env or {})})
        self.url = url.rstrip("/")

    def wait_ready(self, timeout: float = 240.0) -> None:
        from serving.command import wait_ready

        try:
            wait_ready(self.proc, self.url + "/", timeout, self.log)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.tail()}") from e

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log and self.log.exists() else ""

    def stop(self) -> None:
        from serving.command import stop

        stop(self.proc)
        self._home.cleanup()


def request(url: str, body: bytes | None = None, content_type: str | None = None, method: str | None = None,
            timeout: float = 60, headers: dict[str, str] | None = None, with_headers: bool = False):
    """(status, body) of one HTTP request, errors included (``headers`` may replace Host too); (status, body,
    headers) with ``with_headers``."""
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"))
    if content_type:
        req.add_header("Content-Type", content_type)
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            answer = r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        answer = e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}
    return answer if with_headers else answer[:2]


def post_json(url: str, payload: object) -> tuple[int, object]:
    status, body = request(url, json.dumps(payload).encode(), "application/json")
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body.decode(errors="replace")


def multipart(files: list[tuple[str, str, bytes, str]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body from (field, filename, bytes, content type) parts; returns (body, content type)."""
    boundary = "----maeboundary7d41f3"
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for field, filename, data, ctype in files:
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n").encode()
        parts.append(head + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def build_index(artifact: Path, images: Path, out: Path) -> Path:
    """``mae index build`` over a folder, the way the README tells users to."""
    done = run_cli("index", "build", "--artifact", str(artifact), "--images", str(images), "--out", str(out),
                   check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mae index build failed:\n{done.stdout}\n{done.stderr}")
    return out


def front_process(server: Server | subprocess.Popen) -> psutil.Process:
    """The front worker of a server (the BentoML process that parses, decodes and answers HTTP)."""
    import psutil

    proc = server.proc if isinstance(server, Server) else server
    for child in psutil.Process(proc.pid).children(recursive=True):
        if "--service-name mae " in " ".join(child.cmdline()) + " ":
            return child
    raise LookupError("no front worker under the server process")


def model_process(server: Server | subprocess.Popen) -> psutil.Process:
    """The model worker of a server (BentoML's mae-encoder service)."""
    import psutil

    proc = server.proc if isinstance(server, Server) else server
    for child in psutil.Process(proc.pid).children(recursive=True):
        if "--service-name mae-encoder" in " ".join(child.cmdline()):
            return child
    raise LookupError("no model worker under the server process")


def export_digits(out: Path, limit: int) -> list[Path]:
    """``limit`` of scikit-learn's 8x8 digits as PNG files in class folders (a small labelled collection)."""
    done = run_cli("data", "export", "--data", "digits", "--out", str(out), "--limit", str(limit), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mae data export failed:\n{done.stderr}")
    return sorted(out.rglob("*.png"))


def error_message(body: object) -> str:
    """The message of an error answer, which must be the object {"error": message[, "detail": ...]}."""
    assert isinstance(body, dict) and "error" in body, f"not an error object: {body!r}"
    return str(body["error"]) + (f" {body['detail']}" if body.get("detail") else "")
