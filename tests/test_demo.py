"""``mae demo`` (the README's main command) end to end on scikit-learn's digits, shortened to one pretraining epoch.

The serve stage has its own test in test_serving.py; here every stage before it runs for real, then a rerun
continues the finished stages instead of repeating them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli


def test_demo_runs_every_stage_then_a_rerun_reuses_them(tmp_path: Path):
    out = tmp_path / "demo"
    args = ("demo", "--out", str(out), "--data", "digits", "--epochs", "1", "--no-serve")
    first = run_cli(*args, "--json", timeout=900)
    ctx = json.loads(first.stdout)

    p = ctx["pretrain"]
    assert p["steps"] == p["steps_per_epoch"] > 0 and p["loss"] > 0 and p["val_loss"] > 0
    for picture in (p["loss_curve"], p["reconstruction"], ctx["retrieval"]["contact_sheet"]):
        assert Path(picture).stat().st_size > 1000, picture
    table = ctx["evaluate"]
    c = ctx["contrastive"]
    assert c["task"] == "contrastive" and c["steps"] >= 2 and Path(c["neighbours"]).stat().st_size > 1000
    for row in ("raw", "random", "mae", "tuned"):
        assert 0.1 < table[row]["knn_top1"] <= 1 and 0.1 < table[row]["probe_top1"] <= 1, row
    assert 0 <= table["finetuned"]["top1"] <= 1
    config = json.loads((out / "artifact" / "config.json").read_text())
    assert config["labels"] == [str(i) for i in range(10)] and config["sha256"] == ctx["artifact_sha256"]
    assert config["export"]["onnx"]["passed"] and config["export"]["onnx_int8"]["passed"]
    r = ctx["retrieval"]
    assert r["count"] == table["mae"]["val_images"]  # the held-out images, indexed
    assert r["label_agreement@5"] > 0.2  # chance is 0.1

    second = run_cli(*args, "--json", timeout=600)
    again = json.loads(second.stdout)
    assert again["artifact_sha256"] == ctx["artifact_sha256"] and again["pretrain"]["loss"] == p["loss"]
    figures = ("knn_top1", "probe_top1", "top1")
    for row, values in table.items():  # the same figures, read back from the embeddings cache
        if isinstance(values, dict):
            assert {k: v for k, v in values.items() if k in figures} == {
                k: v for k, v in again["evaluate"][row].items() if k in figures}, row
    assert "exporting" not in second.stderr + second.stdout and "reusing the index" in second.stderr + second.stdout
    assert json.loads((out / "artifact" / "config.json").read_text())["export"] == config["export"]
