"""``mae export``: checkpoint -> artifact folder (config.json + model.safetensors), then the requested formats."""

from __future__ import annotations

import argparse
from typing import Any

from mae import artifact


def main(args: argparse.Namespace) -> dict[str, Any]:
    out = artifact.from_checkpoint(args.checkpoint, args.out, pooling=args.pooling)
    art = artifact.load(out)
    result: dict[str, Any] = {
        "artifact": str(out),
        "sha256": art.sha256,
        "embed_dim": art.embed_dim,
        "pooling": art.pooling,
        "labels": art.labels,
        "files": sorted(p.name for p in out.iterdir()),
    }
    result["text"] = f"wrote artifact {out} (sha256 {art.sha256[:12]}, {art.embed_dim}-d, {art.pooling} pooling)"
    return result
