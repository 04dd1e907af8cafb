"""The folder a training run writes into, one per run (``--out``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mae.config import Config
from mae.dist import Dist
from mae.files import read_json_lines, remove_stale_temporaries, write_bytes_atomic, write_json_atomic

CHECKPOINT = "checkpoint.pt"


class RunDir:
    """A run's folder: checkpoint.pt, config.json, metrics.jsonl and pictures. Only rank 0 writes."""

    def __init__(self, path: str | Path, dist: Dist):
        self.path = Path(path)
        self.dist = dist
        if dist.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            # A run killed mid-write leaves NAME.<random>.tmp beside the file it was replacing; nothing reads them.
            stale = [p for name in (CHECKPOINT, "best.pt", "config.json", "metrics.jsonl")
                     for p in remove_stale_temporaries(self.path / name)]
            if stale:
                print(f"removed {len(stale)} partial file(s) left by an interrupted write: "
                      f"{', '.join(p.name for p in stale)}", file=sys.stderr)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, cfg: Config, extra: dict[str, Any] | None = None) -> None:
        if self.dist.is_main:
            write_json_atomic(self.path / "config.json", {**cfg.to_dict(), **(extra or {})})

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.dist.is_main:
            write_json_atomic(self.path / "summary.json", summary)

    def log(self, row: dict[str, Any]) -> None:
        if self.dist.is_main:
            with self.metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def last_logged(self) -> dict[str, Any]:
        """The last metrics row written (a finished run resumed again trains nothing and reports this)."""
        if not (self.dist.is_main and self.metrics.exists()):
            return {}
        rows = read_json_lines(self.metrics, "metrics log", torn_tail=True)
        return rows[-1] if rows else {}

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines past ``after_step`` (written by a run that died after its last checkpoint)."""
        if self.dist.is_main and self.metrics.exists():
            keep = [row for row in read_json_lines(self.metrics, "metrics log", torn_tail=True)
                    if not isinstance(row, dict) or row.get("step", 0) <= after_step]
            write_bytes_atomic(self.metrics, "".join(json.dumps(row) + "\n" for row in keep).encode())
