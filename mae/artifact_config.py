"""An artifact's config.json: its file names, reading and writing it, and the hash that names the artifact.

Torch-free on purpose: a consumer that runs an exported file with onnxruntime (``mae search``, ``mae embed
--backend onnx``) reads the artifact through this module and starts without importing torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mae.files import DamagedFileError, read_json, sha256_file, write_json_atomic

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
    """An artifact's config.json, checked for the fields every consumer reads; problems name the file."""
    from mae.images import Preprocessing

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"no artifact at {path}")
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file; an artifact is a folder with {CONFIG} and {WEIGHTS}")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).exists():
            raise ArtifactError(f"{path} is not a complete artifact: {name} is missing")
    try:
        config = read_json(path / CONFIG, "artifact config")
    except DamagedFileError as e:
        raise ArtifactError(f"{e}; re-run mae export for this artifact") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path / CONFIG} holds a JSON {type(config).__name__}, not the artifact's config object")
    if not isinstance(config.get("format", 0), int) or config.get("format", 0) > FORMAT:
        raise ArtifactError(f"{path} has artifact format {config['format']!r}; this version reads up to {FORMAT}")
    for key in ("model", "timm", "preprocessing", "pooling", "embed_dim", "sha256"):
        if key not in config:
            raise ArtifactError(f"{path / CONFIG} lacks {key!r}")
    try:  # the fields every consumer reads before anything else: a damaged value is named here, not as a KeyError
        Preprocessing.from_dict(config["preprocessing"])
        int(config["embed_dim"])
        str(config["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path / CONFIG}: its preprocessing or embed_dim is malformed "
                            f"({type(e).__name__}: {e})") from None
    return config


def verify_weights(path: str | Path) -> dict[str, Any]:
    """Check that an artifact's weights are the ones it was exported with; returns its config.

    The recorded sha256 covers model.safetensors byte for byte and the config fields that give the weights their
    meaning, so a truncated, zeroed or overwritten weights file (or an edited model section) is refused here,
    naming the file, before any consumer builds a model from it.
    """
    path = Path(path)
    config = read_config(path)
    actual = content_sha256(path / WEIGHTS, config)
    if actual != config["sha256"]:
        raise ArtifactError(f"{path / WEIGHTS} is damaged or was changed since export: the weights and the model "
                            f"fields of {CONFIG} hash to {actual[:12]}, the artifact records "
                            f"{str(config['sha256'])[:12]}; re-run mae export")
    return config
