"""Many processes and nodes on one CPU: two torchrun agents (gloo over loopback) for training, ``mae index build``
and ``mae embed``; FSDP2 against DDP; activation checkpointing; and what ``mae search`` imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, tiny_config, tiny_sets


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_agents(*args: str, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes 2 --node_rank R --nproc_per_node 1 -m cli ARGS`` for R = 0, 1, as two machines would
    run it (one agent each, rendezvous over loopback)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for r, d in enumerate(done):
        assert d.returncode == 0, f"agent {r} failed:\n{d.stderr[-3000:]}"
    return done


def nproc(n: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port",
                           str(_free_port()), "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny artifact and a folder of 30 labelled digit images."""
    from mae import artifact
    from mae.sources import export_source, load_source

    root = tmp_path_factory.mktemp("dist")
    art = artifact.from_random_init(root / "art", tiny_config())
    export_source(load_source("digits"), root / "images", list(range(30)))
    return art, root / "images"


def test_index_build_and_embed_on_two_agents(collection, tmp_path):
    """Each rank embeds half the files; rank 0 trains the IVF on all vectors, every rank fills its copy, rank 0
    merges them on disk. The index and the vectors are the ones one process makes."""
    from retrieval.build import build_index

    art, images = collection
    one = build_index(art, [images], tmp_path / "one", factory="IVF2,Flat", workers=0, progress=False)
    agents = two_agents("index", "build", "--artifact", str(art), "--images", str(images), "--out",
                        str(tmp_path / "two"), "--factory", "IVF2,Flat", "--workers", "0", "--json")
    two = json.loads(agents[0].stdout)
    assert agents[1].stdout.strip() == ""  # only rank 0 reports
    assert two["count"] == one["count"] == 30 and two["images_per_rank"] == [15, 15]
    assert two["on_disk"] and two["labels"] == one["labels"]
    assert not list(tmp_path.glob(".two.*")), "the work folder is removed"
    from retrieval.index import Index

    a, b = Index.load(tmp_path / "one"), Index.load(tmp_path / "two")
    q = np.random.default_rng(0).standard_normal((5, a.dim)).astype(np.float32)
    ids_a, ids_b = a.search_ids(q, 5)[1], b.search_ids(q, 5)[1]
    assert [[a.item(int(i)).path for i in row] for row in ids_a] == [[b.item(int(i)).path for i in row]
                                                                      for row in ids_b]
    two_agents("embed", "--artifact", str(art), str(images), "--out", str(tmp_path / "v.npy"), "--workers", "0")
    from export.runtime import Embedder
    from mae.sources import list_images

    files, _ = list_images([images])
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), Embedder.load(art).embed(files), rtol=0, atol=1e-6)
    rows = json.loads((tmp_path / "v.json").read_text())
    assert rows["paths"] == [str(f.resolve()) for f in files] and rows["world_size"] == 2


def test_fsdp_matches_ddp_and_its_checkpoint_opens_in_one_process(tmp_path):
    """FSDP2 over 2 CPU processes (gloo): the same losses as DDP on the same data, and a checkpoint with full state
    dicts that one process resumes (weights and optimiser state equal to DDP's within float tolerance)."""
    sets = tiny_sets("optim.batch_size=8", "run.log_every=1", "run.ckpt_every=3")
    for name, extra in (("ddp", []), ("fsdp", ["--set", "run.fsdp=true"])):
        nproc(2, "pretrain", "--data", "digits", "--out", str(tmp_path / name), "--steps", "3", *sets, *extra)
    losses = {name: [json.loads(ln)["loss"] for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("ddp", "fsdp")}
    assert len(losses["ddp"]) == 3
    np.testing.assert_allclose(losses["fsdp"], losses["ddp"], rtol=1e-5)
    ddp, fsdp = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("ddp", "fsdp"))
    assert ddp["model"].keys() == fsdp["model"].keys()
    for k in ddp["model"]:
        torch.testing.assert_close(fsdp["model"][k], ddp["model"][k], rtol=1e-4, atol=1e-6)
    assert [g["params"] for g in fsdp["optimizer"]["param_groups"]] == \
        [g["params"] for g in ddp["optimizer"]["param_groups"]]

    from mae.config import Config
    from mae.dist import init_distributed
    from training.pretrain import Pretrainer
    from training.rundir import RunDir

    dist = init_distributed("cpu")
    cfg = Config.from_dict(fsdp["config"])
    trainer = Pretrainer(cfg, RunDir(tmp_path / "fsdp", dist), dist, "digits")
    trainer.resume()  # one process, the sharded run's checkpoint: model and optimizer load as they are
    assert trainer.step == 3
    state = trainer.optimizer.state_dict()["state"]
    for i, s in ddp["optimizer"]["state"].items():
        torch.testing.assert_close(state[i]["exp_avg"], s["exp_avg"], rtol=1e-4, atol=1e-7)


def test_activation_checkpointing_gives_the_same_step():
    from mae.model import MaskedAutoencoder

    cfg = tiny_config().model
    torch.manual_seed(0)
    plain, ckpt = MaskedAutoencoder(cfg), MaskedAutoencoder(cfg)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    la, lb = plain(imgs, noise=noise)[0], ckpt(imgs, noise=noise)[0]
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    for (name, pa), (_, pb) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fsdp_refuses_fp16_loss_scaling(tmp_path):
    from mae.dist import Dist
    from training.pretrain import Pretrainer
    from training.rundir import RunDir

    dist = Dist(1, 2, 0, torch.device("cpu"))  # rank 1 of 2: writes nothing; the check precedes every collective
    with pytest.raises(ValueError, match="run.fsdp with run.amp=fp16"):
        Pretrainer(tiny_config("run.fsdp=true", "run.amp=fp16"), RunDir(tmp_path, dist), dist, "digits")


def test_search_with_onnxruntime_never_imports_torch(tmp_path, tmp_path_factory):
    """``mae search`` on an ONNX artifact and a flat index starts without torch (or timm): a torch that fails to
    import proves it."""
    from mae.sources import export_source, load_source
    from retrieval.build import build_index
    from tests.export_helpers import exported

    art = exported(tmp_path_factory, "plain")  # shared with the export and runtime tests
    images = tmp_path / "images"
    export_source(load_source("digits"), images, list(range(12)))
    build_index(art, [images], tmp_path / "index", workers=0, progress=False)
    env = {**os.environ}
    poisoned = tmp_path / "poison"
    for name in ("torch", "timm"):
        (poisoned / name).mkdir(parents=True)
        (poisoned / name / "__init__.py").write_text(f"raise ImportError('mae search imported {name}')\n")
    env["PYTHONPATH"] = f"{poisoned}{os.pathsep}{ROOT}"
    query = sorted(images.rglob("*.png"))[3]
    proc = subprocess.run([sys.executable, "-m", "cli", "search", "--index", str(tmp_path / "index"), str(query),
                           "-k", "2", "--json"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hits = json.loads(proc.stdout)["neighbours"]
    assert hits[0]["file"] == str(query.resolve()) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


FSDP_RESUME = """
import sys
sys.path.insert(0, {root!r})
import torch
from tests.conftest import tiny_config
from mae.dist import init_distributed, shutdown_distributed
from training.rundir import RunDir
from training.pretrain import Pretrainer

cfg = tiny_config("run.steps=4", "run.ckpt_every=2", "run.fsdp=true", "optim.batch_size=8")
dist = init_distributed("cpu")


class Stop(Exception):
    pass


class StopsAt3(Pretrainer):
    def loss(self, model, images, labels):
        if self.step == 3:
            raise Stop
        return super().loss(model, images, labels)


straight = Pretrainer(cfg, RunDir({out!r} + "/straight", dist), dist, "digits")
straight.fit()
try:
    StopsAt3(cfg, RunDir({out!r} + "/resumed", dist), dist, "digits").fit()
except Stop:
    pass
resumed = Pretrainer(cfg, RunDir({out!r} + "/resumed", dist), dist, "digits")
resumed.resume()
assert resumed.step == 2, resumed.step
resumed.fit()
a, b = straight.model_state(), resumed.model_state()  # gathered on every rank
assert all(torch.equal(a[k], b[k]) for k in a), "FSDP resume differs"
del straight, resumed  # as when `mae pretrain` returns: the sharded models go before the process group
shutdown_distributed()
"""


def test_fsdp_resumes_exactly(tmp_path):
    """A sharded run stopped after its step-2 checkpoint and resumed sharded ends with the weights of a run that
    was never stopped (full state dicts scattered back to the shards)."""
    script = tmp_path / "fsdp_resume.py"
    script.write_text(FSDP_RESUME.format(root=str(ROOT), out=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(_free_port()), str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
