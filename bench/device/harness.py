"""The harness of the device run: budgets, each stage in its own process under a time limit, the report rewritten
after each stage.

Each stage (``bench.device.stages``) runs in its own process with a time budget; a stage that raises is recorded and
the next one runs, one that hangs is stopped at its budget (SIGTERM, then SIGKILL) with what it had measured kept,
and a stage that would start past the run's deadline is skipped with that reason. The parent imports no torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.device.report import judge_goals, write_reports
from bench.device.stage import FAILED, OK, ROOT, SKIPPED, TIMEOUT, UNAVAILABLE, Stage, signal_group, stop_children
from bench.device.stages import BY_NAME, NAMES

BUDGETS = {name: stage.BUDGET for name, stage in BY_NAME.items()}
"""Seconds per stage: (GPU run, dry run). Each column sums to at most the run's (``RUN_BUDGET``); a stage also gets
the time the stages before it left of theirs (``stage_timeout``), so the compile-heavy late stages gain from fast
early ones, and every stage keeps at least its own budget."""
RUN_BUDGET = {"gpu": 470.0, "dry": 780.0}
REPORT_RESERVE_S = 5.0  # kept back from the deadline for the last report
MIN_STAGE_S = 10.0  # a stage with less than this left is skipped rather than started
TERM_GRACE_S = 10.0  # after SIGTERM, time a stage has to stop its servers and save what it measured


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
            signal_group(proc, signal.SIGTERM)  # the stage stops its servers and saves what it has
            try:
                rc = proc.wait(TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
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



def parser() -> argparse.ArgumentParser:
    import bench.device

    p = argparse.ArgumentParser(prog="python -m bench.device", description=bench.device.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="folder for device.json, device.md and device.log")
    p.add_argument("--dry-run", action="store_true", help="every stage at toy size on the CPU")
    p.add_argument("--only", help=f"comma-separated stages to run after environment (of {', '.join(NAMES)})")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default 470 on a GPU, 780 dry)")
    p.add_argument("--work", help="folder for runs, artifacts and images (default: a temporary one, removed)")
    p.add_argument("--stage", choices=NAMES, help=argparse.SUPPRESS)  # a stage's own process
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--stage-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.stage:
        return stage_main(args)
    if not args.out:
        p.error("OUT is required")
    selected = list(NAMES)
    if args.only:
        wanted = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = wanted - set(NAMES)
        if unknown:
            p.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(NAMES)}")
        selected = [s for s in NAMES if s in wanted or s == "environment"]
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
    record: dict[str, Any] = {"mode": "dry-run" if args.dry_run else "gpu", "started": now(), "budget_s": budget,
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
            site = stage["result"].get("site") or site  # wheels the environment stage installed: on every path
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


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


# =============================================================================================== a stage's process


def stage_main(args: argparse.Namespace) -> int:
    st = Stage(args.stage, Path(args.work), Path(args.result), args.dry_run, args.stage_timeout)

    def stop(signum: int, frame: Any) -> None:  # the parent's budget ran out: stop children, keep results
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    st.save()
    try:
        BY_NAME[args.stage].run(st)
        st.finish()
        return 0
    except BaseException as e:  # noqa: BLE001 - the stage failed as a whole: say why in its result
        st.result["status"] = FAILED
        st.result["error"] = f"{type(e).__name__}: {e}"[:3000]
        st.save()
        traceback.print_exc()
        return 1
    finally:
        stop_children()


