"""An artifact's config.json: its file names, reading and writing it, and the hash that names the artifact.

Torch-free on purpose: a consumer that runs an exported file with onnxruntime (``mae search``, ``mae embed
--backend onnx``) reads the artifact through this module and starts without importing torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mae.files import sha256_file, write_json_atomic

FORMAT = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class ArtifactError(ValueError):
    """An artifact folder that is missing, incomplete, or whose files disagree."""


def content_sha256(weights: Path, config: dict[str, Any]) -> str:
    """Identity of an artifact: its weights and everything that changes what the weights compute."""
    h = hashlib.sha256()
    sha256_file(weights, h)
    meaning = {k: config.get(k) for k in ("model", "preprocessing", "pooling", "fc_norm", "labels")}
    h.update(json.dumps(meaning, sort_keys=True).encode())
    return h.hexdigest()


def write_config(path: str | Path, config: dict[str, Any]) -> None:
    """Rewrite config.json atomically (export stages add their figures under ``export``)."""
    write_json_atomic(Path(path) / CONFIG, config)


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"no artifact at {path}")
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file; an artifact is a folder with {CONFIG} and {WEIGHTS}")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).exists():
            raise ArtifactError(f"{path} is not a complete artifact: {name} is missing")
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path / CONFIG} is not valid JSON ({e})") from e
    if config.get("format", 0) > FORMAT:
        raise ArtifactError(f"{path} has artifact format {config['format']}; this version reads up to {FORMAT}")
    for key in ("model", "timm", "preprocessing", "pooling", "embed_dim", "sha256"):
        if key not in config:
            raise ArtifactError(f"{path / CONFIG} lacks {key!r}")
    return config
