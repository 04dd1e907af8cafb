"""Embedding files (or the samples of WebDataset shards) for an index: the vectors, and the catalogue item of each.

Shared by the build (``retrieval.build``) and the repair that embeds a lost index again (``retrieval.repair``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from export.runtime import EmbeddedFiles, Embedder
from mae.shards import ShardSource
from retrieval.catalog import Item


def embed_items(embedder: Embedder, files: Sequence[Path] | ShardSource, labels: Sequence[str | None] = (), *,
                batch_size: int = 64, workers: int = 2, progress: bool = True, desc: str = "embedding"
                ) -> tuple[EmbeddedFiles, list[Item]]:
    """Stream ``files`` (or the samples of shards) through the embedder (``Embedder.embed_files`` /
    ``embed_shards``); the catalogue item of each row."""
    embedder.batch_size = batch_size
    if isinstance(files, ShardSource):
        done = embedder.embed_shards(files.train, workers=workers, progress=progress, desc=desc)
        return done, items_of(done, files)
    done = embedder.embed_files(files, workers=workers, progress=progress, desc=desc)
    return done, items_of(done, (list(files), list(labels)))


def items_of(done: EmbeddedFiles, collection_: ShardSource | tuple[list[Path], list[str | None]]) -> list[Item]:
    """The catalogue item of each row: its path (or SHARD#KEY), sha256 and class label."""
    if isinstance(collection_, ShardSource):
        classes = collection_.classes
        return [Item(n, sha, classes[y] if 0 <= y < len(classes) else None)
                for n, sha, y in zip(done.names, done.sha256, done.labels)]
    files, labels = collection_
    return [Item(str(files[p]), sha, labels[p]) for p, sha in zip(done.positions, done.sha256)]
