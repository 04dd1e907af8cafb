"""The run's reports, rewritten after every stage: ``device.json`` (everything), ``device.md`` (the tables: stages,
goals, then each stage's own section) and the goals judged from the figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.device.stage import OK, SKIPPED, UNAVAILABLE, cell
from bench.device.stages import STAGES


def judge_goals(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals against what the run measured: met, missed, or not measured (with why)."""
    stages = {s["name"]: s for s in record["stages"]}
    dry = record["mode"] == "dry-run"
    goals: list[dict[str, Any]] = []
    for module in STAGES:
        for g in module.goals(stages.get(module.NAME, {}).get("result", {}), dry):
            entry: dict[str, Any] = {"goal": g.text, "target": g.target, "value": g.value, "stage": module.NAME,
                                     "detail": g.detail}
            if g.value is None:
                entry["status"] = f"not measured: {why_missing(stages, module.NAME)}"
            elif dry:
                entry["status"] = "not judged: dry run (toy sizes on the CPU)"
            else:
                entry["status"] = "met" if g.value >= g.target else "missed"
            entry["shown"] = "-" if g.value is None else g.shown or g.fmt.format(g.value)
            goals.append(entry)
    return goals


def why_missing(stages: dict[str, Any], name: str) -> str:
    s = stages.get(name)
    if s is None:
        return f"the {name} stage did not run"
    if s["status"] == OK:
        return f"the {name} stage ran but recorded no figure for it"
    return f"the {name} stage: {s['status']}" + (f" ({s.get('error') or s.get('reason')})"
                                                 if s.get("error") or s.get("reason") else "")


def write_reports(out: Path, record: dict[str, Any]) -> None:
    tmp = out / "device.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(out / "device.json")
    (out / "device.md").write_text(markdown(record))


def markdown(record: dict[str, Any]) -> str:
    stages = {s["name"]: s for s in record["stages"]}
    facts = stages.get("environment", {}).get("result", {}).get("facts", {})
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
                     f"{cell(summary)} |")
    lines += ["", "## Goals", "", "| goal | measured | status |", "|---|---:|---|"]
    for g in record.get("goals", []):
        lines.append(f"| {g['goal']} | {g['shown']}{' (' + g['detail'] + ')' if g.get('detail') else ''} | "
                     f"{cell(g['status'])} |")
    for appendix in (False, True):  # a stage's long listing (one row per test) after every stage's figures
        for module in STAGES:
            if getattr(module, "APPENDIX", False) == appendix:
                lines += module.report(stages.get(module.NAME, {}).get("result", {}))
    lines += skips(record)
    return "\n".join(lines) + "\n"


def skips(record: dict[str, Any]) -> list[str]:
    """Every stage and item skipped or not available here, with its reason (GPU tests have their own table)."""
    lines = ["", "## Skipped and not available", "", "| stage | item | status | reason |", "|---|---|---|---|"]
    n = 0
    for s in record["stages"]:
        if s["status"] in (SKIPPED, UNAVAILABLE) and not s.get("result", {}).get("items"):
            lines.append(f"| {s['name']} | (stage) | {s['status']} | {cell(s.get('reason', ''))} |")
            n += 1
        for k, v in s.get("result", {}).get("items", {}).items():
            if v["status"] in (SKIPPED, UNAVAILABLE) and not k.startswith("test:"):
                lines.append(f"| {s['name']} | {k} | {v['status']} | {cell(v.get('reason', ''))} |")
                n += 1
    return lines if n else []
