"""Shared fixtures: tiny configs and runs that keep the suite fast on a 2-core CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder listings are cached under $MAE_CACHE_DIR (default ~/.cache/mae): keep the tests' own out of the home.
os.environ.setdefault("MAE_CACHE_DIR", tempfile.mkdtemp(prefix="mae-test-cache-"))

# A very small MAE: 32x32 inputs, patch 4 (64 patches), one or two blocks.
TINY = [
    "model.embed_dim=64", "model.depth=2", "model.num_heads=2",
    "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
    "optim.batch_size=16", "data.num_workers=0", "run.log_every=2", "run.vis_every=1000", "run.ckpt_every=1000",
]


def tiny_config(*extra: str):
    from mae.config import get_preset

    return get_preset("mae_vit_tiny_patch4_32").override([*TINY, *extra])


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600
            ) -> subprocess.CompletedProcess:
    """Run ``python -m cli ARGS`` as a user would, from the repository root."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mae {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


DAMAGES = ("truncated", "zero", "garbage", "deleted")


def damage(file: Path, how: str) -> None:
    """Damage a file the ways disks, copies and people do: cut in half, zeroed to 0 bytes, overwritten with random
    bytes of the same length, or deleted."""
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "zero":
        file.write_bytes(b"")
    elif how == "garbage":
        import numpy as np

        file.write_bytes(np.random.default_rng(len(data)).bytes(len(data)))
    elif how == "deleted":
        file.unlink()
    else:
        raise ValueError(f"unknown damage {how!r}; one of {DAMAGES}")


def tiny_sets(*extra: str) -> list[str]:
    """``--set`` arguments for the tiny config."""
    out = []
    for item in [*TINY, *extra]:
        out += ["--set", item]
    return out


@pytest.fixture(scope="session")
def tiny_pretrain_run(tmp_path_factory) -> Path:
    """A finished 6-step pretraining run of the tiny model on mnist5k (shared by tests that need a checkpoint)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_cli("pretrain", "--data", "mnist5k", "--out", str(out), "--steps", "6", *tiny_sets())
    return out
