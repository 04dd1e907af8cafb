"""Stage 2, pytest_gpu: ``pytest -m gpu``, every GPU test, each reported with its outcome (skips with their
reasons)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.device.stage import CHILDREN, FAILED, OK, ROOT, Goal, Stage, cell, signal_group

NAME = "pytest_gpu"
BUDGET = (75, 120)
APPENDIX = True
"""One row per test: the listing goes after the figures of every other stage."""


def run(st: Stage) -> None:
    """Every test marked gpu, each reported as it ends (bench/pytest_log.py), so a stage stopped at its budget
    still reports the tests that finished; collection errors elsewhere do not stop the GPU tests that collect."""
    log = st.work / "pytest-gpu.jsonl"
    log.unlink(missing_ok=True)
    timeout = max(10.0, st.left() - 5)
    # Only the files that carry the marker: collecting the whole suite costs ~20 s of imports on a small CPU.
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in f.read_text())
    st.result["files"] = files
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", "-p",
           "bench.pytest_log", "--continue-on-collection-errors"]
    if importlib.util.find_spec("pytest_timeout"):  # a hung test fails alone and its fixtures are torn down
        cmd.append(f"--timeout={int(timeout)}")
    cmd += files
    try:
        with st.item("pytest") as e:
            e["command"] = " ".join(cmd[2:])
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "MAE_PYTEST_LOG": str(log)},
                                    start_new_session=True)
            CHILDREN.append(proc)
            try:
                e["exit_code"] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"pytest -m gpu did not finish in {timeout:.0f} s; the tests that ended are "
                                   "listed") from None
            if e["exit_code"] == 5:
                raise RuntimeError("pytest collected no GPU test")
    finally:
        record_tests(st, log)


def record_tests(st: Stage, log: Path) -> None:
    """One item per test from the plugin's lines: failed (any phase failed), skipped (with the reason), or ok."""
    tests: dict[str, dict[str, Any]] = {}
    lines = log.read_text().splitlines() if log.exists() else []
    for entry in map(json.loads, filter(None, lines)):
        t = tests.setdefault(entry["nodeid"], {"outcome": "passed", "seconds": 0.0})
        t["seconds"] = round(t["seconds"] + entry.get("seconds", 0.0), 2)
        if entry["outcome"] == "failed":
            t.update(outcome="failed" if entry["when"] == "call" else "error", message=entry.get("message", ""))
        elif entry["outcome"] == "skipped" and t["outcome"] == "passed":
            t.update(outcome="skipped", message=entry.get("message", ""))
    counts: dict[str, int] = {}
    for node, t in tests.items():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        key = f"test:{node}"
        if t["outcome"] == "passed":
            st.result["items"][key] = {"status": OK, "outcome": "passed", "seconds": t["seconds"]}
        elif t["outcome"] == "skipped":
            st.skip(key, t["message"] or "skipped (pytest gave no reason)", outcome="skipped")
        else:
            st.result["items"][key] = {"status": FAILED, "outcome": t["outcome"], "error": t["message"][-800:]}
    st.result["counts"] = counts
    st.result["summary"] = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no test reported"
    st.save()



def report(result: dict[str, Any]) -> list[str]:
    tests = {k.removeprefix("test:"): v for k, v in result.get("items", {}).items() if k.startswith("test:")}
    if not tests:
        return []
    lines = ["", f"## pytest -m gpu: {result.get('summary', '')}", "", "| test | outcome | reason / error |",
             "|---|---|---|"]
    for name, v in tests.items():
        lines.append(f"| {name} | {v.get('outcome', v['status'])} | {cell(v.get('reason') or v.get('error') or '')} |")
    return lines



def goals(result: dict[str, Any], dry: bool) -> list[Goal]:
    return []
