"""One prepared GPU run that proves training, embedding and serving on one GPU machine, in at most 8 minutes.

    python -m bench.device OUT              # on the GPU machine (bench/device.sh OUT installs nothing else)
    python -m bench.device OUT --dry-run    # every stage at toy size on a CPU (~3 minutes on 2 cores)
    python -m bench.device OUT --only embed,serving    # a second run of some stages (environment always runs)

Why one script: GPU machines come rarely and in windows of ~15 minutes, start included; whoever gets one must
prove everything in one call, and the call must have been rehearsed. Each stage runs in its own process with a
time budget (``BUDGETS``); a stage that raises is recorded and the next one runs, one that hangs is stopped
at its budget (SIGTERM, then SIGKILL) with what it had measured kept, and a stage that would start past the
run's deadline is skipped with that reason. ``OUT/device.json`` (everything), ``OUT/device.md`` (tables)
and ``OUT/device.log`` (every stage's output) are rewritten after each stage, so a run cut short still
leaves its report.

Stages, in order:

1. environment: GPU, driver, torch/CUDA, library versions; installs the wheels ``bench/device_wheels.sh``
   put in ``.whl/`` (bentoml and what it needs that the GPU machine lacks) into a site folder every later
   stage sees; each optional capability (CUDA, torch.compile, AOTInductor, TensorRT, onnxruntime-gpu,
   faiss-gpu, bentoml) is "ok" or "not available here" with the reason, never assumed.
2. pytest_gpu: ``pytest -m gpu``, every GPU test, each reported with its outcome (skips with their reasons).
3. pretrain_step: one training step (forward, backward, fused AdamW) of ViT-B/16 and ViT-L/16 at 224 px, bf16,
   ours eager / regionally compiled / fully compiled against Hugging Face ``ViTMAEForPreTraining`` of the same
   size, batch and precision; img/s, step time, peak memory, TFLOP/s and MFU (analytic FLOPs:
   ``bench.pretrain.analytic_step_flops``; against the measured bf16 matmul peak and, where known, the
   datasheet peak).
4. pretrain_loop: ``mae pretrain`` of ViT-B/16 on generated photo-sized JPEGs (500x375, cut from
   scikit-image's photographs): loop img/s over step img/s (what the data path and the loop cost), the data
   path alone, then SIGKILL after the first checkpoint and ``--resume``, which must continue from it.
5. finetune: ``mae finetune`` of that checkpoint for 100 steps (bf16 autocast, layer decay, mixup/cutmix).
6. embed: ViT-B/16 embedding at batch 1 / 32 / 256: torch eager bf16, torch.compile, and the AOTInductor
   package (``mae export --inductor``: parity on real images first), on device tensors and through
   ``Embedder.run`` (numpy in and out); onnxruntime on the CPU as the reference row.
7. serving: ``mae serve`` on the GPU (torch backend), ``POST /embed`` from 32 clients, batching off vs on.

``--dry-run`` runs all of it at toy size on the CPU: tiny ViTs, a handful of steps, small images. What needs
CUDA is skipped by name with the reason; torch.compile uses the ``aot_eager`` backend there (the same
dynamo and AOTAutograd tracing, without inductor's C++ build, which costs ~1 minute per graph on 2 cores),
while the AOTInductor package is really compiled (for the CPU). Goals are judged on the GPU only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGES = ("environment", "pytest_gpu", "pretrain_step", "pretrain_loop", "finetune", "embed", "serving")
BUDGETS = {  # seconds: (GPU run, dry run). The GPU column sums to the run's 470 s; a stage also gets the time
    # the stages before it left of theirs (``stage_timeout``), so the compile-heavy late stages gain from fast
    # early ones, and every stage keeps at least its own budget.
    "environment": (15, 60),
    "pytest_gpu": (75, 120),
    "pretrain_step": (130, 90),
    "pretrain_loop": (65, 90),
    "finetune": (35, 60),
    "embed": (110, 150),
    "serving": (40, 150),
}
RUN_BUDGET = {"gpu": 470.0, "dry": 720.0}
REPORT_RESERVE_S = 5.0  # kept back from the deadline for the last report
MIN_STAGE_S = 10.0  # a stage with less than this left is skipped rather than started
TERM_GRACE_S = 10.0  # after SIGTERM, time a stage has to stop its servers and save what it measured
NOMINAL_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4}
"""Dense bf16 datasheet peaks (SXM parts), by a substring of torch's device name: the usual MFU denominator."""
TOY = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
       "model.decoder_depth=1", "model.decoder_num_heads=2"]
"""The dry run's model: the tiny preset (32 px, patch 4) cut to 2 + 1 blocks."""
OK, FAILED, SKIPPED, UNAVAILABLE, TIMEOUT = "ok", "failed", "skipped", "not available here", "timeout"

_CHILDREN: list[subprocess.Popen] = []  # processes a stage started in their own session: stopped with it


# =============================================================================================== the parent


def stage_command(name: str, work: Path, result: Path, dry: bool, timeout: float) -> list[str]:
    cmd = [sys.executable, "-m", "bench.device", "--stage", name, "--work", str(work), "--result", str(result),
           "--stage-timeout", f"{timeout:.0f}"]
    return cmd + (["--dry-run"] if dry else [])


def child_env(site: str | None, dry: bool) -> dict[str, str]:
    """What every stage runs with: the project (and the carried wheels) importable, nothing reaching a network.

    Dry runs use one intra-op thread per process: on a small shared CPU, multi-threaded torch next to other
    processes (DataLoader workers, servers, other people's work) slowed steps 10-40x here (OpenMP barriers
    wait for the slowest thread).
    """
    path = [p for p in (site, str(ROOT), os.environ.get("PYTHONPATH")) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false"}
    if dry:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_stage(name: str, cmd: list[str], env: dict[str, str], timeout: float, result_file: Path, log: Path
              ) -> dict[str, Any]:
    """Run one stage's process for at most ``timeout`` s; its record: status, seconds, what it measured."""
    result_file.unlink(missing_ok=True)
    started = time.monotonic()
    timed_out = False
    with open(log, "ab") as f:
        f.write(f"\n===== {name} ({dt.datetime.now().isoformat(timespec='seconds')}, budget {timeout:.0f} s)"
                f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc, signal.SIGTERM)  # the stage stops its servers and saves what it has
            try:
                rc = proc.wait(TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                rc = proc.wait()
    seconds = time.monotonic() - started
    try:
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
    except json.JSONDecodeError:
        result = {}
    stage = {"name": name, "seconds": round(seconds, 1), "budget_s": round(timeout), "exit_code": rc,
             "result": result}
    if timed_out:
        stage["status"] = TIMEOUT
        stage["error"] = (f"stopped at its budget of {timeout:.0f} s; what it measured before is kept "
                          f"(last step: {result.get('progress', 'none recorded')})")
    elif rc != 0:
        stage["status"] = FAILED
        stage["error"] = result.get("error") or f"the stage process exited with status {rc}; see device.log"
    else:
        stage["status"] = result.get("status", FAILED)
        if "status" not in result:
            stage["error"] = "the stage process wrote no result; see device.log"
        elif result.get("error"):
            stage["error"] = result["error"]
    return stage


def stage_timeout(name: str, bank: float, left: float, dry: bool) -> float:
    """Its own budget plus what earlier stages left of theirs (``bank``), within the run's deadline. Since the
    budgets sum to at most the run's, this never eats into the budget of a later stage."""
    return min(left, BUDGETS[name][dry] + max(0.0, bank))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="folder for device.json, device.md and device.log")
    p.add_argument("--dry-run", action="store_true", help="every stage at toy size on the CPU")
    p.add_argument("--only", help=f"comma-separated stages to run after environment (of {', '.join(STAGES)})")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default 470 on a GPU, 720 dry)")
    p.add_argument("--work", help="folder for runs, artifacts and images (default: a temporary one, removed)")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # a stage's own process
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--stage-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        return stage_main(args)
    if not args.out:
        p.error("OUT is required")
    selected = list(STAGES)
    if args.only:
        wanted = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = wanted - set(STAGES)
        if unknown:
            p.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
        selected = [s for s in STAGES if s in wanted or s == "environment"]
    mode = "dry" if args.dry_run else "gpu"
    budget = args.budget or RUN_BUDGET[mode]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mae-device-"))
    work.mkdir(parents=True, exist_ok=True)
    log = out / "device.log"
    log.write_bytes(b"")
    started = time.monotonic()
    deadline = started + budget
    command = "python -m bench.device " + " ".join(sys.argv[1:] if argv is None else argv)
    record: dict[str, Any] = {"mode": "dry-run" if args.dry_run else "gpu", "started": _now(), "budget_s": budget,
                              "command": command, "stages": []}
    site = None
    bank = 0.0
    try:
        for name in selected:
            left = deadline - time.monotonic() - REPORT_RESERVE_S
            timeout = stage_timeout(name, bank, left, mode == "dry")
            if timeout < MIN_STAGE_S:
                stage = {"name": name, "status": SKIPPED, "seconds": 0.0, "budget_s": 0, "result": {},
                         "reason": f"out of time: {max(left, 0):.0f} s left of the run's {budget:.0f} s"}
            else:
                print(f"[device] {name}: up to {timeout:.0f} s ...", file=sys.stderr, flush=True)
                stage = run_stage(name, stage_command(name, work, work / f"{name}.json", args.dry_run, timeout),
                                  child_env(site, args.dry_run), timeout, work / f"{name}.json", log)
            bank += BUDGETS[name][mode == "dry"] - stage["seconds"]
            if name == "environment":
                site = stage["result"].get("site")
            print(f"[device] {name}: {stage['status']} in {stage['seconds']} s", file=sys.stderr, flush=True)
            record["stages"].append(stage)
            record["seconds"] = round(time.monotonic() - started, 1)
            record["goals"] = judge_goals(record)
            write_reports(out, record)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"[device] wrote {out / 'device.json'} and {out / 'device.md'} in {record['seconds']} s", file=sys.stderr)
    return 0 if all(s["status"] in (OK, SKIPPED, UNAVAILABLE) for s in record["stages"]) else 1


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


# =============================================================================================== a stage


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


def stage_main(args: argparse.Namespace) -> int:
    st = Stage(args.stage, Path(args.work), Path(args.result), args.dry_run, args.stage_timeout)

    def stop(signum: int, frame: Any) -> None:  # the parent's budget ran out: stop children, keep results
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    st.save()
    try:
        STAGE_FUNCTIONS[args.stage](st)
        st.finish()
        return 0
    except BaseException as e:  # noqa: BLE001 - the stage failed as a whole: say why in its result
        st.result["status"] = FAILED
        st.result["error"] = f"{type(e).__name__}: {e}"[:3000]
        st.save()
        traceback.print_exc()
        return 1
    finally:
        for proc in _CHILDREN:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)


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


# =============================================================================================== environment


def stage_environment(st: Stage) -> None:
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


# =============================================================================================== pytest -m gpu


def stage_pytest_gpu(st: Stage) -> None:
    """Every test marked gpu, each reported as it ends (bench/pytest_log.py), so a stage stopped at its budget
    still reports the tests that finished; collection errors elsewhere do not stop the GPU tests that collect."""
    import importlib.util

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
            _CHILDREN.append(proc)
            try:
                e["exit_code"] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
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


# =============================================================================================== pretraining step


def stage_pretrain_step(st: Stage) -> None:
    """Ours (eager, regionally compiled, fully compiled) against Hugging Face ViTMAE, per model; partial rows are
    saved as they come, eager rows first, so a budget cut costs the compiled rows, not the baseline."""
    import torch

    from bench.pretrain import (
        Candidate,
        analytic_step_flops,
        bench_candidates,
        hf_loss,
        hf_model,
        matmul_peak,
        ours_loss,
        step_flops,
    )
    from mae.config import get_preset
    from mae.model import MaskedAutoencoder

    dev = device()
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    if st.dry:
        models = [("toy ViT (32 px, 2+1 blocks)", get_preset("mae_vit_tiny_patch4_32").override(TOY).model, 8)]
        steps, rounds, backend, warmup = 2, 2, "aot_eager", 2
    else:
        models = [("ViT-B/16", get_preset("mae_vit_base_patch16").model, 256),
                  ("ViT-L/16", get_preset("mae_vit_large_patch16").model, 256)]
        steps, rounds, backend, warmup = 5, 3, "inductor", 3
    st.result.update(rows=[], precision="bf16 autocast", compile_backend=backend)
    if st.dry:
        st.result["compile_note"] = ("torch.compile rows use the aot_eager backend in the dry run (dynamo + "
                                     "AOTAutograd without inductor's C++ build); inductor on the GPU")
    with st.item("matmul_peak") as e:
        # A CPU without native bf16 emulates bf16 matmuls slowly while autocast may still reach fp32 kernels:
        # there the better of the two rates is the denominator (MFU over 100% otherwise).
        peak = matmul_peak(dev, dtype) if cuda else max(matmul_peak(dev, dtype), matmul_peak(dev, torch.float32))
        st.result["measured_peak_flops"] = peak
        e["tflops"] = st.result["measured_peak_tflops"] = round(peak / 1e12, 3)
        name = torch.cuda.get_device_name(0) if cuda else ""
        nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
        st.result["nominal_peak_tflops"] = nominal
    peak = st.result.get("measured_peak_flops")
    nominal = st.result.get("nominal_peak_tflops")
    with st.item("flop_formula_check") as e:  # the analytic count against torch's counter, attention unfused
        cfg = models[0][1]
        e["counter_over_analytic"] = round(step_flops(cfg, 2, dev, fused_attention=False)
                                           / analytic_step_flops(cfg, 2), 4)
    hf_ips: dict[str, float] = {}

    def add_rows(label: str, cfg: Any, batch: int, cands: list[Candidate]) -> None:
        flops = analytic_step_flops(cfg, batch)
        for c in cands:
            ips = c.median()
            impl = c.name
            if impl == "hf":
                hf_ips[label] = ips
            row = {"model": label, "impl": impl, "batch": batch, "precision": "bf16", "images_per_s": round(ips, 1),
                   "step_ms": round(batch / ips * 1e3, 2), "vs_hf": round(ips / hf_ips[label], 3)
                   if label in hf_ips else None, "gflop_per_image": round(flops / batch / 1e9, 2),
                   "tflops": _sig(flops * ips / batch / 1e12),
                   "mfu_measured_peak": _sig(flops * ips / batch / peak) if peak else None,
                   "mfu_nominal_peak": _sig(flops * ips / batch / (nominal * 1e12)) if nominal else None,
                   "peak_memory_gib": round(c.peak_bytes / 2**30, 2) if c.peak_bytes is not None else None,
                   "warmup_s": round(c.warmup_seconds, 1)}
            st.result["rows"].append(row)
        st.save()

    def candidate(name: str, cfg: Any, compile: bool | str = False) -> Callable[[], Candidate]:
        def make() -> Candidate:
            torch.manual_seed(0)
            with torch.device(dev):  # initialise on the device: ViT-L's init on the CPU alone takes seconds
                model = hf_model(cfg) if name == "hf" else MaskedAutoencoder(cfg)
            loss = hf_loss if name == "hf" else ours_loss
            return Candidate(name, model, loss, dev, dtype, compile=compile, backend=backend)

        return make

    phases = [("eager", [("hf", False), ("ours", False)]), ("regional", [("ours-compiled-regional", "regional")]),
              ("full", [("ours-compiled", True)])]
    for phase, impls in phases:
        for label, cfg, batch in models:
            key = f"{label} {phase}"
            if st.left() < 15:
                st.skip(key, f"out of this stage's time ({st.left():.0f} s left)")
                continue
            try:
                with st.item(key, model=label, batch=batch):
                    x = torch.randn(batch, cfg.in_chans, *cfg.img_size, device=dev)
                    cands = bench_candidates([(n, candidate(n, cfg, c)) for n, c in impls], x, steps, rounds,
                                             warmup)
                    add_rows(label, cfg, batch, cands)
            finally:  # models, optimiser states and compiled graphs go before the next model is built
                cands = x = None
                free_memory()
    best = {}
    for r in st.result["rows"]:
        if r["impl"] != "hf" and r["images_per_s"] > best.get(r["model"], {}).get("images_per_s", 0):
            best[r["model"]] = r
    st.result["summary"] = "; ".join(f"{m}: {r['images_per_s']:.0f} img/s ({r['impl']}, {r['vs_hf']}x HF)"
                                     for m, r in best.items()) or "no rows"


# =============================================================================================== pretraining loop


def photo_folder(work: Path, dry: bool) -> Path:
    """Photo-like JPEGs in class folders: crops of scikit-image's photographs, resized to 500x375 (or 375x500),
    flipped and brightness-jittered, saved at quality 90. Real image content, so decoding costs what photos
    cost (noise JPEGs would be larger and slower). Made once per work folder."""
    out = work / ("jpegs-dry" if dry else "jpegs")
    done = out / ".done"
    if done.exists():
        return out
    count, size, classes = (48, (100, 75), 4) if dry else (4000, (500, 375), 8)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, i, size, classes) for i in range(count)]
    workers = 1 if dry else max(1, min(14, (os.cpu_count() or 2) - 2))
    if workers == 1:
        for job in jobs:
            _write_jpeg(job)
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(_write_jpeg, jobs, chunksize=64)
    done.write_text(str(count))
    return out


_PHOTOS: list[Any] = []


def _write_jpeg(job: tuple[Path, int, tuple[int, int], int]) -> None:
    import numpy as np
    from PIL import Image

    from mae.sources import load_source

    out, i, (w, h), classes = job
    if not _PHOTOS:
        source = load_source("photos")
        _PHOTOS.extend(source.read(k) for k in range(len(source)))
    rng = np.random.default_rng(i)
    k = i % len(_PHOTOS)
    arr = _PHOTOS[k]
    im = Image.fromarray(arr if arr.ndim == 2 or arr.shape[2] in (3, 4) else arr[..., :3]).convert("RGB")
    scale = rng.uniform(0.4, 1.0)
    cw, ch = max(8, int(im.width * scale)), max(8, int(im.height * scale))
    x0, y0 = int(rng.integers(0, im.width - cw + 1)), int(rng.integers(0, im.height - ch + 1))
    size = (w, h) if rng.random() < 0.7 else (h, w)  # mostly landscape, like a photo collection
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im = Image.fromarray(np.clip(np.asarray(im, np.float32) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8))
    folder = out / f"class{k % classes}"
    folder.mkdir(exist_ok=True)
    im.save(folder / f"{i:05d}.jpg", quality=90)


def loop_plan(dry: bool) -> dict[str, Any]:
    """The pretraining run's size: a few hundred ViT-B steps on the GPU; a few dozen toy steps on the CPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    if dry:
        return {"preset": "mae_vit_tiny_patch4_32", "sets": TOY, "batch": 8, "steps": 40, "ckpt_every": 10,
                "log_every": 2, "workers": 1, "model": "toy ViT (32 px, 2+1 blocks)"}
    return {"preset": "mae_vit_base_patch16", "sets": [], "batch": 128, "steps": 240, "ckpt_every": 120,
            "log_every": 10, "workers": max(1, min(14, cores - 2)), "model": "ViT-B/16"}


def stage_pretrain_loop(st: Stage) -> None:
    plan = loop_plan(st.dry)
    st.result["plan"] = plan
    with st.item("images") as e:
        folder = photo_folder(st.work, st.dry)
        files = sorted(folder.rglob("*.jpg"))
        e.update(folder=str(folder), images=len(files), mib=round(sum(f.stat().st_size for f in files) / 2**20, 1))
    run = st.work / "pretrain"
    shutil.rmtree(run, ignore_errors=True)
    args = ["--data", str(folder), "--preset", plan["preset"], "--out", str(run), "--steps", str(plan["steps"]),
            "--batch-size", str(plan["batch"])]
    for s in [*plan["sets"], f"run.ckpt_every={plan['ckpt_every']}", f"run.log_every={plan['log_every']}",
              f"run.vis_every={plan['steps']}", f"data.num_workers={plan['workers']}"]:
        args += ["--set", s]
    st.result["command"] = "mae pretrain " + " ".join(args)

    with st.item("step_reference") as e:  # the same model, batch and precision policy, minus data and loop
        e.update(step_images_per_s=step_reference(plan, st.dry))
        st.result["step_images_per_s"] = e["step_images_per_s"]
    free_memory()
    with st.item("data_path_alone") as e:  # decode + crop in the workers, no model: the data path's ceiling
        e.update(**data_path_rate(folder, plan, seconds=3.0 if not st.dry else 1.0))
        st.result["data_images_per_s"] = e["images_per_s"]
    ckpt_step = None
    with st.item("run_then_sigkill") as e:
        ckpt_step = run_and_kill(st, run, args, plan, e)
    with st.item("resume") as e:
        if ckpt_step is None:
            e.update(status=SKIPPED, reason="no run was killed after a checkpoint (see run_then_sigkill)")
        else:
            summary = cli_json(["pretrain", *args, "--resume", "--json"], st.left() - 5, st.work / "resume.log")
            e.update(resumed_from_step=summary.get("resumed_from_step"), final_step=summary.get("steps"),
                     device=summary.get("device"), seconds=summary.get("seconds"))
            if summary.get("resumed_from_step") != ckpt_step or summary.get("steps") != plan["steps"]:
                raise RuntimeError(f"--resume started at step {summary.get('resumed_from_step')} (checkpoint: "
                                   f"{ckpt_step}) and ended at {summary.get('steps')} (asked: {plan['steps']})")
            steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            if steps != sorted(set(steps)):
                raise RuntimeError(f"metrics.jsonl repeats or reorders steps after the resume: {steps}")
            st.result["checkpoint"] = str(run / "checkpoint.pt")
    with st.item("loop_throughput") as e:
        e.update(**loop_rate(run, plan, ckpt_step))
        st.result["loop_images_per_s"] = e["images_per_s"]
        step = st.result.get("step_images_per_s")
        if step:
            st.result["loop_over_step"] = round(e["images_per_s"] / step, 3)
    r = st.result
    r["summary"] = (f"{plan['model']} batch {plan['batch']}: loop {r.get('loop_images_per_s')} img/s, step "
                    f"{r.get('step_images_per_s')} img/s (ratio {r.get('loop_over_step')}), data path alone "
                    f"{r.get('data_images_per_s')} img/s; killed after checkpoint step {ckpt_step}, resume "
                    f"{r['items'].get('resume', {}).get('status', 'not run')}")


def step_reference(plan: dict[str, Any], dry: bool) -> float:
    """img/s of the bare training step (bench.pretrain.Candidate) at the loop's model, batch and autocast policy."""
    import torch

    from bench.pretrain import Candidate, bench_candidates, ours_loss
    from mae.config import get_preset
    from mae.model import MaskedAutoencoder
    from training.loop import autocast_dtype

    cfg = get_preset(plan["preset"]).override(plan["sets"]).model
    dev = device()
    dtype = autocast_dtype("auto", dev)  # what the loop uses (run.amp=auto)
    x = torch.randn(plan["batch"], cfg.in_chans, *cfg.img_size, device=dev)

    def make() -> Candidate:
        torch.manual_seed(0)
        with torch.device(dev):
            model = MaskedAutoencoder(cfg)
        return Candidate("ours", model, ours_loss, dev, dtype)

    cands = bench_candidates([("ours", make)], x, steps=2 if dry else 10, rounds=2 if dry else 3)
    return round(cands[0].median(), 1)


def data_path_rate(folder: Path, plan: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The pretraining data path alone (the loop's dataset, transform, workers and collate; no model)."""
    import torch

    from mae.config import get_preset
    from mae.datasets import ImageDataset, collate_skipping_bad
    from mae.sources import load_source
    from training.augment import PretrainTransform

    cfg = get_preset(plan["preset"]).override(plan["sets"])
    source = load_source(folder)
    dataset = ImageDataset(source, list(range(len(source))), PretrainTransform(cfg), 0)
    order = [(int(i), 0) for i in torch.randperm(len(source))]  # (index, epoch) keys, as the loop's sampler gives
    loader = torch.utils.data.DataLoader(dataset, batch_size=plan["batch"], sampler=order,
                                         num_workers=plan["workers"], collate_fn=collate_skipping_bad, drop_last=True)
    images, started, first = 0, None, True
    for batch, _, _ in loader:
        if first:  # the workers' start-up is not the path's rate
            started, first = time.perf_counter(), False
            continue
        images += len(batch)
        if time.perf_counter() - started >= seconds:
            break
    elapsed = time.perf_counter() - started if started else 0.0
    return {"images_per_s": round(images / elapsed, 1) if elapsed and images else None, "workers": plan["workers"],
            "images": images}


def run_and_kill(st: Stage, run: Path, args: list[str], plan: dict[str, Any], entry: dict[str, Any]) -> int:
    """Start ``mae pretrain``; once the first checkpoint is written and training has gone past it, SIGKILL the
    process group (the DataLoader workers go too). Returns the checkpoint's step."""
    import torch

    log = st.work / "pretrain-killed.log"
    proc = _popen([sys.executable, "-m", "cli", "pretrain", *args], log)
    ckpt, metrics = run / "checkpoint.pt", run / "metrics.jsonl"
    deadline = time.monotonic() + max(5.0, st.left() * 0.6)  # leave time for the resume
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and metrics.exists():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            seen = max((r["step"] for r in rows), default=0)
            if seen > plan["ckpt_every"]:
                break
        time.sleep(0.02)
    if proc.poll() is not None:
        raise RuntimeError(f"mae pretrain ended (status {proc.returncode}) before it could be killed; "
                           f"tail of its log:\n{_tail(log)}")
    if seen <= plan["ckpt_every"]:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"no checkpoint within the time left (last step logged {seen}); log:\n{_tail(log)}")
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
    step = int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["step"])
    entry.update(killed_after_logged_step=seen, checkpoint_step=step, signal="SIGKILL")
    if step >= plan["steps"]:
        raise RuntimeError(f"the checkpoint is already the final one (step {step}); nothing left to resume")
    return step


def loop_rate(run: Path, plan: dict[str, Any], ckpt_step: int | None) -> dict[str, Any]:
    """The loop's img/s from metrics.jsonl: the median over log windows that are neither a process's first
    (worker start-up, first kernels) nor hold a checkpoint write or the final evaluation."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if not rows:
        raise RuntimeError("metrics.jsonl is empty")
    every, ckpt = plan["log_every"], plan["ckpt_every"]
    firsts = {rows[0]["step"]}  # the killed process's first window
    if ckpt_step is not None:  # the resumed process's (rows past the checkpoint were dropped on resume)
        firsts.add(min((r["step"] for r in rows if r["step"] > ckpt_step), default=-1))

    def saves_in(step: int) -> bool:  # a checkpoint written after logging step k falls in the next window
        return any(k % ckpt == 0 for k in range(max(step - every, 1), step))

    steady = [r for r in rows if r["step"] not in firsts and not saves_in(r["step"]) and "val_loss" not in r]
    used = steady or rows
    return {"images_per_s": round(statistics.median(r["images_per_s"] for r in used), 1),
            "windows": len(used), "windows_all": len(rows), "steady_only": bool(steady),
            "window_steps": every}


def _sig(x: float, digits: int = 4) -> float:
    """Rounded to significant digits: a toy model's MFU on a CPU is 1e-5, not 0."""
    return float(f"{x:.{digits}g}")


def _popen(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN.append(proc)
    return proc


def cli_json(argv: list[str], timeout: float, log: Path) -> dict[str, Any]:
    """``python -m cli ARGV --json`` to its end; the JSON object it prints last."""
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cli", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)
        _CHILDREN.append(proc)
        try:
            out, _ = proc.communicate(timeout=max(5.0, timeout))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"mae {argv[0]} did not finish in {timeout:.0f} s; log:\n{_tail(log)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"mae {argv[0]} failed ({proc.returncode}):\n{_tail(log)}")
    return json.loads(out.strip().splitlines()[-1])


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# =============================================================================================== finetune


def stage_finetune(st: Stage) -> None:
    plan = loop_plan(st.dry)
    steps, batch = (10, 8) if st.dry else (100, 128)
    with st.item("images") as e:
        folder = photo_folder(st.work, st.dry)
        e["folder"] = str(folder)
    with st.item("init") as e:
        init = st.work / "pretrain" / "checkpoint.pt"
        if init.exists():
            e["checkpoint"] = str(init)
            e["source"] = "the pretrain_loop stage's checkpoint"
        else:  # fail alone: a fresh MAE of the same config stands in for the pretraining run
            import torch

            from mae.checkpoint import save_checkpoint
            from mae.config import get_preset
            from mae.model import MaskedAutoencoder

            cfg = get_preset(plan["preset"]).override(plan["sets"])
            init = st.work / "init.pt"
            torch.manual_seed(0)
            save_checkpoint(init, {"model": MaskedAutoencoder(cfg.model).state_dict(), "step": 0, "epoch": 0,
                                   "config": cfg.to_dict()})
            e["checkpoint"] = str(init)
            e["source"] = "random-init MAE (the pretrain_loop stage left no checkpoint)"
    out = st.work / "finetune"
    shutil.rmtree(out, ignore_errors=True)
    args = ["finetune", "--init", str(init), "--data", str(folder), "--out", str(out), "--batch-size", str(batch),
            "--set", f"run.steps={steps}", "--set", "run.log_every=5" if st.dry else "run.log_every=10",
            "--set", f"data.num_workers={plan['workers']}", "--json"]
    st.result["command"] = "mae " + " ".join(args)
    with st.item("finetune") as e:
        summary = cli_json(args, st.left() - 5, st.work / "finetune.log")
        cfg = json.loads((out / "config.json").read_text())
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        ips = [r["images_per_s"] for r in rows if "images_per_s" in r]
        import torch

        from training.loop import autocast_dtype

        amp = autocast_dtype(cfg["run"]["amp"], torch.device(summary["device"].split(":")[0]))
        e.update(steps=summary["steps"], device=summary["device"], seconds=summary["seconds"],
                 val_top1=round(summary["val_top1"], 4) if summary.get("val_top1") is not None else None,
                 autocast=str(amp).replace("torch.", "") if amp else "off",
                 layer_decay=cfg["finetune"]["layer_decay"], mixup=cfg["finetune"]["mixup"],
                 cutmix=cfg["finetune"]["cutmix"], batch=cfg["optim"]["batch_size"],
                 images_per_s=round(statistics.median(ips[1:] or ips), 1) if ips else None)
        if summary["steps"] != steps:
            raise RuntimeError(f"finetune stopped at step {summary['steps']}, asked for {steps}")
        losses = [r["loss"] for r in rows if "loss" in r]
        if not losses or not all(map(_finite, losses)):
            raise RuntimeError(f"finetune losses are not all finite: {losses}")
        st.result.update({k: e[k] for k in ("steps", "autocast", "layer_decay", "mixup", "images_per_s",
                                            "val_top1")})
    r = st.result
    r["summary"] = (f"{r.get('steps')} steps, autocast {r.get('autocast')}, layer decay {r.get('layer_decay')}, "
                    f"mixup {r.get('mixup')}: {r.get('images_per_s')} img/s, val top-1 {r.get('val_top1')}")


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# =============================================================================================== embedding


def stage_embed(st: Stage) -> None:
    """Rows in the order of what matters if the budget runs out: eager and the Embedder's torch backend, the
    AOTInductor package (export + parity, then speed), onnxruntime on the CPU, torch.compile last."""
    import numpy as np
    import torch

    from bench.export import round_robin
    from export.runtime import Embedder
    from mae import artifact
    from mae.config import get_preset

    dev = device()
    cuda = dev.type == "cuda"
    if st.dry:
        cfg, label = get_preset("mae_vit_tiny_patch4_32").override(["model.depth=1"]), "toy ViT (32 px, 1 block)"
        batches: tuple[int, ...] = (1, 8, 32)
        seconds, rounds, compile_backend, max_batch = 0.3, 2, "aot_eager", 32
    else:
        cfg, label, batches = get_preset("mae_vit_base_patch16"), "ViT-B/16", (1, 32, 256)
        seconds, rounds, compile_backend, max_batch = 0.6, 2, "inductor", 256
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 on a CPU without native bf16 would be emulated
    prec = "bf16" if cuda else "fp32"
    st.result.update(model=label, batches=list(batches), rows=[], parity_cos_min={})
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    path = st.work / "embed-artifact"
    shutil.rmtree(path, ignore_errors=True)
    folder = st.work / ("jpegs-dry" if st.dry else "jpegs")
    parity_data = ["photos"] + ([str(folder)] if (folder / ".done").exists() else [])
    pixels: Any = None
    reference: Any = None
    eager_name = f"torch eager {prec}"

    def record(view: str, runners: dict[str, Callable[..., Any]], inputs: dict[int, Any], note: str = "") -> None:
        for batch in batches:
            if batch not in inputs:
                continue
            res = round_robin({k: (lambda fn=fn, x=inputs[batch]: fn(x)) for k, fn in runners.items()}, batch,
                              rounds, seconds, sync)
            for name, r in res.items():
                row = {"view": view, "runner": name, "batch": batch, "images_per_s": round(r["img_s"], 1)}
                base = next((x["images_per_s"] for x in st.result["rows"] if x["runner"] == eager_name
                             and x["batch"] == batch), None)
                if view == "model" and (base or name == eager_name):  # as it comes: a budget cut keeps the ratios
                    row["vs_eager"] = round(row["images_per_s"] / (base or row["images_per_s"]), 3)
                st.result["rows"].append({**row, **({"note": note} if note else {})})
            st.save()

    def parity(name: str, fn: Callable[[Any], Any], on_device: bool) -> None:
        chunks = []
        for i in range(0, len(pixels), 16):
            x = pixels[i : i + 16]
            got = fn(torch.from_numpy(x).to(dev)) if on_device else fn(x)
            chunks.append(got.float().cpu().numpy() if isinstance(got, torch.Tensor) else got)
        got = np.concatenate(chunks)
        cos = (got * reference).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1),
                                                    1e-12)
        st.result["parity_cos_min"][name] = round(float(cos.min()), 6)

    with st.item("artifact") as e:
        artifact.from_random_init(path, cfg)
        art = artifact.load(path)
        from export.parity import reference_images, torch_outputs

        pixels, _, info = reference_images(parity_data, 64, art.preprocessing)
        reference = torch_outputs(art, pixels, tokens=False)["embedding"]
        e.update(parity_images=info["images"], sources=info["sources"])
    real = torch.from_numpy(pixels).to(dev)

    def device_inputs(dtype_: Any) -> dict[int, Any]:
        return {b: real.repeat((b + len(real) - 1) // len(real), 1, 1, 1)[:b].to(dtype_).contiguous() for b in batches}

    host = {b: np.ascontiguousarray(np.resize(pixels, (b, *pixels.shape[1:]))) for b in batches}
    encoder = art.encoder.to(dev, dtype).eval()
    with st.item("torch_eager") as e:

        def eager(x: Any) -> Any:
            with torch.inference_mode():
                return encoder(x.to(dtype))[0]

        parity(eager_name, eager, on_device=True)
        emb_torch = Embedder.load(path, backend="torch", device=str(dev))
        parity(f"Embedder {emb_torch.backend_name}", lambda x: emb_torch.run(x)["embedding"], on_device=False)
        record("model", {eager_name: eager}, device_inputs(torch.float32))
        record("embedder", {f"Embedder {emb_torch.backend_name}": lambda x: emb_torch.run(x)}, host)
        e["backend"] = emb_torch.backend_name
    with st.item("inductor_export") as e:
        from export.inductor import export_inductor

        rec = export_inductor(path, device=str(dev), data=parity_data, parity_images=64, max_batch=max_batch)
        e.update(precision=rec["precision"], device=f"{rec['device_type']} {rec['device_name']}",
                 compile_s=rec["compile_seconds"], passed=rec["passed"], mib=round(rec["bytes"] / 2**20, 1),
                 cos_min=rec["parity"]["embedding"]["cosine_min"],
                 nbr_overlap=rec["parity"]["embedding"].get("top10_neighbour_overlap"))
        st.result["inductor_export"] = {k: e[k] for k in ("precision", "device", "compile_s", "passed", "cos_min")}
    with st.item("inductor_speed") as e:
        if "inductor_export" not in st.result:
            e.update(status=SKIPPED, reason="the package was not exported (see inductor_export)")
        else:
            from export.inductor import FILE, load_package

            package = load_package(path / FILE, dev)
            pkg_name = f"inductor package {rec['precision']}"

            def aoti(x: Any) -> Any:
                with torch.inference_mode():
                    return package(x)[0]

            parity(pkg_name, aoti, on_device=True)
            emb_ind = Embedder.load(path, backend="inductor")
            parity(f"Embedder {emb_ind.backend_name}", lambda x: emb_ind.run(x)["embedding"], on_device=False)
            record("model", {pkg_name: aoti}, device_inputs(torch.float32))
            record("embedder", {f"Embedder {emb_ind.backend_name}": lambda x: emb_ind.run(x)}, host)
            e["backend"] = emb_ind.backend_name
    with st.item("onnxruntime_cpu") as e:  # the reference row: the CPU path every deployment has
        from export.onnx import export_onnx

        # The TorchScript exporter: for fp32 on the CPU its standard-ops graph runs like the dynamo one (fusion
        # matters for encoder.fp16.onnx only) and it exports ViT-B in a fraction of the time.
        export_onnx(path, parity_images=16, data=["photos"], exporter="torchscript")
        emb_ort = Embedder.load(path, backend="onnx", device="cpu")
        parity(f"Embedder {emb_ort.backend_name}", lambda x: emb_ort.run(x)["embedding"], on_device=False)
        cpu_batches = {b: host[b] for b in batches if b <= 32}
        note = "" if len(cpu_batches) == len(batches) else "CPU reference: batches above 32 not timed (seconds a call)"
        record("embedder", {f"Embedder {emb_ort.backend_name}": lambda x: emb_ort.run(x)}, cpu_batches, note)
        e["backend"] = emb_ort.backend_name
        if len(cpu_batches) < len(batches):
            st.skip("onnxruntime_cpu_large_batches", "the CPU reference row is timed at batch 1 and 32 only: a ViT-B "
                                                     "batch of 256 takes seconds a call on the CPU")
    with st.item("torch_compile") as e:
        compiled = torch.compile(encoder, dynamic=True, backend=compile_backend)
        comp_name = f"torch.compile {prec}" + (" (aot_eager)" if compile_backend != "inductor" else "")

        def comp(x: Any) -> Any:
            with torch.inference_mode():
                return compiled(x.to(dtype))[0]

        started = time.perf_counter()
        parity(comp_name, comp, on_device=True)
        e["first_calls_s"] = round(time.perf_counter() - started, 1)
        record("model", {comp_name: comp}, device_inputs(torch.float32))
    top = max(batches)
    best = [r for r in st.result["rows"] if r["view"] == "model" and r["batch"] == top]
    st.result["summary"] = f"{label} batch {top}: " + ", ".join(
        f"{r['runner']} {r['images_per_s']:.0f} img/s ({r.get('vs_eager', '-')}x)" for r in best)
    if not cuda:
        st.skip("cuda_rows", no_cuda_reason() + ": every row ran on the CPU, in fp32 (bf16 is CUDA's)")
    st.save()


# =============================================================================================== serving


def stage_serving(st: Stage) -> None:
    import argparse as ap
    import asyncio
    import importlib.util
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    missing = [m for m in ("bentoml", "aiohttp") if importlib.util.find_spec(m) is None]
    if missing:
        st.skip("serve", f"{' and '.join(missing)} not installed here (carry the wheels: bash "
                         "bench/device_wheels.sh, then run again)", status=UNAVAILABLE)
        st.result["summary"] = f"not available here: no {', '.join(missing)}"
        return
    import torch

    from bench.serving import Server, load, measure, payload
    from mae import artifact
    from mae.config import get_preset

    cuda = torch.cuda.is_available()
    cfg = get_preset("mae_vit_tiny_patch4_32").override(["model.depth=1"]) if st.dry else get_preset(
        "mae_vit_base_patch16")
    opts = ap.Namespace(max_batch_size=32, threads=1 if st.dry else 0, backend="torch", clients=[32],
                        rounds=2, seconds=4.0 if st.dry else 12.0)
    st.result.update(model="toy ViT (32 px, 1 block)" if st.dry else "ViT-B/16", clients=32,
                     max_batch_size=opts.max_batch_size, backend=opts.backend)
    path = st.work / "serve-artifact"
    shutil.rmtree(path, ignore_errors=True)
    artifact.from_random_init(path, cfg)
    body, ctype = payload()
    servers: dict[str, Any] = {}
    try:
        with st.item("start") as e:
            started = time.perf_counter()
            with ThreadPoolExecutor(2) as pool:  # both start at once: each takes seconds
                futures = {mode: pool.submit(Server, path, mode == "on", opts, st.work / f"server-{mode}.log")
                           for mode in ("off", "on")}
                for mode, f in futures.items():
                    servers[mode] = f.result()
                    _CHILDREN.append(servers[mode].proc)
            e["ready_s"] = round(time.perf_counter() - started, 1)
            for server in servers.values():  # first calls: CUDA context, kernels, BentoML's batch-size training
                asyncio.run(load(server.url, body, ctype, 4, 2.0))
            with urllib.request.urlopen(servers["on"].url + "/info", timeout=30) as r:
                e["backend"] = json.load(r)["backend"]
            if cuda and "cuda" not in json.dumps(e["backend"]).lower():
                raise RuntimeError(f"the server's encoder is not on the GPU: {e['backend']}")
        with st.item("load") as e:
            results = measure(servers, opts, body, ctype)
            off, on = results["off"]["levels"][0], results["on"]["levels"][0]
            keep = ("rps", "p50_ms", "p99_ms", "errors", "requests", "images_per_call", "model_ms", "queue_ms",
                    "decode_ms", "first_errors")
            st.result["levels"] = {"off": {k: off.get(k) for k in keep}, "on": {k: on.get(k) for k in keep}}
            st.result["on_over_off"] = round(on["rps"] / max(off["rps"], 1e-9), 3)
            st.result["errors"] = int(off["errors"] + on["errors"])
            e.update(on_over_off=st.result["on_over_off"], errors=st.result["errors"])
            if st.result["errors"]:
                raise RuntimeError(f"{st.result['errors']} failed requests: {off['first_errors'] + on['first_errors']}")
    finally:
        started = time.perf_counter()
        # Together, and bounded: the front worker of `mae serve` was seen ignoring SIGTERM for 30 s and more here
        # (an idle server), and its arbiter waits for it; the run cannot spare that.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda server: stop_server(server.proc, min(5.0, max(1.0, st.left() - 3))),
                          servers.values()))
        st.result["stop_s"] = round(time.perf_counter() - started, 1)
    lv = st.result.get("levels", {})
    st.result["summary"] = (f"32 clients: off {lv.get('off', {}).get('rps', 0):.0f} req/s, on "
                            f"{lv.get('on', {}).get('rps', 0):.0f} req/s ({st.result.get('on_over_off')}x), "
                            f"{st.result.get('errors')} errors")
    if not cuda:
        st.skip("gpu_encoder", no_cuda_reason() + ": the encoder ran on the CPU")


def stop_server(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM a ``mae serve`` process group, then SIGKILL whatever of it (and of BentoML's workers, which run in
    process groups of their own) is left after ``grace`` seconds."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    _signal_group(proc, signal.SIGTERM)
    for p in family[1:]:  # the workers too: waiting for the arbiter to stop them one by one took 20 s and more
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


STAGE_FUNCTIONS: dict[str, Callable[[Stage], None]] = {
    "environment": stage_environment, "pytest_gpu": stage_pytest_gpu, "pretrain_step": stage_pretrain_step,
    "pretrain_loop": stage_pretrain_loop, "finetune": stage_finetune, "embed": stage_embed, "serving": stage_serving,
}


# =============================================================================================== goals


def judge_goals(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals against what the run measured: met, missed, or not measured (with why)."""
    stages = {s["name"]: s for s in record["stages"]}
    dry = record["mode"] == "dry-run"

    def result(name: str) -> dict[str, Any]:
        return stages.get(name, {}).get("result", {})

    def why_missing(name: str) -> str:
        s = stages.get(name)
        if s is None:
            return f"the {name} stage did not run"
        if s["status"] == OK:
            return f"the {name} stage ran but recorded no figure for it"
        return f"the {name} stage: {s['status']}" + (f" ({s.get('error') or s.get('reason')})"
                                                     if s.get("error") or s.get("reason") else "")

    rows = result("pretrain_step").get("rows", [])

    def best(model: str) -> dict[str, Any] | None:
        ours = [r for r in rows if r["model"] == model and r["impl"] != "hf"]
        return max(ours, key=lambda r: r["images_per_s"]) if ours else None

    goals: list[dict[str, Any]] = []

    def goal(text: str, value: float | None, target: float, stage: str, fmt: str = "{:.0f}", detail: str = "") -> None:
        entry: dict[str, Any] = {"goal": text, "target": target, "value": value, "stage": stage, "detail": detail}
        if value is None:
            entry["status"] = f"not measured: {why_missing(stage)}"
        elif dry:
            entry["status"] = "not judged: dry run (toy sizes on the CPU)"
        else:
            entry["status"] = "met" if value >= target else "missed"
        entry["shown"] = fmt.format(value) if value is not None else "-"
        goals.append(entry)

    vit_l, vit_b = best("ViT-L/16"), best("ViT-B/16")
    if dry:
        toy = next((best(m) for m in {r["model"] for r in rows}), None)
        vit_l = vit_b = toy
    nominal = bool(result("pretrain_step").get("nominal_peak_tflops"))
    mfu_key = "mfu_nominal_peak" if nominal else "mfu_measured_peak"
    goal("ViT-L/16 MAE pretraining >= 2,500 img/s", vit_l and vit_l["images_per_s"], 2500, "pretrain_step",
         detail=vit_l["impl"] if vit_l else "")
    goal(f"ViT-L/16 MFU >= 40% (of the {'datasheet' if nominal else 'measured matmul'} bf16 peak)",
         vit_l and vit_l.get(mfu_key), 0.40, "pretrain_step", "{:.1%}")
    goal("ViT-B/16 MAE pretraining >= 5,000 img/s", vit_b and vit_b["images_per_s"], 5000, "pretrain_step",
         detail=vit_b["impl"] if vit_b else "")
    for name, r in (("ViT-B/16", vit_b), ("ViT-L/16", vit_l)):
        goal(f"{name} >= 1.3x Hugging Face ViTMAE at the same batch and precision", r and r.get("vs_hf"), 1.3,
             "pretrain_step", "{:.2f}x")
    goal("real loop within 10% of the step throughput (loop / step >= 0.9)", result("pretrain_loop").get(
        "loop_over_step"), 0.9, "pretrain_loop", "{:.2f}")
    embed_rows = result("embed").get("rows", [])
    top = max(result("embed").get("batches", [256]))
    pkg = next((r for r in embed_rows if r["view"] == "model" and r["batch"] == top
                and r["runner"].startswith("inductor package")), None)
    goal(f"GPU-compiled embedding at batch {top} >= 2x torch eager bf16", pkg and pkg.get("vs_eager"), 2.0, "embed",
         "{:.2f}x")
    goal(f"GPU-compiled embedding at batch {top} >= 8,000 img/s", pkg and pkg["images_per_s"], 8000, "embed")
    goal("serving: batching on >= 5x off at 32 clients", result("serving").get("on_over_off"), 5.0, "serving",
         "{:.2f}x")
    errors = result("serving").get("errors")
    goal("serving: 0 errors", None if errors is None else -float(errors), 0.0, "serving", "{:.0f}")
    if goals[-1]["value"] is not None:
        goals[-1]["shown"] = f"{errors} errors"
    return goals


# =============================================================================================== reports


def write_reports(out: Path, record: dict[str, Any]) -> None:
    tmp = out / "device.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(out / "device.json")
    (out / "device.md").write_text(markdown(record))


def markdown(record: dict[str, Any]) -> str:
    stages = {s["name"]: s for s in record["stages"]}
    env = stages.get("environment", {}).get("result", {})
    facts = env.get("facts", {})
    dry = record["mode"] == "dry-run"
    lines = [f"# Device run ({record['mode']}): {facts.get('gpu', 'no GPU')}, {record['started']}", ""]
    lines.append(f"`{record['command']}`: {record.get('seconds', 0)} s of a {record['budget_s']:.0f} s budget. "
                 f"torch {facts.get('torch', '?')} (CUDA {facts.get('torch_cuda')}), driver {facts.get('driver', '-')},"
                 f" Python {facts.get('python', '?')}, {facts.get('cores', '?')} cores.")
    if dry:
        lines += ["", "Dry run: every stage at toy size on the CPU. The figures rehearse the code paths, not the "
                      "product's speed; what needs CUDA is listed under 'Skipped and not available'."]
    lines += ["", "## Stages", "", "| stage | status | seconds (budget) | summary |", "|---|---|---:|---|"]
    for s in record["stages"]:
        summary = s.get("result", {}).get("summary") or s.get("error") or s.get("reason") or ""
        if s.get("error") and s.get("result", {}).get("summary"):
            summary += f" — {s['error']}"
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '-')} ({s.get('budget_s', '-')}) | "
                     f"{_cell(summary)} |")
    lines += ["", "## Goals", "", "| goal | measured | status |", "|---|---:|---|"]
    for g in record.get("goals", []):
        lines.append(f"| {g['goal']} | {g['shown']}{' (' + g['detail'] + ')' if g.get('detail') else ''} | "
                     f"{_cell(g['status'])} |")
    lines += _environment_md(env) + _step_md(stages) + _loop_md(stages) + _embed_md(stages) + _serving_md(stages)
    lines += _pytest_md(stages) + _skips_md(record)
    return "\n".join(lines) + "\n"


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:600]


def _environment_md(env: dict[str, Any]) -> list[str]:
    items = {k: v for k, v in env.get("items", {}).items() if k.startswith("cap:") or k == "wheels"}
    if not items:
        return []
    lines = ["", "## Environment", "", "| capability | status | detail |", "|---|---|---|"]
    for k, v in items.items():
        detail = v.get("detail") or v.get("reason") or v.get("error") or ""
        if k == "wheels" and v.get("wheels"):
            detail = f"{len(v['wheels'])} wheels, {v.get('mib')} MiB -> {v.get('site', '-')}" + (
                f"; {v['reason']}" if v.get("reason") else "")
        lines.append(f"| {k.removeprefix('cap:')} | {v['status']} | {_cell(detail)} |")
    return lines


def _step_md(stages: dict[str, Any]) -> list[str]:
    res = stages.get("pretrain_step", {}).get("result", {})
    rows = res.get("rows", [])
    if not rows:
        return []
    lines = ["", "## Pretraining step (forward + backward + fused AdamW, bf16 autocast)", "",
             f"Measured bf16 matmul peak {res.get('measured_peak_tflops')} TFLOP/s; datasheet "
             f"{res.get('nominal_peak_tflops') or '-'} TFLOP/s. FLOPs are analytic (bench.pretrain."
             f"analytic_step_flops); torch's counter / formula = "
             f"{res.get('items', {}).get('flop_formula_check', {}).get('counter_over_analytic', '-')}. "
             + res.get("compile_note", ""), "",
             "| model | impl | batch | img/s | vs HF | step ms | TFLOP/s | MFU (measured / datasheet peak) | "
             "peak GiB | warm-up s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = " / ".join(_num(r.get(k), ".1%") for k in ("mfu_measured_peak", "mfu_nominal_peak"))
        lines.append(f"| {r['model']} | {r['impl']} | {r.get('batch', '-')} | {r['images_per_s']:.1f} | "
                     f"{r.get('vs_hf') or '-'} | {r.get('step_ms', '-')} | {r.get('tflops', '-')} | {mfu} | "
                     f"{r.get('peak_memory_gib') or '-'} | {r.get('warmup_s', '-')} |")
    return lines


def _loop_md(stages: dict[str, Any]) -> list[str]:
    loop = stages.get("pretrain_loop", {}).get("result", {})
    ft = stages.get("finetune", {}).get("result", {})
    lines: list[str] = []
    if loop.get("plan"):
        it = loop.get("items", {})
        kill, res = it.get("run_then_sigkill", {}), it.get("resume", {})
        lines += ["", "## Pretraining loop, kill and resume", "", f"`{loop.get('command', '')}`", "",
                  "| loop img/s | step img/s | loop / step | data path alone img/s | killed after step | checkpoint "
                  "step | resumed from | final step |", "|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {loop.get('loop_images_per_s', '-')} | {loop.get('step_images_per_s', '-')} | "
                  f"{loop.get('loop_over_step', '-')} | {loop.get('data_images_per_s', '-')} | "
                  f"{kill.get('killed_after_logged_step', '-')} | {kill.get('checkpoint_step', '-')} | "
                  f"{res.get('resumed_from_step', '-')} | {res.get('final_step', '-')} |"]
    if ft.get("items"):
        f = ft["items"].get("finetune", {})
        lines += ["", "## Finetune", "", f"`{ft.get('command', '')}`", "",
                  f"{f.get('status')}: {f.get('steps', '-')} steps on {f.get('device', '-')}, autocast "
                  f"{f.get('autocast', '-')}, layer decay {f.get('layer_decay', '-')}, mixup {f.get('mixup', '-')} / "
                  f"cutmix {f.get('cutmix', '-')}, batch {f.get('batch', '-')}: {f.get('images_per_s', '-')} img/s, "
                  f"val top-1 {f.get('val_top1', '-')} (labels: which photograph a crop came from; plumbing, not "
                  "accuracy)"
                  + (f"; {f.get('error')}" if f.get("error") else "")]
    return lines


def _embed_md(stages: dict[str, Any]) -> list[str]:
    res = stages.get("embed", {}).get("result", {})
    rows = res.get("rows", [])
    if not rows:
        return []
    exp = res.get("inductor_export", {})
    lines = ["", f"## Embedding ({res.get('model')})", "",
             f"AOTInductor package: {exp.get('precision', '-')} for {exp.get('device', '-')}, compiled in "
             f"{exp.get('compile_s', '-')} s, parity passed {exp.get('passed', '-')} (cos min "
             f"{_num(exp.get('cos_min'), '.6f')}). 'model' rows time device tensors in and out; 'embedder' rows time "
             "Embedder.run (numpy in and out, transfers included)."]
    for view in ("model", "embedder"):
        names = list(dict.fromkeys(r["runner"] for r in rows if r["view"] == view))
        if not names:
            continue
        lines += ["", f"| {view} view: batch | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for b in res.get("batches", []):
            cells = []
            for n in names:
                r = next((r for r in rows if r["view"] == view and r["runner"] == n and r["batch"] == b), None)
                cells.append("-" if r is None else f"{r['images_per_s']:.0f}" + (
                    f" ({r['vs_eager']:.2f}x)" if "vs_eager" in r else ""))
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
    cos = res.get("parity_cos_min", {})
    if cos:
        lines += ["", "Cosine to eager fp32 on real images (min): " + ", ".join(f"{k} {v:.6f}" for k, v in cos.items())]
    return lines


def _serving_md(stages: dict[str, Any]) -> list[str]:
    res = stages.get("serving", {}).get("result", {})
    lv = res.get("levels")
    if not lv:
        return []
    lines = ["", f"## Serving ({res.get('model')}, backend {res.get('backend')}, POST /embed, 32 clients)", "",
             "| batching | req/s | p50 ms | p99 ms | images per model call | errors |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode in ("off", "on"):
        v = lv[mode]
        lines.append(f"| {mode} | {v['rps']:.1f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
                     f"{v.get('images_per_call') or 0:.1f} | {v['errors']} |")
    lines.append(f"\non / off: {res.get('on_over_off')}x")
    return lines


def _pytest_md(stages: dict[str, Any]) -> list[str]:
    res = stages.get("pytest_gpu", {}).get("result", {})
    tests = {k.removeprefix("test:"): v for k, v in res.get("items", {}).items() if k.startswith("test:")}
    if not tests:
        return []
    lines = ["", f"## pytest -m gpu: {res.get('summary', '')}", "", "| test | outcome | reason / error |",
             "|---|---|---|"]
    for name, v in tests.items():
        lines.append(f"| {name} | {v.get('outcome', v['status'])} | {_cell(v.get('reason') or v.get('error') or '')} |")
    return lines


def _skips_md(record: dict[str, Any]) -> list[str]:
    lines = ["", "## Skipped and not available", "", "| stage | item | status | reason |", "|---|---|---|---|"]
    n = 0
    for s in record["stages"]:
        if s["status"] in (SKIPPED, UNAVAILABLE) and not s.get("result", {}).get("items"):
            lines.append(f"| {s['name']} | (stage) | {s['status']} | {_cell(s.get('reason', ''))} |")
            n += 1
        for k, v in s.get("result", {}).get("items", {}).items():
            if v["status"] in (SKIPPED, UNAVAILABLE) and not k.startswith("test:"):
                lines.append(f"| {s['name']} | {k} | {v['status']} | {_cell(v.get('reason', ''))} |")
                n += 1
    return lines if n else []


if __name__ == "__main__":
    sys.exit(main())
