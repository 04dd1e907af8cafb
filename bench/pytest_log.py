"""A pytest plugin for bench/device/ (its pytest_gpu stage): one JSON line per test phase outcome, appended as each
one ends.

Why not JUnit XML: pytest writes that file only when the session ends, so a run stopped at its time budget would
report nothing, not even the tests that had finished. Loaded with ``-p bench.pytest_log``; writes to the file
named by ``MAE_PYTEST_LOG`` (does nothing without it).
"""

from __future__ import annotations

import json
import os
from typing import Any


def _write(entry: dict[str, Any]) -> None:
    path = os.environ.get("MAE_PYTEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def pytest_runtest_logreport(report: Any) -> None:
    if report.when != "call" and report.outcome == "passed":
        return  # a passing setup or teardown says nothing the call does not
    entry = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
             "seconds": round(report.duration, 2)}
    if report.skipped and isinstance(report.longrepr, tuple):
        entry["message"] = str(report.longrepr[2]).removeprefix("Skipped: ")
    elif report.failed:
        entry["message"] = report.longreprtext[-1500:]
    _write(entry)


def pytest_collectreport(report: Any) -> None:
    """A module that fails to import, or skips itself whole (``pytest.importorskip`` at the top), is reported
    here, not per test: say so, or a GPU module skipped for a missing library would vanish from the report."""
    if report.failed:
        _write({"nodeid": report.nodeid, "when": "collect", "outcome": "failed",
                "message": report.longreprtext[-1500:]})
    elif report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longreprtext
        _write({"nodeid": report.nodeid, "when": "collect", "outcome": "skipped",
                "message": str(reason).removeprefix("Skipped: ")})
