"""An artifact's config.json: its file names, its one typed form (``ArtifactConfig``), and the hash that names it.

Every consumer (``mae.artifact.load``, ``Embedder``, the exporters, ``mae serve``, ``mae index``) reads an artifact's
config through ``ArtifactConfig.read`` (or ``verify_weights``, which also checks the weights): the file is checked
once, here, and what it says is read from typed, frozen fields, never from the raw dict. The file's format does not
change: ``ArtifactConfig`` keeps the JSON object as it was read (``to_dict``), so a field this version does not know
survives a rewrite.

Torch-free and light on purpose: a consumer that runs an exported file with onnxruntime (``mae search``, ``mae embed
--backend onnx``) reads the artifact through this module and starts without importing torch, and the CLI imports it
(through ``export.formats``) while building its parser. The preprocessing (NumPy and PIL) is imported on first read.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from mae.errors import UserError
from mae.files import DamagedFileError, read_json, sha256_file, write_json_atomic

if TYPE_CHECKING:
    from mae.images import Preprocessing

FORMAT = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
POOLINGS = ("token", "avg")
REQUIRED = ("model", "timm", "preprocessing", "pooling", "embed_dim", "sha256")
"""The fields every artifact has; one without them is refused before anything else is read."""
MEANING = ("model", "preprocessing", "pooling", "fc_norm", "labels")
"""The fields that change what the weights compute: the artifact's sha256 covers them with the weights."""


class ArtifactError(UserError, ValueError):
    """An artifact folder that is missing, incomplete, or whose files disagree."""


@dataclass(frozen=True)
class ArtifactSource:
    """The checkpoint an artifact was exported from (config.json's ``source``)."""

    checkpoint: str
    """Absolute path of the checkpoint file or run folder, as it was at export."""
    sha256: str
    """sha256 of the checkpoint file's bytes."""
    recipe: dict[str, Any] | None = None
    """How the embedding was trained when that is not MAE pretraining or finetuning: a contrastive run's task,
    stage, pooling and view recipe (``mae finetune --contrastive``)."""

    @classmethod
    def from_dict(cls, d: Any) -> ArtifactSource | None:
        """None for an artifact made without a checkpoint (``from_random_init``: an empty ``source``)."""
        if isinstance(d, dict) and isinstance(d.get("checkpoint"), str) and isinstance(d.get("sha256"), str):
            recipe = d.get("recipe")
            return cls(d["checkpoint"], d["sha256"], recipe if isinstance(recipe, dict) else None)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True, eq=False)
class ArtifactConfig:
    """An artifact's config.json, checked once: what every consumer reads. Built by ``read`` or ``from_dict``."""

    sha256: str
    """Identity of the artifact: the weights plus the ``MEANING`` fields (``content_sha256``). Every exported file,
    index and embedding records it; one made from other weights is refused."""
    embed_dim: int
    """D of the (N, D) L2-normalised embeddings."""
    preprocessing: Preprocessing
    """Evaluation preprocessing (size, channels, mean, std, interpolation, crop): the same for every backend."""
    pooling: str
    """How the tokens become the embedding: "token" (class token) or "avg" (mean of the patch tokens)."""
    fc_norm: bool
    """Whether the pooled feature goes through ``fc_norm`` (avg-pooled finetunes) rather than ``norm``."""
    labels: tuple[str, ...] | None
    """Class names of the head's outputs, in order; None without a head."""
    model: Mapping[str, Any]
    """The encoder's ``ModelConfig`` fields (img_size, patch_size, in_chans, embed_dim, depth, num_heads, ...)."""
    timm: Mapping[str, Any]
    """``timm.create_model`` arguments that load the weights (model_name, kwargs, pretrained_cfg_overlay)."""
    source: ArtifactSource | None
    """The checkpoint the weights came from (None: made without one)."""
    export: Mapping[str, Any]
    """Per exported file, how it was made and how close it came to PyTorch (``export.parity``); empty before."""
    versions: Mapping[str, Any]
    """Library versions that wrote the artifact (mae, torch, timm, python)."""
    format: int
    """The config.json format version (``FORMAT``)."""
    raw: Mapping[str, Any] = field(repr=False)
    """The JSON object as read: ``to_dict`` gives it back, unknown fields included."""

    @classmethod
    def read(cls, path: str | Path) -> ArtifactConfig:
        """The config of the artifact folder ``path``; a missing folder, file or field is an ArtifactError naming it."""
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
        return cls.from_dict(config, path / CONFIG)

    @classmethod
    def from_dict(cls, config: Any, where: str | Path = CONFIG) -> ArtifactConfig:
        """Check a config.json object (``where`` names it in errors) and type it."""
        from mae.images import Preprocessing

        if not isinstance(config, dict):
            raise ArtifactError(f"{where} holds a JSON {type(config).__name__}, not the artifact's config object")
        version = config.get("format", 0)
        if not isinstance(version, int) or version > FORMAT:
            raise ArtifactError(f"{Path(where).parent} has artifact format {version!r}; this version reads up to "
                                f"{FORMAT}")
        for key in REQUIRED:
            if key not in config:
                raise ArtifactError(f"{where} lacks {key!r}")
        try:  # a damaged value is named here, once, rather than as a KeyError deep inside a consumer
            preprocessing = Preprocessing.from_dict(config["preprocessing"])
            embed_dim = int(config["embed_dim"])
            labels = _labels(config.get("labels"))
            sections = {key: _section(config, key) for key in ("model", "timm", "export", "versions")}
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: its preprocessing, embed_dim, labels or sections are malformed "
                                f"({type(e).__name__}: {e})") from None
        if config["pooling"] not in POOLINGS:
            raise ArtifactError(f"{where}: pooling must be one of {POOLINGS}, got {config['pooling']!r}")
        raw = copy.deepcopy(config)
        return cls(sha256=str(config["sha256"]), embed_dim=embed_dim, preprocessing=preprocessing,
                   pooling=config["pooling"], fc_norm=bool(config.get("fc_norm", False)), labels=labels,
                   source=ArtifactSource.from_dict(config.get("source")), format=version, raw=MappingProxyType(raw),
                   **{key: MappingProxyType(copy.deepcopy(value)) for key, value in sections.items()})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object to write (a copy: changing it changes nothing here)."""
        return copy.deepcopy(dict(self.raw))

    def with_export(self, record: Mapping[str, Any]) -> ArtifactConfig:
        """This config with its ``export`` section replaced (the exporters' record of their files)."""
        return ArtifactConfig.from_dict({**self.to_dict(), "export": copy.deepcopy(dict(record))})

    @property
    def num_classes(self) -> int:
        """Outputs of the head (0: no head)."""
        return len(self.labels or ())

    def recorded_sha256(self, file_name: str) -> str | None:
        """The sha256 an exported file had when it passed parity (its record's ``files_sha256``), if recorded."""
        for entry in self.export.values():
            hashes = entry.get("files_sha256") if isinstance(entry, dict) else None
            if isinstance(hashes, dict) and file_name in hashes:
                return hashes[file_name]
        return None

    def recorded_files(self) -> list[str]:
        """Every file name some export record says passed parity (whether or not it is still there)."""
        return [name for entry in self.export.values() if isinstance(entry, dict)
                and isinstance(entry.get("files_sha256"), dict) for name in entry["files_sha256"]]


def _labels(value: Any) -> tuple[str, ...] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"labels must be a list of class names, got {str(value)[:80]}")
    return tuple(value)


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    if value is None and key in ("export", "versions"):  # written later (export), or by older versions
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{key!r} must be a JSON object, got {type(value).__name__}")
    return value


def content_sha256(weights: Path, config: Mapping[str, Any]) -> str:
    """Identity of an artifact: its weights and everything that changes what the weights compute (``MEANING``)."""
    h = hashlib.sha256()
    sha256_file(weights, h)
    meaning = {k: config.get(k) for k in MEANING}
    h.update(json.dumps(meaning, sort_keys=True).encode())
    return h.hexdigest()


def write_config(path: str | Path, config: ArtifactConfig | dict[str, Any]) -> None:
    """Rewrite config.json atomically (export stages add their figures under ``export``)."""
    data = config.to_dict() if isinstance(config, ArtifactConfig) else config
    write_json_atomic(Path(path) / CONFIG, data)


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json as the plain JSON object, checked by ``ArtifactConfig.read``: for tools and tests that look at the
    file itself. Product code reads the typed ``ArtifactConfig``."""
    return ArtifactConfig.read(path).to_dict()


def verify_weights(path: str | Path) -> ArtifactConfig:
    """Check that an artifact's weights are the ones it was exported with; returns its config.

    The recorded sha256 covers model.safetensors byte for byte and the config fields that give the weights their
    meaning, so a truncated, zeroed or overwritten weights file (or an edited model section) is refused here,
    naming the file, before any consumer builds a model from it.
    """
    path = Path(path)
    config = ArtifactConfig.read(path)
    actual = content_sha256(path / WEIGHTS, config.raw)
    if actual != config.sha256:
        raise ArtifactError(f"{path / WEIGHTS} is damaged or was changed since export: the weights and the model "
                            f"fields of {CONFIG} hash to {actual[:12]}, the artifact records "
                            f"{config.sha256[:12]}; re-run mae export")
    return config
