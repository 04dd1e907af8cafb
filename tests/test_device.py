"""The prepared GPU run (bench/device/): its dry run on this CPU, stage by stage, so it cannot rot while no GPU
is at hand; and the parts that decide what a real run reports (budgets, failures, goals, the FLOP formula)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench.device import harness, report
from bench.device import stage as device
from bench.device.stages import NAMES, STAGES, pytest_gpu
from tests.conftest import ROOT

REASONED = (device.SKIPPED, device.UNAVAILABLE)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``python -m bench.device OUT --dry-run`` as a subprocess, the way bench/device.sh runs it."""
    out = tmp_path_factory.mktemp("device")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.device", str(out), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    record = json.loads((out / "device.json").read_text()) if (out / "device.json").exists() else None
    md = (out / "device.md").read_text() if (out / "device.md").exists() else ""
    assert record is not None, f"no device.json:\n{proc.stderr[-3000:]}"
    return {"proc": proc, "record": record, "md": md, "seconds": time.monotonic() - started,
            "stages": {s["name"]: s for s in record["stages"]}, "log": (out / "device.log").read_text()}


@pytest.mark.slow
def test_every_stage_runs_at_toy_size_or_says_why_not(dry_run):
    record = dry_run["record"]
    assert record["mode"] == "dry-run"
    assert [s["name"] for s in record["stages"]] == list(NAMES)
    for s in record["stages"]:
        assert s["status"] in (device.OK, *REASONED), f"{s['name']}: {s['status']} {s.get('error')}\n{dry_run['md']}"
        assert s["budget_s"] >= harness.BUDGETS[s["name"]][1]  # its own budget, at least, whatever came before
        assert s["seconds"] <= s["budget_s"] + harness.TERM_GRACE_S + 1
        for key, item in s["result"].get("items", {}).items():
            assert item["status"] in (device.OK, *REASONED), f"{s['name']} {key}: {item}"
            if item["status"] in REASONED:
                assert len(item.get("reason", "")) > 10, f"{s['name']} {key} is {item['status']} without a reason"
    assert dry_run["proc"].returncode == 0, dry_run["proc"].stderr[-3000:]
    for name in NAMES:
        assert f"| {name} |" in dry_run["md"]


@pytest.mark.slow
def test_nothing_that_needs_cuda_is_reported_as_passed(dry_run):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this checks the CPU rehearsal")
    env = dry_run["stages"]["environment"]["result"]["items"]
    for cap in ("cap:cuda", "cap:tensorrt", "cap:onnxruntime-gpu", "cap:faiss-gpu"):
        assert env[cap]["status"] == device.UNAVAILABLE, (cap, env[cap])
    tests = {k: v for k, v in dry_run["stages"]["pytest_gpu"]["result"]["items"].items() if k.startswith("test:")}
    assert len(tests) >= 5  # every GPU test was collected: finetune, inductor, retrieval, runtime, serving
    assert all(v["status"] == device.SKIPPED and v["reason"] for v in tests.values()), tests
    assert "test:tests/test_inductor.py::test_cuda_bf16_package" in tests
    for goal in dry_run["record"]["goals"]:
        assert goal["status"] not in ("met", "missed"), goal  # toy figures judge nothing
    embed = dry_run["stages"]["embed"]["result"]
    assert embed["items"]["cuda_rows"]["status"] == device.SKIPPED


@pytest.mark.slow
def test_each_stage_measured_what_it_claims(dry_run):
    step = dry_run["stages"]["pretrain_step"]["result"]
    impls = {r["impl"] for r in step["rows"]}
    assert impls == {"hf", "ours", "ours-compiled-regional", "ours-compiled"}
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 and r["mfu_measured_peak"] > 0 for r in step["rows"])
    assert step["items"]["flop_formula_check"]["counter_over_analytic"] == pytest.approx(1.0, abs=1e-3)

    loop = dry_run["stages"]["pretrain_loop"]["result"]
    kill, resume = loop["items"]["run_then_sigkill"], loop["items"]["resume"]
    assert kill["signal"] == "SIGKILL" and 0 < kill["checkpoint_step"] < loop["plan"]["steps"]
    assert resume["resumed_from_step"] == kill["checkpoint_step"] and resume["final_step"] == loop["plan"]["steps"]
    assert loop["loop_images_per_s"] > 0 and loop["step_images_per_s"] > 0 and loop["loop_over_step"] > 0

    ft = dry_run["stages"]["finetune"]["result"]
    assert ft["steps"] == 10 and ft["layer_decay"] < 1 and ft["mixup"] > 0
    assert ft["items"]["init"]["source"] == "the pretrain_loop stage's checkpoint"

    ct = dry_run["stages"]["contrastive"]["result"]
    tune = ct["items"]["tune"]
    assert ct["items"]["init"]["source"] == "the pretrain_loop stage's checkpoint"
    assert tune["steps"] == 12 and tune["stage_steps"] == {"head": 3, "tune": 9} and tune["losses_finite"]
    assert tune["frozen_blocks"] == 1  # half of the toy's 2 blocks train
    assert all(tune[k] > 0 for k in ("images_per_s", "head_images_per_s", "tflops", "mfu_measured_peak"))
    assert tune["gflop_per_image"] > tune["head_gflop_per_image"]  # the upper blocks' backward
    check = ct["items"]["flop_formula_check"]
    assert check["head_counter_over_analytic"] == check["tune_counter_over_analytic"] == pytest.approx(1.0, abs=1e-3)

    embed = dry_run["stages"]["embed"]["result"]
    assert embed["inductor_export"]["passed"] is True
    runners = {r["runner"] for r in embed["rows"]}
    assert {"inductor package fp32", "Embedder inductor-cpu-fp32", "Embedder onnx-cpu-fp32"} <= runners
    assert all(cos >= 0.9999 for cos in embed["parity_cos_min"].values()), embed["parity_cos_min"]

    serving = dry_run["stages"]["serving"]
    if serving["status"] == device.UNAVAILABLE:
        pytest.skip(f"serving: {serving['result']['items']['serve']['reason']}")
    res = serving["result"]
    assert res["errors"] == 0 and res["levels"]["off"]["rps"] > 0 and res["levels"]["on"]["rps"] > 0
    assert res["levels"]["on"]["images_per_call"] > 1  # batching on actually batched


def test_analytic_flops_match_torchs_counter():
    from bench.pretrain import analytic_step_flops, step_flops
    from mae.config import get_preset

    cfg = get_preset("mae_vit_tiny_patch4_32").override(device.TOY + ["model.mask_ratio=0.6"]).model
    counted = step_flops(cfg, 3, torch.device("cpu"), fused_attention=False)
    assert counted == pytest.approx(analytic_step_flops(cfg, 3), rel=1e-6)
    vit_l = get_preset("mae_vit_large_patch16").model
    assert analytic_step_flops(vit_l, 1) == pytest.approx(124.2e9, rel=1e-3)  # the figure the goals are read with


@pytest.mark.parametrize("frozen", [None, 0, 2])  # half the blocks (the default), the stem trained, all frozen
def test_contrastive_flops_match_torchs_counter(frozen):
    from bench.device.stages.contrastive import counted_step_flops, tuning_step_flops
    from mae.config import get_preset

    heads = ["contrastive.proj_hidden_dim=48", "contrastive.pred_hidden_dim=96", "contrastive.output_dim=16"]
    cfg = get_preset("mae_vit_tiny_patch4_32").override(
        device.TOY + heads + ([] if frozen is None else [f"contrastive.frozen_blocks={frozen}"]))
    for stage in ("head", "tune"):
        counted = counted_step_flops(cfg, 3, stage, torch.device("cpu"))
        assert counted == pytest.approx(tuning_step_flops(cfg, 3, stage), rel=1e-6), stage
    vit_b = get_preset("mae_vit_base_patch16")
    assert tuning_step_flops(vit_b, 1) == pytest.approx(140.2e9, rel=1e-3)  # the figure the docstring gives


def test_a_hung_stage_is_stopped_at_its_budget_and_keeps_its_partial_result(tmp_path):
    result = tmp_path / "r.json"
    code = (f"import json, time; open({str(result)!r}, 'w').write(json.dumps({{'status': 'running', "
            f"'progress': 'half', 'rows': [1]}})); time.sleep(60)")
    started = time.monotonic()
    stage = harness.run_stage("x", [sys.executable, "-c", code], dict(os.environ), 3.0, result, tmp_path / "log")
    assert time.monotonic() - started < 3.0 + harness.TERM_GRACE_S
    assert stage["status"] == device.TIMEOUT and "half" in stage["error"] and stage["result"]["rows"] == [1]


def test_a_stage_gets_the_time_earlier_ones_left_within_the_deadline():
    own = harness.BUDGETS["finetune"][0]
    assert harness.stage_timeout("finetune", 0.0, 1000.0, dry=False) == own
    assert harness.stage_timeout("finetune", 25.0, 1000.0, dry=False) == own + 25.0  # banked time
    assert harness.stage_timeout("finetune", -30.0, 1000.0, dry=False) == own  # an overrun costs no one else
    assert harness.stage_timeout("finetune", 25.0, 20.0, dry=False) == 20.0  # never past the deadline
    assert sum(b for b, _ in harness.BUDGETS.values()) <= harness.RUN_BUDGET["gpu"] <= 480
    assert sum(d for _, d in harness.BUDGETS.values()) <= harness.RUN_BUDGET["dry"]


def test_a_failing_stage_fails_alone(tmp_path, monkeypatch):
    """One stage raising is recorded with its error; the stages after it still run, and the exit status says so."""

    def command(name, work, result, dry, timeout):
        body = ("raise SystemExit('pretend the model ran out of memory')" if name == "pretrain_step" else
                f"import json; open({str(result)!r}, 'w').write(json.dumps({{'status': 'ok', 'summary': 'fine'}}))")
        return [sys.executable, "-c", body]

    monkeypatch.setattr(harness, "stage_command", command)
    code = harness.main([str(tmp_path / "out"), "--dry-run", "--work", str(tmp_path / "work")])
    record = json.loads((tmp_path / "out" / "device.json").read_text())
    status = {s["name"]: s["status"] for s in record["stages"]}
    assert code == 1 and status.pop("pretrain_step") == device.FAILED and set(status.values()) == {device.OK}
    failed = next(s for s in record["stages"] if s["name"] == "pretrain_step")
    assert "exited with status 1" in failed["error"]
    assert "pretend the model ran out of memory" in (tmp_path / "out" / "device.log").read_text()


def test_goals_are_judged_from_the_figures_and_never_from_missing_ones():
    rows = [{"model": "ViT-L/16", "impl": "hf", "images_per_s": 2000.0, "vs_hf": 1.0},
            {"model": "ViT-L/16", "impl": "ours-compiled", "images_per_s": 3000.0, "vs_hf": 1.5,
             "mfu_nominal_peak": 0.38, "mfu_measured_peak": 0.47},
            {"model": "ViT-B/16", "impl": "ours", "images_per_s": 4000.0, "vs_hf": 1.2}]
    record = {"mode": "gpu", "stages": [
        {"name": "pretrain_step", "status": "ok", "result": {"rows": rows, "nominal_peak_tflops": 989.4}},
        {"name": "pretrain_loop", "status": "timeout", "error": "stopped at its budget of 70 s", "result": {}},
        {"name": "embed", "status": "ok", "result": {"batches": [1, 32, 256], "rows": [
            {"view": "model", "runner": "inductor package bf16", "batch": 256, "images_per_s": 9000.0,
             "vs_eager": 2.4}]}},
        {"name": "contrastive", "status": "ok", "result": {"images_per_s": 2100.0, "autocast": "bfloat16",
                                                            "losses_finite": True, "mfu_measured_peak": 0.31,
                                                            "mfu_nominal_peak": 0.3, "nominal_peak_tflops": 989.4}},
        {"name": "serving", "status": "ok", "result": {"on_over_off": 4.2, "errors": 0}}]}
    goals = {g["goal"]: g["status"] for g in report.judge_goals(record)}
    assert goals["ViT-L/16 MAE pretraining >= 2,500 img/s"] == "met"
    assert goals["ViT-L/16 MFU >= 40% (of the datasheet bf16 peak)"] == "missed"  # the datasheet's, when known
    assert goals["ViT-B/16 MAE pretraining >= 5,000 img/s"] == "missed"
    assert goals["ViT-B/16 >= 1.3x Hugging Face ViTMAE at the same batch and precision"] == "missed"
    assert goals["real loop within 10% of the step throughput (loop / step >= 0.9)"].startswith(
        "not measured: the pretrain_loop stage: timeout (stopped at its budget")
    assert goals["GPU-compiled embedding at batch 256 >= 2x torch eager bf16"] == "met"
    assert goals["GPU-compiled embedding at batch 256 >= 8,000 img/s"] == "met"
    assert goals["serving: batching on >= 5x off at 32 clients"] == "missed"
    assert goals["serving: 0 errors"] == "met"
    tuning = "ViT-B/16 contrastive tuning runs in bf16 with finite losses; img/s and MFU reported"
    assert goals[tuning] == "met"
    shown = {g["goal"]: g["shown"] for g in report.judge_goals(record)}
    assert shown[tuning] == "2100 img/s, MFU 30.0% (datasheet peak)"
    record["stages"][3]["result"]["autocast"] = "off"  # ran in fp32: the goal is missed, and says why
    fp32 = next(g for g in report.judge_goals(record) if g["goal"] == tuning)
    assert fp32["status"] == "missed" and "autocast off" in fp32["shown"]
    md = report.markdown({**record, "started": "now", "command": "x", "budget_s": 470, "goals": report.judge_goals(
        record)})
    assert "| serving: 0 errors | 0 errors | met |" in md


def test_pytest_outcomes_become_items_with_reasons(tmp_path):
    lines = [{"nodeid": "tests/test_r.py", "when": "collect", "outcome": "skipped",
              "message": "could not import 'faiss'"},
             {"nodeid": "tests/test_a.py::ok", "when": "call", "outcome": "passed", "seconds": 1.5},
             {"nodeid": "tests/test_a.py::bad", "when": "call", "outcome": "failed", "message": "assert 1 == 2"},
             {"nodeid": "tests/test_a.py::fixture", "when": "setup", "outcome": "failed", "message": "boom"},
             {"nodeid": "tests/test_a.py::later", "when": "call", "outcome": "passed"},
             {"nodeid": "tests/test_a.py::later", "when": "teardown", "outcome": "failed", "message": "leak"}]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    st = device.Stage("pytest_gpu", tmp_path, tmp_path / "r.json", True, 10)
    pytest_gpu.record_tests(st, log)
    items = st.result["items"]
    assert items["test:tests/test_r.py"] == {"status": device.SKIPPED, "reason": "could not import 'faiss'",
                                             "outcome": "skipped"}
    assert items["test:tests/test_a.py::ok"]["status"] == device.OK
    assert items["test:tests/test_a.py::bad"]["outcome"] == "failed"
    assert items["test:tests/test_a.py::fixture"]["outcome"] == "error"
    assert items["test:tests/test_a.py::later"]["status"] == device.FAILED  # a failed teardown fails the test
    assert st.result["counts"] == {"skipped": 1, "passed": 1, "failed": 1, "error": 2}


def test_every_stage_module_follows_the_protocol():
    """A stage is one module and one line in ``stages.STAGES``: everything the harness and the report use of it."""
    assert len(set(NAMES)) == len(STAGES) and NAMES[0] == "environment"
    for module in STAGES:
        gpu, dry = module.BUDGET
        assert gpu > 0 and dry > 0 and callable(module.run), module.NAME
        assert module.report({}) == [], f"{module.NAME} reports a section for a stage that measured nothing"
        for goal in module.goals({}, False):  # a stage that did not run measured nothing
            assert isinstance(goal, device.Goal) and goal.value is None, (module.NAME, goal)
    parsed = harness.parser().parse_args(["out", "--stage", NAMES[-1]])
    assert parsed.stage == NAMES[-1]
