"""Stage 1, environment: GPU, driver, torch/CUDA and library versions; the wheels ``bench/device_wheels.sh`` put in
``.whl/`` (bentoml and what it needs that the GPU machine lacks) installed into a site folder every later stage sees;
each optional capability (CUDA, torch.compile, AOTInductor, TensorRT, onnxruntime-gpu, faiss-gpu, bentoml) "ok" or
"not available here" with the reason, never assumed. The harness runs it first, always (``--only`` too)."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.device.stage import ROOT, SKIPPED, UNAVAILABLE, Goal, Stage, cell

NAME = "environment"
BUDGET = (15, 60)


def run(st: Stage) -> None:
    import importlib
    import importlib.metadata

    with st.item("wheels") as e:
        install_wheels(st, e)
    import torch

    facts: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                             "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                             "cuda_available": torch.cuda.is_available()}
    with contextlib.suppress(Exception):
        from mae.hardware import cpu_isa

        facts["cpu"] = cpu_isa()["cpu"]
    if torch.cuda.is_available():
        facts["cudnn"] = torch.backends.cudnn.version()
        facts["gpus"] = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            facts["gpus"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                                  "memory_gib": round(props.total_memory / 2**30, 1),
                                  "multiprocessors": props.multi_processor_count})
        facts["gpu"] = facts["gpus"][0]["name"]
        facts["driver"] = nvidia_smi("driver_version")
    st.result["facts"] = facts
    libs: dict[str, Any] = {}
    for name in ("torchvision", "timm", "transformers", "onnx", "onnxscript", "numpy", "pillow", "scikit-image",
                 "scikit-learn", "pytest"):  # the image's own packages: their versions are enough
        try:
            libs[name] = {"version": importlib.metadata.version(name)}
        except importlib.metadata.PackageNotFoundError:
            libs[name] = {"error": "not installed"}
    for name in ("onnxruntime", "triton", "bentoml", "faiss", "tensorrt", "mlxtend", "aiohttp", "psutil"):
        try:  # optional: whether it imports is the fact
            module = importlib.import_module(name)
            libs[name] = {"version": str(getattr(module, "__version__", "?")),
                          "file": str(getattr(module, "__file__", ""))}
        except Exception as e:  # noqa: BLE001 - a library that does not import is a fact to report
            libs[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    st.result["libraries"] = libs
    capabilities(st, libs)
    gpu = facts.get("gpu", "no GPU")
    st.result["summary"] = (f"{gpu}, driver {facts.get('driver', '-')}, torch {torch.__version__} (CUDA "
                            f"{torch.version.cuda}), Python {facts['python']}, {facts['cores']} cores")


def nvidia_smi(field: str) -> str:
    if not shutil.which("nvidia-smi"):
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def install_wheels(st: Stage, entry: dict[str, Any]) -> None:
    """``.whl/*.whl`` (bench/device_wheels.sh) -> a site folder that every later stage has on its path."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        entry.update(status=SKIPPED, reason="no wheels in .whl/ (bash bench/device_wheels.sh fetches them); "
                                            "bentoml is there only if this Python has it")
        return
    entry["wheels"] = [w.name for w in wheels]
    entry["mib"] = round(sum(w.stat().st_size for w in wheels) / 2**20, 1)
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if here != "cp312" or platform.machine() != "x86_64" or sys.platform != "linux":
        entry.update(status=SKIPPED, reason=f"the wheels are for CPython 3.12 on x86-64 Linux; this is {here} on "
                                            f"{platform.machine()} {sys.platform}: this Python's own packages are used")
        return
    site = Path("/tmp/site") if not st.dry else st.work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--disable-pip-version-check", "--target", str(site), *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, st.left() - 10))
    if done.returncode != 0:
        raise RuntimeError(f"pip install --target {site} failed: {done.stderr.strip()[-1500:]}")
    entry["site"] = str(site)
    st.result["site"] = str(site)
    sys.path.insert(0, str(site))


def capabilities(st: Stage, libs: dict[str, Any]) -> None:
    """Each optional path: "ok" with what was seen, or "not available here" with the reason. Never assumed."""
    import torch

    cuda = torch.cuda.is_available()
    with st.item("cap:cuda") as e:
        if cuda:
            e["detail"] = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
            e["bf16"] = torch.cuda.is_bf16_supported()
        else:
            e.update(status=UNAVAILABLE, reason="torch sees no CUDA GPU")
    with st.item("cap:torch.compile") as e:
        import torch._inductor  # noqa: F401 - the inductor backend imports

        e["detail"] = "inductor backend imports"
        if cuda:
            import triton

            e["detail"] += f", triton {triton.__version__}"
    with st.item("cap:aotinductor") as e:
        from export.inductor import unavailable_reason

        reason = unavailable_reason()
        if reason:
            e.update(status=UNAVAILABLE, reason=reason)
        else:
            e["detail"] = "torch._inductor.aoti_compile_and_package / aoti_load_package"
    with st.item("cap:tensorrt") as e:
        from export.tensorrt import unavailable_reason as trt_reason

        reason = trt_reason()
        if reason:
            e.update(status=UNAVAILABLE, reason=reason)
        else:
            e["detail"] = f"tensorrt {libs['tensorrt'].get('version')}"
    with st.item("cap:onnxruntime-gpu") as e:
        if "error" in libs["onnxruntime"]:
            e.update(status=UNAVAILABLE, reason=f"onnxruntime does not import: {libs['onnxruntime']['error']}")
        else:
            import onnxruntime as ort

            providers = ort.get_available_providers()
            e["providers"] = providers
            if "CUDAExecutionProvider" not in providers:
                e.update(status=UNAVAILABLE, reason=f"onnxruntime {ort.__version__} is the CPU build (providers "
                                                    f"{', '.join(providers)}); onnxruntime-gpu is not installed")
            elif not cuda:
                e.update(status=UNAVAILABLE, reason="onnxruntime has a CUDA provider but there is no GPU")
    with st.item("cap:faiss-gpu") as e:
        if "error" in libs["faiss"]:
            e.update(status=UNAVAILABLE, reason=f"faiss does not import: {libs['faiss']['error']}")
        else:
            import faiss

            gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
            if gpus < 1:
                e.update(status=UNAVAILABLE, reason=f"faiss {faiss.__version__} sees no GPU (the faiss-cpu build, or "
                                                    "no GPU)")
            else:
                e["detail"] = f"faiss {faiss.__version__} on {gpus} GPU(s)"
    with st.item("cap:bentoml") as e:
        if "error" in libs["bentoml"]:
            e.update(status=UNAVAILABLE, reason=f"bentoml does not import: {libs['bentoml']['error']} (carry it: "
                                                "bash bench/device_wheels.sh)")
        else:
            e["detail"] = f"bentoml {libs['bentoml']['version']} from {libs['bentoml']['file']}"




def report(result: dict[str, Any]) -> list[str]:
    items = {k: v for k, v in result.get("items", {}).items() if k.startswith("cap:") or k == "wheels"}
    if not items:
        return []
    lines = ["", "## Environment", "", "| capability | status | detail |", "|---|---|---|"]
    for k, v in items.items():
        detail = v.get("detail") or v.get("reason") or v.get("error") or ""
        if k == "wheels" and v.get("wheels"):
            detail = f"{len(v['wheels'])} wheels, {v.get('mib')} MiB -> {v.get('site', '-')}" + (
                f"; {v['reason']}" if v.get("reason") else "")
        lines.append(f"| {k.removeprefix('cap:')} | {v['status']} | {cell(detail)} |")
    return lines



def goals(result: dict[str, Any], dry: bool) -> list[Goal]:
    return []
