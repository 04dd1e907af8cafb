"""Both bentofiles build (``bentoml build``: a bento in a temporary BENTOML_HOME, no container, no network), and the
GPU one asks for one CUDA: the base image's major version and every CUDA wheel's.

Which release of each package is built for which CUDA is a fact of the package indexes, written down here (checked
with ``pip install --dry-run --report`` against PyPI's metadata): a specifier that admits a CUDA 13 build beside a
CUDA 12 image is what let ``onnxruntime-gpu>=1.18`` resolve to 1.27 before.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
BENTOML = Path(sys.executable).with_name("bentoml")

# package -> (first release built for CUDA 13, a release built for CUDA 12) on PyPI's Linux x86_64 wheels.
CUDA13_FROM = {
    "torch": ("2.10.0", "2.9.1"),  # 2.9.1 requires nvidia-cuda-runtime-cu12 12.8; 2.11.0 cuda-toolkit 13.0
    "onnxruntime-gpu": ("1.27.0", "1.26.0"),  # 1.26.0 [cuda] extra: nvidia-*-cu12; 1.27.0: nvidia-*-cu13
    "faiss-gpu": ("1.16.0", "1.15.1"),  # 1.15.1 requires nvidia-cuda-runtime-cu12 <13 (no CUDA 13 release yet)
}


def build(bentofile: str, home: Path) -> Path:
    """``bentoml build -f serving/BENTOFILE .`` from the project root, offline; returns the bento's folder."""
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(ROOT),
           # any attempt to reach the network fails at once: the build must not need it
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "PIP_NO_INDEX": "1"}
    done = subprocess.run([str(BENTOML), "build", "-f", f"serving/{bentofile}", "."], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"bentoml build -f serving/{bentofile} failed:\n{done.stdout}\n{done.stderr}"
    assert "Successfully built Bento" in done.stdout
    [bento] = [p for p in (home / "bentos" / "mae-service").iterdir() if p.is_dir() and p.name != "latest"]
    return bento


@pytest.fixture(scope="module")
def bentos(tmp_path_factory) -> dict[str, Path]:
    return {name: build(name, tmp_path_factory.mktemp("bentoml-home")) for name in ("bentofile.yaml",
                                                                                  "bentofile.gpu.yaml")}


def requirements(bento: Path) -> dict[str, Requirement]:
    lines = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith(("#", "-"))]
    return {r.name.lower(): r for r in reqs}


def test_both_bentos_build_with_the_service_and_its_page(bentos):
    for name, bento in bentos.items():
        source = bento / "src"
        for part in ("serving/service.py", "serving/web/index.html", "serving/web/app.js", "mae/shards.py",
                     "retrieval/index.py", "export/runtime.py"):
            assert (source / part).is_file(), (name, part)
        assert not (source / "tests").exists(), name
        meta = yaml.safe_load((bento / "bento.yaml").read_text())
        assert meta["service"] == "serving.service:MAEService" and meta["labels"]["flavour"] in ("cpu", "gpu")
        assert {"torch", "bentoml", "timm"} <= set(requirements(bento)), name


def test_the_gpu_bento_asks_for_one_cuda(bentos):
    bento = bentos["bentofile.gpu.yaml"]
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    [image] = re.findall(r"^FROM (nvidia/cuda:(\d+)\.(\d+)\S*)", dockerfile, re.MULTILINE)[:1]
    assert image[1] == "12", f"the GPU image is {image[0]}; its wheels are CUDA 12 builds"
    reqs = requirements(bento)
    for name, (cuda13, cuda12) in CUDA13_FROM.items():
        assert name in reqs, f"{name} is not in the GPU bento"
        assert not reqs[name].specifier.contains(cuda13, prereleases=True), \
            f"{reqs[name]} admits {name} {cuda13}, a CUDA 13 build, on a CUDA {image[1]} image"
        assert reqs[name].specifier.contains(cuda12), f"{reqs[name]} refuses {name} {cuda12}, a CUDA 12 build"
    # TensorRT: NVIDIA's cu12 packages, one release, wheels from NVIDIA's index; never the stub that runs pip
    assert "tensorrt" not in reqs and "tensorrt-cu13-libs" not in reqs
    libs, bindings = reqs["tensorrt-cu12-libs"], reqs["tensorrt-cu12-bindings"]
    assert str(libs.specifier).startswith("==") and libs.specifier == bindings.specifier
    install = (bento / "env" / "python" / "install.sh").read_text()
    assert "https://pypi.nvidia.com" in install and "--only-binary=tensorrt-cu12-libs,tensorrt-cu12-bindings" in install
    assert reqs["onnxruntime-gpu"] and "onnxruntime" not in reqs and "faiss-cpu" not in reqs


def test_the_cpu_bento_takes_no_gpu_runtime(bentos):
    reqs = requirements(bentos["bentofile.yaml"])
    assert {"onnxruntime", "faiss-cpu"} <= set(reqs)
    assert not {"onnxruntime-gpu", "faiss-gpu", "tensorrt", "tensorrt-cu12-libs"} & set(reqs)
    dockerfile = (bentos["bentofile.yaml"] / "env" / "docker" / "Dockerfile").read_text()
    assert "nvidia/cuda" not in dockerfile


def test_the_gpu_extra_matches_the_gpu_bento():
    """pyproject's `gpu` extra and the GPU bento admit the same CUDA (a user's `pip install .[gpu]` is the bento's
    environment)."""
    import tomllib

    extra = {Requirement(r).name: Requirement(r) for r in
             tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]}
    for name in ("onnxruntime-gpu", "faiss-gpu"):
        cuda13, cuda12 = CUDA13_FROM[name]
        assert not extra[name].specifier.contains(cuda13) and extra[name].specifier.contains(cuda12), extra[name]
    assert "tensorrt" not in extra and "tensorrt-cu12" in extra
