"""Export, then prove it: every exported file is run on real images and compared with eager PyTorch.

One place for what every format (ONNX fp32 / fp16 / int8, TensorRT, compiled torch) uses: the reference images
(bundled real images, split into a judged half and an int8-calibration half that never overlap), the reference
outputs, the comparison figures, the verdict against a tolerance (each format's row in ``export.formats`` gives its
own), and the record in the artifact's config.json (``export.<key>``). A file that misses its tolerance is deleted
and ``ParityError`` is raised, so a file on disk has passed. It also holds the stamp that ties an exported file to
the weights it came from.

Top-1 agreement of a head is judged as a statistical test, not a count: with ~250 judged images, a 99% rule
read literally allows two flips, and a classifier's near-ties flip by the noise of int8 arithmetic, which
differs between CPUs (VNNI or not). The file fails when its flips are too many to be chance for a file whose
true agreement is at least the tolerance (one-sided binomial test at significance ``ALPHA``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.formats import (
    META_PRECISION,
    META_SHA,
    TOLERANCES,  # noqa: F401  (re-exported: the tolerances live in the registry's rows)
    require_made_from,
)
from mae.artifact import Artifact
from mae.artifact_config import CONFIG, ArtifactConfig, ArtifactError, write_config
from mae.errors import UsageError, UserError
from mae.files import sha256_file
from mae.images import Preprocessing
from mae.sources import load_source

DEFAULT_DATA = ("mnist5k", "photos")
# Real images drawn: half judge parity, the other half calibrate int8 (never the same images).
PARITY_IMAGES = 512
NEIGHBOURS = 10
ALPHA = 0.01
"""Significance of the top-1 agreement test: a good file is failed by chance at most this often."""


class ParityError(UserError, RuntimeError):
    """An exported file whose outputs differ from PyTorch by more than its tolerance (the file is deleted)."""


# ----------------------------------------------------------------------------------------------- references


def reference_images(specs: Sequence[str], count: int, preprocessing: Preprocessing
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Real images from bundled sets (or folders), spread evenly over each: (judged, calibration, description).

    The two sets are disjoint (alternate picks; an image whose bytes repeat one already drawn is dropped), so
    int8 is never judged on the images it was calibrated on.
    """
    if count < 2:
        raise UsageError(f"need at least 2 parity images, got {count}")
    per_source = max(1, count // max(len(specs), 1))
    judged: list[torch.Tensor] = []
    calibration: list[torch.Tensor] = []
    seen: set[bytes] = set()
    used = {}
    for spec in specs:
        source = load_source(spec)
        n = min(len(source), 2 * per_source)
        picks = np.unique(np.linspace(0, len(source) - 1, n).round().astype(int))
        taken = 0
        for j, i in enumerate(picks):
            x = preprocessing(source.read(int(i)))
            key = x.numpy().tobytes()
            if key in seen:
                continue
            seen.add(key)
            (judged if j % 2 == 0 else calibration).append(x)
            taken += j % 2 == 0
        used[source.name] = taken
    if not calibration:
        raise UsageError(f"{', '.join(specs)} gave {len(judged)} image(s): parity needs at least 2 distinct images")
    info = {"sources": used, "images": len(judged), "calibration_images": len(calibration)}
    return torch.stack(judged).numpy(), torch.stack(calibration).numpy(), info


def output_names(art: Artifact, tokens: bool = False) -> list[str]:
    return ["embedding"] + (["logits"] if art.labels else []) + (["tokens"] if tokens else [])


def torch_outputs(art: Artifact, pixels: np.ndarray, tokens: bool = False, batch: int = 32) -> dict[str, np.ndarray]:
    """Eager PyTorch fp32 on CPU: the reference every file is compared with."""
    names = output_names(art, tokens)
    parts: list[tuple[torch.Tensor, ...]] = []
    encoder = art.encoder.cpu().eval()
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            parts.append(encoder(torch.from_numpy(pixels[i : i + batch]), return_tokens=tokens))
    return {name: torch.cat([p[k] for p in parts]).numpy() for k, name in enumerate(names)}


# ----------------------------------------------------------------------------------------------- figures


def compare(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], neighbours: bool) -> dict[str, Any]:
    """Max abs difference and cosine (min and mean over images) per output; top-1 agreement (and flips) for
    logits; overlap of each image's top-10 neighbours among the set (embeddings) when ``neighbours``."""
    figures: dict[str, Any] = {}
    for name, ref in reference.items():
        out = got[name].astype(np.float32)
        r = ref.reshape(len(ref), -1).astype(np.float64)
        g = out.reshape(len(out), -1).astype(np.float64)
        cos = (r * g).sum(1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1), 1e-12)
        entry = {"max_abs": float(np.abs(ref - out).max()), "cosine_min": float(cos.min()),
                 "cosine_mean": float(cos.mean())}
        if name == "logits":
            agree = ref.argmax(1) == out.argmax(1)
            entry.update(top1_agreement=float(agree.mean()), top1_flips=int((~agree).sum()), images=len(agree))
        if name == "embedding" and neighbours:
            entry[f"top{NEIGHBOURS}_neighbour_overlap"] = neighbour_overlap(ref, out, NEIGHBOURS)
        figures[name] = entry
    return figures


def neighbour_overlap(reference: np.ndarray, other: np.ndarray, k: int) -> float:
    """Mean share of each image's k nearest neighbours (cosine, self excluded) that both embeddings agree on."""
    k = min(k, len(reference) - 1)
    if k < 1:
        return 1.0

    def knn(x: np.ndarray) -> np.ndarray:
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = knn(reference.astype(np.float64)), knn(other.astype(np.float64))
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def flips_p_value(flips: int, images: int, agreement: float) -> float:
    """P(at least ``flips`` disagreements in ``images``) for a file whose true top-1 agreement is ``agreement``.

    One-sided binomial tail, summed in log space (exact for any size).
    """
    p = 1.0 - agreement
    if flips <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(images + 1) - math.lgamma(i + 1) - math.lgamma(images - i + 1) + i * log_p
             + (images - i) * log_q for i in range(flips, images + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def failures(figures: dict[str, Any], tolerance: dict[str, float]) -> list[str]:
    """What misses ``tolerance``: an empty list means the file passes."""
    bad = []
    for name, entry in figures.items():
        if not entry["cosine_min"] >= tolerance["cosine"]:
            bad.append(f"{name} cosine {entry['cosine_min']:.6f} < {tolerance['cosine']}")
        if "top1_flips" in entry and "top1_agreement" in tolerance:
            p = flips_p_value(entry["top1_flips"], entry["images"], tolerance["top1_agreement"])
            entry["top1_p_value"] = p
            if p < ALPHA:
                bad.append(f"{name} top-1 agreement {entry['top1_agreement']:.4f} ({entry['top1_flips']} flips in "
                           f"{entry['images']}): a file agreeing on >= {tolerance['top1_agreement']:.0%} would flip "
                           f"that many with probability {p:.2g} < {ALPHA}")
    return bad


def prove(path: Path, key: str, info: dict[str, Any], reference: dict[str, np.ndarray],
          got: dict[str, np.ndarray], *, tolerance: dict[str, float], neighbours: bool = True,
          files: Iterable[Path] = ()) -> dict[str, Any]:
    """Compare ``got`` with ``reference`` under ``tolerance`` (``export.formats.tolerance``), record ``info`` in
    config.json as ``export.<key>``, and on failure delete ``files`` and raise ``ParityError``. Returns ``info``."""
    files = list(files)
    info["parity"] = compare(reference, got, neighbours)
    problems = failures(info["parity"], tolerance)
    info.update(tolerance=tolerance, passed=not problems)
    if not problems:  # the bytes that passed: a file damaged later is told apart from this one (check_recorded)
        info["files_sha256"] = {p.name: sha256_file(p) for f in files
                                for p in (f, f.with_name(f.name + ".data")) if p.exists()}
    update_export_record(path, {key: info})
    if problems:
        for f in files:
            for p in (f, f.with_name(f.name + ".data")):  # an ONNX file's external weights too
                p.unlink(missing_ok=True)
        name = info.get("file", key)
        images = len(next(iter(reference.values())))
        raise ParityError(f"{name} misses its tolerance on {images} real images: {'; '.join(problems)} "
                          f"(figures in {path / CONFIG}; file deleted)")
    return info


def update_export_record(path: Path, updates: dict[str, Any], reset: bool = False) -> dict[str, Any]:
    """Merge ``updates`` into config.json's ``export`` section (``reset``: start it afresh); returns the section."""
    config = ArtifactConfig.read(path)
    record = {} if reset else dict(config.export)
    record.update(updates)
    write_config(path, config.with_export(record))
    return record


# ----------------------------------------------------------------------------------------------- stamps


def stamp_onnx(path: Path, sha256: str, precision: str) -> None:
    """Record in an ONNX file which artifact (weights) it was exported from, so a stale file is never run."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    props.update({META_SHA: sha256, META_PRECISION: precision})
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def read_onnx_stamp(path: str | Path) -> dict[str, str]:
    """An ONNX file's metadata; an unreadable file is an ArtifactError naming it (not a protobuf traceback)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError, truncated files, ...
        raise ArtifactError(f"{path} is not a readable ONNX file ({type(e).__name__}); "
                            "re-run mae export for this artifact") from e
    if not model.graph.node:  # protobuf parses zero bytes (and some cut-short files) as an empty model
        raise ArtifactError(f"{path} holds no ONNX graph (empty or cut short); re-run mae export for this artifact")
    return {p.key: p.value for p in model.metadata_props}


def check_recorded(file: Path, config: ArtifactConfig) -> None:
    """Refuse an exported file whose bytes differ from those that passed parity (``files_sha256`` in its record).

    A stamp says which weights a file came from; only its hash says the file is still what was proven. Files
    exported before hashes were recorded are let through (their stamp is still checked by the caller).
    """
    recorded = config.recorded_sha256(file.name)
    if recorded is None:
        return
    actual = sha256_file(file)
    if actual != recorded:
        raise ArtifactError(f"{file} is damaged: its bytes hash to {actual[:12]}, not the {recorded[:12]} that passed "
                            "parity at export; re-run mae export for this artifact")


def check_onnx_stamp(file: Path, config: ArtifactConfig) -> None:
    """An ONNX file that can run for this artifact: readable, stamped with its weights, and undamaged."""
    require_made_from(read_onnx_stamp(file).get(META_SHA), config, file,
                      "re-run `mae export --onnx` for this artifact")
    check_recorded(file, config)
