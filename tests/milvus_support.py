"""Milvus for the tests: one ``milvus-lite server`` process shared by the session (the stand-in for a Milvus
cluster), and index names on it or on a real server (``MAE_MILVUS_URI``).

milvus-lite takes no concurrent writers to one collection, so the server runs with one worker thread: requests are
answered one at a time, as the README tells users to start it.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


class LiteServer:
    """``milvus-lite server`` on a free loopback port, in its own process group."""

    def __init__(self, data_dir: Path | None = None) -> None:
        from tests.serving_support import free_port

        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="milvus-lite-")
        self.data_dir = Path(data_dir or self._tmp.name) / "server.db"
        self.port = free_port()
        self.log = self.data_dir.with_suffix(".log")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
                 "--port", str(self.port), "--max-workers", "1"], stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.uri = f"milvus://127.0.0.1:{self.port}"
        self._wait()

    def _wait(self, timeout: float = 120) -> None:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited:\n{self.log.read_text()[-3000:]}")
            try:
                MilvusClient(f"http://127.0.0.1:{self.port}", timeout=2, dedicated=True,
                             grpc_options={"grpc.keepalive_time_ms": 300_000}).close()
                return
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def spec(self, hint: str = "") -> str:
        """A fresh collection's index name on this server."""
        return f"{self.uri}/{collection_name(hint)}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()


_shared: LiteServer | None = None


def need_milvus_lite() -> None:
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")


def shared_server() -> LiteServer:
    """The session's milvus-lite server, started on first use and stopped at exit."""
    global _shared
    need_milvus_lite()
    if _shared is None:
        _shared = LiteServer()
        atexit.register(_shared.stop)
    return _shared


def collection_name(hint: str = "") -> str:
    base = re.sub(r"[^A-Za-z0-9_]+", "_", hint)[-40:].strip("_") or "t"
    return f"t_{base}_{secrets.token_hex(3)}"


def lite_spec(tmp: Path) -> str:
    """A fresh collection on the shared milvus-lite server (for ``ENGINE_SPECS``)."""
    return shared_server().spec(tmp.name)


def real_spec(tmp: Path) -> str:
    """A fresh collection on the real Milvus server ``MAE_MILVUS_URI`` names (http://HOST:PORT); skipped without."""
    uri = os.environ.get("MAE_MILVUS_URI")
    if not uri:
        pytest.skip("MAE_MILVUS_URI is not set (http://HOST:19530 of a Milvus server to test against)")
    pytest.importorskip("pymilvus")
    host = re.sub(r"^(https?|tcp|milvus)://", "", uri).rstrip("/")
    return f"milvus://{host}/{collection_name(tmp.name)}"
