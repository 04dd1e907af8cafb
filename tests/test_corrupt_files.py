"""Damaged files against every command that reads them (issue 14): one line on stderr and exit 1, never a
traceback and never a silent success; and checkpoints that carry, and are checked against, a checksum.

The matrix runs the CLI in-process (``cli.main.main``, stderr captured at the file-descriptor level, so that
onnxruntime's or torch's own C++ messages would show too); the files are the session's tiny pretraining run and
exported artifact, copied per case before they are damaged.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from mae.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from tests.conftest import DAMAGES, damage
from tests.export_helpers import exported


class Started(Exception):
    """``mae serve`` got past its checks and would now exec BentoML."""


@pytest.fixture(scope="module")
def artifact_with_onnx(tmp_path_factory) -> Path:
    return exported(tmp_path_factory, "plain")  # fp32 + fp16 + int8 ONNX files, shared with test_runtime


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    from mae.sources import load_source

    path = tmp_path_factory.mktemp("image") / "digit.png"
    Image.fromarray(load_source("digits").read(0)).save(path)
    return path


def mae(capfd, monkeypatch, *argv: str) -> tuple[int, list[str]]:
    """Run ``mae ARGV`` in this process: (exit status, the lines it wrote on stderr). ``mae serve`` raises
    ``Started`` where it would exec BentoML."""
    from cli.main import main

    def started(*_: object) -> None:
        raise Started

    monkeypatch.setattr("serving.command.os.execvpe", started)
    capfd.readouterr()
    status = main(list(argv))
    return status, capfd.readouterr().err.strip().splitlines()


def assert_one_line(status: int, lines: list[str], command: str, file: Path) -> None:
    errors = [ln for ln in lines if ": warning: " not in ln]
    assert status == 1, (status, lines)
    assert len(errors) == 1 and errors[0].startswith(f"mae {command}: error: "), lines
    assert str(file) in errors[0] or file.name in errors[0], (file, errors[0])
    assert not any("Traceback" in ln for ln in lines)


def free_port() -> str:
    from tests.serving_support import free_port as port

    return str(port())


# ----------------------------------------------------------------------------------------------- checkpoints


CHECKPOINT_COMMANDS = {
    "export": lambda ckpt, tmp: ["export", "--checkpoint", str(ckpt), "--out", str(tmp / "artifact")],
    "evaluate": lambda ckpt, tmp: ["evaluate", "--checkpoint", str(ckpt), "--data", "digits", "--out",
                                   str(tmp / "eval")],
    "pretrain": lambda ckpt, tmp: ["pretrain", "--data", "mnist5k", "--out", str(ckpt.parent), "--resume"],
    "finetune": lambda ckpt, tmp: ["finetune", "--init", str(ckpt), "--data", "digits", "--out", str(tmp / "ft")],
}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("command", list(CHECKPOINT_COMMANDS))
def test_a_damaged_checkpoint_stops_every_command_in_one_line(tiny_pretrain_run, tmp_path, capfd, monkeypatch,
                                                              command, how):
    if command == "pretrain" and how == "deleted":
        pytest.skip("--resume without a checkpoint starts the run afresh, as documented")
    run = shutil.copytree(tiny_pretrain_run, tmp_path / "run")
    damage(run / "checkpoint.pt", how)
    status, lines = mae(capfd, monkeypatch, *CHECKPOINT_COMMANDS[command](run / "checkpoint.pt", tmp_path))
    assert_one_line(status, lines, command, run / "checkpoint.pt")


def tensor_offset(path: Path, storage: int = 0) -> tuple[int, int]:
    """(file offset, size) of a tensor storage's raw bytes inside a torch zip checkpoint (stored uncompressed)."""
    with zipfile.ZipFile(path) as z:
        infos = sorted((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size, reverse=True)
        info = infos[storage]
    with open(path, "rb") as f:  # the local header: 30 bytes, then the name and the extra field
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


@pytest.mark.parametrize("fill", [b"\x3f\x00\x00\x3f", b"\xff\xff\xff\xff"], ids=["finite", "nan"])
def test_64_overwritten_bytes_inside_a_tensor_are_refused(tiny_pretrain_run, tmp_path, capfd, monkeypatch, fill):
    """The red-team case: 64 bytes overwritten inside a tensor unpickle without any error (finite garbage, or NaN
    in an optimizer state); export, evaluate and resume all went on. The checksum catches both."""
    run = shutil.copytree(tiny_pretrain_run, tmp_path / "run")
    ckpt = run / "checkpoint.pt"
    offset, size = tensor_offset(ckpt)
    data = bytearray(ckpt.read_bytes())
    data[offset + size // 2 : offset + size // 2 + 64] = fill * 16
    ckpt.write_bytes(bytes(data))
    torch.load(ckpt, weights_only=True)  # still a valid torch file: only a checksum can tell
    with pytest.raises(CheckpointError, match="is damaged: its contents hash to"):
        load_checkpoint(ckpt)
    for command in ("export", "evaluate", "pretrain"):
        status, lines = mae(capfd, monkeypatch, *CHECKPOINT_COMMANDS[command](ckpt, tmp_path))
        assert_one_line(status, lines, command, ckpt)
        assert "is damaged" in lines[-1]


def test_non_finite_weights_and_optimizer_states_are_refused_by_name(tiny_pretrain_run, tmp_path):
    ckpt = load_checkpoint(tiny_pretrain_run / "checkpoint.pt")
    ckpt["model"]["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    state = next(iter(ckpt["optimizer"]["state"].values()))
    state["exp_avg_sq"].view(-1)[0] = float("inf")
    saved = save_checkpoint(tmp_path / "checkpoint.pt", ckpt)  # checksum of the NaN-bearing state: it matches
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in model\.blocks\.0\.attn\.qkv\.weight "
                                              r"\(1 of \d+\), optimizer\.state\.\d+\.exp_avg_sq \(1 of \d+\)"):
        load_checkpoint(saved)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_weights(saved)


def test_checkpoints_open_with_weights_only_and_old_ones_without_a_checksum_still_load(tiny_pretrain_run, tmp_path):
    raw = torch.load(tiny_pretrain_run / "checkpoint.pt", weights_only=True)
    assert raw["checksum"].startswith("sha256-tree-v1:")
    old = {k: v for k, v in raw.items() if k != "checksum"}  # as written before checksums existed
    torch.save(old, tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert ckpt["step"] == raw["step"] and torch.equal(ckpt["model"]["cls_token"], raw["model"]["cls_token"])
    assert "cls_token" in load_weights(tmp_path / "old.pt")[0]


def test_partial_checkpoint_files_left_by_a_kill_are_removed_at_the_next_start(tiny_pretrain_run, tmp_path, capfd,
                                                                               monkeypatch):
    run = shutil.copytree(tiny_pretrain_run, tmp_path / "run")
    stale = [run / "checkpoint.pt.k1ll3d.tmp", run / "metrics.jsonl.x8q2.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    status, lines = mae(capfd, monkeypatch, "pretrain", "--data", "mnist5k", "--out", str(run), "--resume")
    assert status == 0 and not any(p.exists() for p in stale), lines
    assert any("removed 2 partial file(s) left by an interrupted write" in ln for ln in lines), lines


def test_a_damaged_metrics_log_is_named_at_resume_and_a_torn_last_line_dropped(tiny_pretrain_run, tmp_path, capfd,
                                                                              monkeypatch):
    """metrics.jsonl is read back when a run resumes (to cut what a killed run logged past its checkpoint). Random
    bytes are damage, named; a last line cut short is what a kill during an append leaves, and is dropped."""
    import json

    run = shutil.copytree(tiny_pretrain_run, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    good = metrics.read_bytes()
    damage(metrics, "garbage")
    status, lines = mae(capfd, monkeypatch, "pretrain", "--data", "mnist5k", "--out", str(run), "--resume")
    assert_one_line(status, lines, "pretrain", metrics)
    metrics.write_bytes(good + b'{"step": 99, "lo')
    status, lines = mae(capfd, monkeypatch, "pretrain", "--data", "mnist5k", "--out", str(run), "--resume")
    assert status == 0, lines
    after = metrics.read_bytes()
    assert after == good and all(json.loads(ln)["step"] <= 6 for ln in good.splitlines()), (good[-300:], after[-300:])


# ----------------------------------------------------------------------------------------------- artifacts


def artifact_commands(artifact: Path, image: Path, tmp: Path, precision: str = "fp32") -> dict[str, list[str]]:
    return {
        "evaluate": ["evaluate", "--artifact", str(artifact), "--data", "digits", "--out", str(tmp / "eval")],
        "embed": ["embed", "--artifact", str(artifact), str(image), "--out", str(tmp / "v.npy"), "--workers", "0",
                  "--backend", "onnx", "--precision", precision],
        "serve": ["serve", "--artifact", str(artifact), "--port", free_port()],
    }


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
@pytest.mark.parametrize("command", ["evaluate", "embed", "serve"])
def test_a_damaged_artifact_stops_every_command_in_one_line(artifact_with_onnx, image, tmp_path, capfd, monkeypatch,
                                                            command, name, how):
    artifact = shutil.copytree(artifact_with_onnx, tmp_path / "artifact")
    damage(artifact / name, how)
    argv = artifact_commands(artifact, image, tmp_path)[command]
    if command == "embed":
        argv = argv[:-4]  # auto backend: damaged weights stop onnx runs too (their vectors are tied to them)
    status, lines = mae(capfd, monkeypatch, *argv)
    assert_one_line(status, lines, command, artifact / name)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("precision,name", [("fp32", "encoder.onnx"), ("fp16", "encoder.fp16.onnx"),
                                            ("int8", "encoder.int8.onnx")])
@pytest.mark.parametrize("command", ["embed", "serve"])
def test_a_damaged_onnx_file_stops_every_command_that_runs_it(artifact_with_onnx, image, tmp_path, capfd,
                                                              monkeypatch, command, precision, name, how):
    artifact = shutil.copytree(artifact_with_onnx, tmp_path / "artifact")
    damage(artifact / name, how)
    argv = artifact_commands(artifact, image, tmp_path, precision)[command]
    if command == "serve" and how == "deleted":  # an exported file may be removed; serving says so and goes on
        with pytest.raises(Started):
            mae(capfd, monkeypatch, *argv)
        warnings = [ln for ln in capfd.readouterr().err.splitlines() if "warning" in ln]
        assert len(warnings) == 1 and f"{artifact / name} passed parity at export but is missing" in warnings[0]
        return
    status, lines = mae(capfd, monkeypatch, *argv)
    assert_one_line(status, lines, command, artifact / name)


def test_embed_falls_back_past_a_damaged_onnx_file_with_a_one_line_warning(artifact_with_onnx, image, tmp_path,
                                                                          capfd, monkeypatch):
    import numpy as np

    from export.runtime import Embedder

    artifact = shutil.copytree(artifact_with_onnx, tmp_path / "artifact")
    damage(artifact / "encoder.onnx", "garbage")
    status, lines = mae(capfd, monkeypatch, "embed", "--artifact", str(artifact), str(image), "--out",
                        str(tmp_path / "v.npy"), "--workers", "0")
    assert status == 0 and len(lines) == 1, lines
    assert lines[0].startswith("mae embed: warning: onnx backend skipped: ") and "encoder.onnx" in lines[0]
    expected = Embedder.load(artifact_with_onnx, backend="torch").embed([image])
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), expected, atol=1e-5)


def test_random_bytes_in_our_json_files_name_the_file(artifact_with_onnx, tmp_path):
    """UTF-8 errors used to surface without a file name ("'utf-8' codec can't decode byte 0x8b in position 3")."""
    from mae.artifact import ArtifactError, read_config
    from mae.files import DamagedFileError, read_json, read_json_lines

    artifact = shutil.copytree(artifact_with_onnx, tmp_path / "artifact")
    (artifact / "config.json").write_bytes(b'{"format": 1, "\x8b\xff\x00": 2}')
    with pytest.raises(ArtifactError, match=rf"{artifact / 'config.json'} is not a readable artifact config: "
                                            r"byte \d+ is not UTF-8"):
        read_config(artifact)
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DamagedFileError, match=f"{nested} is not a readable JSON file"):
        read_json(nested)
    lines = tmp_path / "metrics.jsonl"
    lines.write_bytes(b'{"step": 1}\n{"step": 2\n')
    with pytest.raises(DamagedFileError, match=f"{lines} line 2 is not valid JSON"):
        read_json_lines(lines)
