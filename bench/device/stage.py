"""The stage protocol: what a stage module is, and what its process gets to record and measure with.

A stage is one module in ``bench/device/stages/``, listed once in ``bench.device.stages.STAGES``. It exports:

- ``NAME``: its name (``--only``, the report's rows, its result file);
- ``BUDGET``: seconds ``(GPU run, dry run)``; a stage also gets what the stages before it left of theirs;
- ``run(st: Stage) -> None``: the work, in its own process; what it proves or measures goes into ``st.result``;
- ``report(result) -> list[str]``: its section of device.md (empty when it measured nothing to show);
- ``goals(result, dry) -> list[Goal]``: the issue goals it measures (``value`` None when it did not);
- optionally ``APPENDIX = True``: its section goes after every other stage's (a long listing).

The harness (``bench.device.harness``) runs ``run`` under a time limit, the report (``bench.device.report``) calls
``report`` and ``goals`` after every stage. Nothing here imports torch: the parent process stays light.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OK, FAILED, SKIPPED, UNAVAILABLE, TIMEOUT = "ok", "failed", "skipped", "not available here", "timeout"
TOY = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
       "model.decoder_depth=1", "model.decoder_num_heads=2"]
"""The dry run's model: the tiny preset (32 px, patch 4) cut to 2 + 1 blocks."""

CHILDREN: list[subprocess.Popen] = []
"""Processes a stage started in their own session: stopped with it (``stop_children``)."""


class Stage:
    """A stage's process: its result (saved after every change, so a stopped stage keeps what it measured),
    its clock and its items. An item is one thing proven or measured, with its own status."""

    def __init__(self, name: str, work: Path, result: Path, dry: bool, timeout: float):
        self.name, self.work, self.path, self.dry, self.timeout = name, work, result, dry, timeout
        self.started = time.monotonic()
        self.result: dict[str, Any] = {"status": "running", "items": {}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.path)

    def left(self) -> float:
        return self.timeout - (time.monotonic() - self.started)

    @contextlib.contextmanager
    def item(self, key: str, **info: Any) -> Iterator[dict[str, Any]]:
        """Record one item: "ok" when its block ends, "failed" (with the error) when it raises; the block may set
        another status (skipped / not available here) with a reason. A failure does not end the stage."""
        entry: dict[str, Any] = {"status": "running", **info}
        self.result["items"][key] = entry
        self.result["progress"] = key
        self.save()
        started = time.perf_counter()
        print(f"[{self.name}] {key} ...", flush=True)
        try:
            yield entry
            if entry["status"] == "running":
                entry["status"] = OK
        except Exception as e:  # noqa: BLE001 - one item's failure is recorded; the stage goes on
            entry["status"] = FAILED
            entry["error"] = f"{type(e).__name__}: {e}"[:3000]
            traceback.print_exc()
        finally:
            entry["seconds"] = round(time.perf_counter() - started, 2)
            print(f"[{self.name}] {key}: {entry['status']} ({entry['seconds']} s)"
                  + (f": {entry.get('reason') or entry.get('error')}" if entry["status"] != OK else ""), flush=True)
            self.save()

    def skip(self, key: str, reason: str, status: str = SKIPPED, **info: Any) -> None:
        self.result["items"][key] = {"status": status, "reason": reason, **info}
        print(f"[{self.name}] {key}: {status}: {reason}", flush=True)
        self.save()

    def finish(self) -> None:
        statuses = [i["status"] for i in self.result["items"].values()]
        if FAILED in statuses:
            self.result["status"] = FAILED
            self.result["error"] = "; ".join(f"{k}: {i.get('error', '')}" for k, i in self.result["items"].items()
                                             if i["status"] == FAILED)[:2000]
        elif statuses and all(s == UNAVAILABLE for s in statuses):
            self.result["status"] = UNAVAILABLE
        else:
            self.result["status"] = OK
        self.save()


@dataclass(frozen=True)
class Goal:
    """A goal of the issue and the figure that judges it (``value`` None: not measured; the report says why)."""

    text: str
    value: float | None
    target: float
    fmt: str = "{:.0f}"
    detail: str = ""
    shown: str | None = None
    """How the report shows the value (default: ``fmt`` applied to it)."""


# ----------------------------------------------------------------------------------------------- helpers


def device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def no_cuda_reason() -> str:
    return "needs a CUDA GPU; torch sees none here (dry run on the CPU)"


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads (a stage, a server, a command and its workers)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_children() -> None:
    """SIGKILL what the stage started and left running (the stage is ending, by its end or by its budget)."""
    for proc in CHILDREN:
        if proc.poll() is None:
            signal_group(proc, signal.SIGKILL)


def popen(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own session from the repository root, output appended to ``log``; stopped with the
    stage."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    CHILDREN.append(proc)
    return proc


def cli_json(argv: list[str], timeout: float, log: Path) -> dict[str, Any]:
    """``python -m cli ARGV --json`` to its end; the JSON object it prints last."""
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cli", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)
        CHILDREN.append(proc)
        try:
            out, _ = proc.communicate(timeout=max(5.0, timeout))
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"mae {argv[0]} did not finish in {timeout:.0f} s; log:\n{tail(log)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"mae {argv[0]} failed ({proc.returncode}):\n{tail(log)}")
    return json.loads(out.strip().splitlines()[-1])


def tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def sig(x: float, digits: int = 4) -> float:
    """Rounded to significant digits: a toy model's MFU on a CPU is 1e-5, not 0."""
    return float(f"{x:.{digits}g}")


def num(value: Any, fmt: str) -> str:
    """A figure for a markdown table ("-" when it was not measured)."""
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def cell(text: Any) -> str:
    """Text for one markdown table cell: pipes escaped, one line, bounded."""
    return str(text).replace("|", "\\|").replace("\n", " ")[:600]
