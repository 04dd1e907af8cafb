"""THE onnxruntime settings of this project: every session (export checks, Embedder, benchmarks) is made here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mae.errors import UsageError
from mae.hardware import usable_cores


def session_options(threads: int | None = None) -> Any:
    """Session options for a process that shares its cores.

    Why: an embedder shares its cores with a server, image decoding and DataLoader workers. onnxruntime's
    worker threads spin-wait for work by default, which on shared cores stole CPU from everything else and
    slowed it by up to 3x here; with spinning off, idle threads sleep. Intra-op threads = the cores this
    process may use, or ``threads`` / ``MAE_ORT_THREADS``; one inter-op thread, since the graph is a chain.
    """
    import onnxruntime as ort

    env = os.environ.get("MAE_ORT_THREADS")
    if threads is None and env:
        if not env.strip().isdigit():
            raise UsageError(f"MAE_ORT_THREADS must be a whole number of threads, got {env!r}")
        threads = int(env)
    if threads is None:
        threads = usable_cores()
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise to users
    return so


def cpu_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime session on the CPU provider with ``session_options``."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
