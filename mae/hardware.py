"""What this CPU can do: the vector extensions that decide bf16 training and int8 inference speed.

One reader of ``/proc/cpuinfo`` for the whole project (training picks bf16 autocast from it, export picks int8
settings, benchmarks print it beside their figures).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

# flag in /proc/cpuinfo -> the name people know it by
_NAMED_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                ("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"))


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[frozenset[str], str]:
    flags: frozenset[str] = frozenset()
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not flags and line.startswith("flags"):
                flags = frozenset(line.split(":", 1)[1].split())
            elif not model and line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if flags and model:
                break
    return flags, model


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags (empty where /proc/cpuinfo cannot be read)."""
    return _cpuinfo()[0]


def has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run several times faster than fp32 there; elsewhere bf16 is emulated."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def has_vnni() -> bool:
    """u8 x s8 dot products without int16 saturation (AVX-512 VNNI, AVX-VNNI or AMX)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (a container's or taskset's limit), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_isa() -> dict[str, Any]:
    """A description for benchmark tables and export records: model name, named extensions, VNNI, cores."""
    flags, model = _cpuinfo()
    names = [name for flag, name in _NAMED_FLAGS if flag in flags]
    return {"isa": " / ".join(names) or "unknown (no /proc/cpuinfo flags)", "vnni": has_vnni(), "cpu": model,
            "cores": usable_cores()}
