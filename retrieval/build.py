"""Embed an image collection and index it: streamed from disk, in batches, with a progress bar.

Images are read, hashed (sha256 of the bytes, the duplicate check), cropped and resized in uint8 in DataLoader
workers and embedded batch by batch with ``export.runtime.Embedder``, so at most a few batches of pixels are in
memory at once; only the (N, D) embeddings are kept. An image that cannot be decoded is skipped and reported.
A collection is folders, files, ``.txt`` lists of files, or WebDataset shards (``mae data pack``).

Collections larger than one machine's memory take ``shards > 1``: the IVF is trained once on the embeddings
of a sample of the files, then worker processes (one per GPU where there are GPUs) each embed a slice of the
file list and fill their own copy of the trained index, and the shards are merged into on-disk inverted
lists that the index memory-maps.

Across machines, ``torchrun --nnodes N ... -m cli index build ...``: each rank embeds its slice of the
collection (whole shards, or a contiguous run of files) into a work folder beside ``--out``, which must be on
a filesystem every node sees; rank 0 then trains the IVF on a sample of all the vectors, every rank fills its
copy with its own vectors, and rank 0 merges them on disk (the same merge as ``shards > 1``). An exact or
HNSW index (small collections) is built by rank 0 from all the vectors.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.runtime import EmbeddedFiles, Embedder, embed_across_ranks, load_parts, part_folder
from mae.errors import UsageError, UserError
from mae.files import sha256_file
from mae.shards import ShardSource, is_shard_spec, open_shards
from retrieval import index as index_lib
from retrieval import tuning
from retrieval.embedding import embed_items, items_of
from retrieval.metadata import annotate, read_sidecar

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- files


def collection(specs: Sequence[str | Path]) -> tuple[list[Path], list[str | None]]:
    """The image files of folders, lists and files to index, as absolute paths (what the catalogue stores), and
    their class labels (first-level subfolders of a folder)."""
    from mae.sources import list_images

    files, labels = list_images(specs)
    return [f.resolve() for f in files], labels


def shard_collection(specs: Sequence[str | Path]) -> ShardSource | None:
    """The WebDataset shards ``specs`` name (one spec: a packed folder, a pattern or a URL), or None when they
    name files and folders. Both at once are refused: a collection is one or the other."""
    flags = [is_shard_spec(s) for s in specs]
    if not any(flags):
        return None
    if len(specs) > 1:
        raise UsageError("give WebDataset shards as one --images argument (a packed folder, or a pattern such as "
                         "'DIR/train-{000000..000127}.tar'), without other files or folders")
    source = open_shards(specs[0])
    if source.val is not None:  # a packed folder: index both of its splits
        source = ShardSource(source.name, type(source.train)(source.name, source.train.shards + source.val.shards),
                             None, source.classes)
    return source


def collection_label(path: Path, roots: Sequence[str]) -> str | None:
    """The class folder of a file under one of the index's collection folders (``mae index add DIR/7`` keeps "7")."""
    for root in roots:
        try:
            parts = path.relative_to(root).parts
        except ValueError:
            continue
        if len(parts) > 1:
            return parts[0]
    return None


# ----------------------------------------------------------------------------------------------- build / add


def build_index(artifact: str | Path, images: Sequence[str | Path], out: str | Path, *, factory: str = "auto",
                batch_size: int = 64, workers: int = 2, shards: int = 1, backend: str = "auto",
                device: str | None = None, max_memory: int | None = None, gpu: bool | None = None,
                target_recall: float = tuning.TARGET_RECALL, overwrite: bool = False, seed: int = 0,
                progress: bool = True, metadata: str | Path | None = None) -> dict[str, Any]:
    """``mae index build``: embed the images with the artifact and write INDEX/. Returns a summary.

    Under torchrun (WORLD_SIZE > 1) the ranks share the work (see the module docstring); rank 0 returns the
    summary, the others their part of it. ``metadata``: a sidecar of labels and tags by path
    (``retrieval.metadata``), applied once the index is built.
    """
    if metadata is not None:
        read_sidecar(metadata, images)  # a bad sidecar stops the build before any image is embedded
    if shards < 1:
        raise UsageError(f"--shards must be >= 1, got {shards}")
    engine = index_lib.parse_spec(out).engine
    if engine != "faiss" and (shards > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise UsageError(f"--shards and torchrun builds merge FAISS files on disk: build {out} in one process "
                         "(or build a FAISS folder and move it with mae index migrate)")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    source = shard_collection(images)
    files, labels = ([], []) if source is not None else collection(images)
    extra = {"artifact": str(Path(artifact).resolve()),
             "images": [str(i) if is_shard_spec(i) else str(Path(i).resolve()) for i in images]}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if shards > 1:
            raise UsageError("--shards splits one machine's work between processes; under torchrun the ranks "
                             "already split it: leave --shards out")
        summary = _build_distributed(artifact, source if source is not None else (files, labels), out,
                                     factory=factory, batch_size=batch_size, workers=workers, backend=backend,
                                     device=device, max_memory=max_memory, target_recall=target_recall,
                                     overwrite=overwrite, seed=seed, extra=extra, progress=progress)
        if metadata is not None and os.environ.get("RANK", "0") == "0":  # the one writer applies the sidecar
            idx = index_lib.Index.open(out, gpu=False)
            summary.update(annotate(idx, metadata, images))
        return summary
    embedder = Embedder.load(artifact, backend=backend, device=device, batch_size=batch_size)
    extra["embed_backend"] = embedder.backend_name
    started = time.perf_counter()
    if shards > 1:
        if source is not None:
            raise UsageError("--shards splits a list of files; WebDataset shards are split by torchrun ranks")
        idx, figures = _build_sharded(embedder, files, labels, out, factory=factory, batch_size=batch_size,
                                      workers=workers, shards=shards, backend=backend, device=device,
                                      max_memory=max_memory, target_recall=target_recall, overwrite=overwrite,
                                      seed=seed, extra=extra, progress=progress, gpu=gpu)
    else:
        emb, items = embed_items(embedder, source if source is not None else files, labels, batch_size=batch_size,
                                 workers=workers, progress=progress)
        seen = source.train.total if source is not None else len(files)
        figures = {"images_seen": seen, "images_embedded": len(items), "skipped": emb.skipped,
                   "embed_seconds": round(emb.seconds, 2), "images_per_s": emb.images_per_s}
        extra["build"] = dict(figures)
        idx = index_lib.Index.create(out, emb.vectors, items, artifact_sha256=embedder.sha256, factory=factory,
                                     max_memory=max_memory, target_recall=target_recall, gpu=gpu, seed=seed,
                                     extra=extra, overwrite=overwrite)
    if metadata is not None:
        figures.update(annotate(idx, metadata, images))
    figures["seconds"] = round(time.perf_counter() - started, 2)
    return _summary(idx, figures)


def add_images(index_path: str | Path, images: Sequence[str | Path], *, artifact: str | Path | None = None,
               batch_size: int = 64, workers: int = 2, backend: str = "auto", device: str | None = None,
               progress: bool = True, metadata: str | Path | None = None) -> dict[str, Any]:
    """``mae index add``: hash first and embed only files whose bytes are not indexed yet.

    ``metadata``: a sidecar of labels and tags by path for the added images (``retrieval.metadata``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("mae index add runs in one process (an index has one writer); run it without torchrun")
    idx = index_lib.Index.open(index_path, gpu=False)  # a write: no GPU copy to make
    sidecar = read_sidecar(metadata, [*images, *idx.manifest.get("images", [])]) if metadata is not None else None
    embedder = load_embedder(idx, artifact, backend=backend, device=device, batch_size=batch_size)
    source = shard_collection(images)
    if source is not None:  # samples are hashed as they are read; the index drops bytes it already holds
        emb, items = embed_items(embedder, source, batch_size=batch_size, workers=workers, progress=progress)
        matched = 0
        if sidecar is not None:  # keyed by the samples' names inside the shards
            items, matched = sidecar.apply(items)
        result = idx.add(emb.vectors, items)  # shard names are not under folders: no roots to record
        summary = _summary(idx, {"added": len(result.ids), "duplicates": result.duplicates, "skipped": emb.skipped,
                                 "embed_seconds": round(emb.seconds, 2), "images_per_s": emb.images_per_s})
        if sidecar is not None:
            summary.update(metadata=str(sidecar.source), metadata_records=sidecar.records, metadata_items=matched)
        summary["ids"] = result.ids
        return summary
    files, labels = collection(images)
    labels = [collection_label(f, idx.manifest.get("images", [])) or lab for f, lab in zip(files, labels)]
    from tqdm.auto import tqdm

    hashes = [_hash_or_blank(f) for f in tqdm(files, desc="hashing", unit="img", disable=not progress or None)]
    known = idx.ids_by_sha256([h for h in hashes if h])
    seen: set[str] = set()
    todo = []
    duplicates = []
    for j, h in enumerate(hashes):
        if h and (h in known or h in seen):
            duplicates.append(str(files[j]))
        else:
            seen.add(h)
            todo.append(j)
    emb, items = embed_items(embedder, [files[j] for j in todo], [labels[j] for j in todo], batch_size=batch_size,
                             workers=workers, progress=progress)
    matched = 0
    if sidecar is not None:
        items, matched = sidecar.apply(items)
    result = idx.add(emb.vectors, items, roots=images)
    summary = _summary(idx, {"added": len(result.ids), "duplicates": duplicates + result.duplicates,
                             "skipped": emb.skipped, "embed_seconds": round(emb.seconds, 2),
                             "images_per_s": emb.images_per_s})
    if sidecar is not None:
        summary.update(metadata=str(sidecar.source), metadata_records=sidecar.records, metadata_items=matched)
    summary["ids"] = result.ids
    return summary


def _hash_or_blank(file: Path) -> str:
    """A file's sha256, or "" when it cannot be read (gone, a device, a FIFO): the embedding pass then skips it
    and names it, as it does every unreadable image."""
    try:
        return sha256_file(file)
    except OSError:
        return ""


def load_embedder(idx: index_lib.Index, artifact: str | Path | None, **kwargs: Any) -> Embedder:
    """The artifact an index was built with (from its manifest unless given); refused if its sha256 differs."""
    path = artifact or idx.manifest.get("artifact")
    if not path:
        raise UsageError(f"{idx.name} does not record its artifact; pass --artifact")
    if not Path(path).exists():
        raise FileNotFoundError(f"the artifact {path} that built {idx.name} is gone; pass --artifact")
    embedder = Embedder.load(path, **kwargs)
    idx.check_artifact(embedder.sha256)
    return embedder


def _summary(idx: index_lib.Index, figures: dict[str, Any]) -> dict[str, Any]:
    info = idx.info()
    info.update(figures)
    skipped = figures.get("skipped") or []
    lines = [f"{idx.name}: {idx.count} images, {idx.factory} ({info.get('factory_reason') or 'given'}), "
             f"generation {idx.generation}"]
    if "images_per_s" in figures:
        lines.append(f"  embedded {figures.get('images_embedded', figures.get('added', 0))} images at "
                     f"{figures['images_per_s']} images/s")
    if idx.manifest.get("search_params"):
        t = idx.manifest.get("tuning", {})
        lines.append(f"  search parameters {idx.manifest['search_params']} (recall@10 {t.get('recall@10')} "
                     f"against exact search on {t.get('queries')} held-out queries)")
    if figures.get("duplicates"):
        lines.append(f"  {len(figures['duplicates'])} duplicate(s) already indexed, skipped")
    if "metadata_items" in figures:
        lines.append(f"  metadata from {figures['metadata']}: {figures['metadata_records']} record(s), labels and "
                     f"tags set on {figures['metadata_items']} item(s)")
    if skipped:
        lines.append(f"  skipped {len(skipped)} unreadable image(s):")
        lines += [f"    {s['error']}" for s in skipped[:20]]
        if len(skipped) > 20:
            lines.append(f"    ... and {len(skipped) - 20} more (see --json)")
    info["text"] = "\n".join(lines)
    return info


# ----------------------------------------------------------------------------------------------- sharded


def _build_sharded(embedder: Embedder, files: list[Path], labels: list[str | None], out: str | Path, *,
                   factory: str, batch_size: int, workers: int, shards: int, backend: str, device: str | None,
                   max_memory: int | None, target_recall: float, overwrite: bool, seed: int,
                   extra: dict[str, Any], progress: bool, gpu: bool | None) -> tuple[index_lib.Index, dict[str, Any]]:
    """Train once on a sample, fill ``shards`` IVF shards in worker processes, merge them on disk."""
    import torch

    n, dim = len(files), embedder.dim
    choice = (tuning.choose_factory(n, dim, max_memory=max_memory, on_disk=True) if factory == "auto"
              else tuning.FactoryChoice(factory, "given with --factory"))
    trained = tuning.make_index(choice.factory, dim)
    if not tuning.is_ivf(trained):
        raise UsageError(f"a sharded (on-disk) build needs an IVF factory, got {choice.factory!r}")
    rng = np.random.default_rng(seed)
    m = tuning.train_size(trained, n)
    picks = np.sort(rng.choice(n, m, replace=False))
    sample, _ = embed_items(embedder, [files[i] for i in picks], [labels[i] for i in picks], batch_size=batch_size,
                            workers=workers, progress=progress, desc="training sample")
    train_seconds = tuning.train(trained, sample.vectors, gpu)
    work = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.shards-", dir=Path(out).resolve().parent))
    try:
        trained_path = work / "trained.faiss"
        index_lib.write_index(trained, trained_path)
        bounds = np.linspace(0, n, shards + 1).round().astype(int)
        ngpu = torch.cuda.device_count()
        threads = max(1, (os.cpu_count() or 1) // shards)
        started = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(shards, mp_context=ctx) as pool:
            jobs = [pool.submit(_fill_shard, str(embedder.path), [str(f) for f in files[a:b]], labels[a:b], int(a),
                                str(trained_path), str(work / f"shard{s}"), batch_size, backend,
                                f"cuda:{s % ngpu}" if ngpu and device is None else device, threads)
                    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
            results = [j.result() for j in jobs]
        fill_seconds = time.perf_counter() - started
        figures = {"images_seen": n, "shards": shards, "train_vectors": len(sample.positions),
                   "train_seconds": round(train_seconds, 2), "fill_seconds": round(fill_seconds, 2)}
        idx, figures = _merge_shards(results, trained, choice, out, figures, factory=factory,
                                     artifact_sha256=embedder.sha256, target_recall=target_recall,
                                     overwrite=overwrite, rng=rng, extra=extra, dim=dim)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return idx, figures


def _merge_shards(results: list[dict[str, Any]], trained: Any, choice: tuning.FactoryChoice, out: str | Path,
                  figures: dict[str, Any], *, factory: str, artifact_sha256: str, target_recall: float,
                  overwrite: bool, rng: np.random.Generator, extra: dict[str, Any], dim: int
                  ) -> tuple[index_lib.Index, dict[str, Any]]:
    """Filled shard indexes (``_fill_shard``'s results) -> one index with on-disk inverted lists.

    Duplicates across shards: the first file with given bytes is kept, the others leave their shard."""
    seen: set[str] = set()
    items, ids, duplicates, skipped, kept_per_shard = [], [], [], [], []
    for r in results:
        drop = []
        for i, it in zip(r["ids"], r["items"]):
            if it.sha256 in seen:
                drop.append(i)
                duplicates.append(it.path)
            else:
                seen.add(it.sha256)
                items.append(it)
                ids.append(i)
        if drop:
            index_lib.remove_from_file(r["index"], drop)
        kept_per_shard.append(~np.isin(np.asarray(r["ids"], np.int64), drop))
        skipped += r["skipped"]

    def blocks():
        for r, keep in zip(results, kept_per_shard):
            x = np.load(r["vectors"], mmap_mode="r")
            yield np.asarray(x[keep]), np.asarray(r["ids"], np.int64)[keep]

    all_ids = np.asarray(ids, np.int64)
    q = np.sort(rng.choice(len(all_ids), min(tuning.TUNE_QUERIES, len(all_ids)), replace=False))
    wanted = set(all_ids[q].tolist())
    qx, qi = [], []
    for x, bid in blocks():
        sel = np.isin(bid, list(wanted))
        qx.append(x[sel])
        qi.append(bid[sel])
    tune_sample = (np.concatenate(qi), np.concatenate(qx)) if qx else (np.zeros(0, np.int64),
                                                                       np.zeros((0, dim), np.float32))
    seconds = sum(r["seconds"] for r in results)
    fill = figures.get("fill_seconds") or seconds
    figures = {**figures, "images_embedded": len(items), "skipped": skipped, "duplicates": duplicates,
               "embed_seconds": round(seconds, 2), "images_per_s": round(len(items) / fill, 1) if fill else 0.0}
    extra = dict(extra, build=dict(figures))
    idx = index_lib.build_on_disk(out, trained, [r["index"] for r in results], items, ids,
                                  artifact_sha256=artifact_sha256, choice=choice, factory=factory,
                                  tune_blocks=blocks, tune_sample=tune_sample, target_recall=target_recall,
                                  extra=extra, overwrite=overwrite)
    return idx, figures


def _fill_shard(artifact: str, files: list[str], labels: list[str | None], first_id: int, trained: str,
                out: str, batch_size: int, backend: str, device: str | None, threads: int) -> dict[str, Any]:
    """Worker process: embed a slice of the file list and fill a copy of the trained index with it.

    Ids are fixed by file position (``first_id`` + offset + 1), so shards never need to talk to each other.
    """
    import torch

    torch.set_num_threads(threads)
    index_lib.set_threads(threads)
    os.makedirs(out, exist_ok=True)
    embedder = Embedder.load(artifact, backend=backend, device=device, batch_size=batch_size)
    emb, items = embed_items(embedder, [Path(f) for f in files], labels, batch_size=batch_size, workers=0,
                             progress=False)
    ids = np.asarray([first_id + p + 1 for p in emb.positions], np.int64)
    np.save(Path(out) / "vectors.npy", emb.vectors)
    index_lib.fill_shard(trained, emb.vectors, ids, Path(out) / "index.faiss")
    return {"ids": ids.tolist(), "items": items, "skipped": emb.skipped, "seconds": emb.seconds,
            "vectors": str(Path(out) / "vectors.npy"), "index": str(Path(out) / "index.faiss")}


# ----------------------------------------------------------------------------------------------- torchrun


def _build_distributed(artifact: str | Path, collection_: ShardSource | tuple[list[Path], list[str | None]],
                       out: str | Path, *, factory: str, batch_size: int, workers: int, backend: str,
                       device: str | None, max_memory: int | None, target_recall: float, overwrite: bool, seed: int,
                       extra: dict[str, Any], progress: bool) -> dict[str, Any]:
    """``mae index build`` under torchrun: every rank embeds its share, rank 0 builds (see the module docstring).

    An error rank 0 meets (a part it cannot see: --out not on a shared filesystem) reaches every rank.
    """
    from mae.dist import (
        all_gather_objects,
        barrier,
        broadcast_object,
        init_distributed,
        shutdown_distributed,
        work_folder,
    )

    dist = init_distributed(device, timeout_minutes=24 * 60)  # ranks wait for each other's whole share
    try:
        if Path(out).exists() and not overwrite:
            raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
        if device is None and dist.device.type == "cuda":
            device = str(dist.device)
        embedder = Embedder.load(artifact, backend=backend, device=device, batch_size=batch_size)
        work = work_folder(out, "index")
        started = time.perf_counter()
        done = embed_across_ranks(embedder, collection_.train if isinstance(collection_, ShardSource)
                                  else collection_[0], dist, work, workers=workers,
                                  progress=progress and dist.is_main, desc=f"embedding (rank {dist.rank})")
        plan: dict[str, Any] = {}
        if dist.is_main:
            try:
                plan = _plan_distributed(work, dist.world, embedder.dim, factory, max_memory, seed)
            except Exception as e:  # noqa: BLE001 (sent to every rank, raised there)
                plan = {"error": f"{type(e).__name__}: {e}"}
        plan = broadcast_object(plan, dist)
        if "error" in plan:
            raise UserError(f"index build across {dist.world} ranks: {plan['error']}")
        if plan["ivf"]:  # ids by collection position, so the ranks never need to agree on them
            ids = np.asarray([p + 1 for p in done.positions], np.int64)
            index_lib.fill_shard(plan["trained"], done.vectors, ids, part_folder(work, dist.rank) / "index.faiss")
        barrier(dist)
        counts = all_gather_objects(len(done.positions), dist)
        summary: dict[str, Any] = {"rank": dist.rank, "world_size": dist.world, "images_embedded": counts[dist.rank]}
        if dist.is_main:
            try:
                summary = _finish_distributed(work, plan, embedder, collection_, out, extra, factory=factory,
                                              max_memory=max_memory, target_recall=target_recall, seed=seed,
                                              overwrite=overwrite, started=started, world=dist.world)
                summary["images_per_rank"] = counts
            finally:
                shutil.rmtree(work, ignore_errors=True)
        barrier(dist)
        return summary
    finally:
        shutdown_distributed()


def _plan_distributed(work: Path, world: int, dim: int, factory: str, max_memory: int | None, seed: int
                      ) -> dict[str, Any]:
    """Rank 0, once every part is written: the factory for the whole collection, and for an IVF the trained
    (empty) index, trained on a sample of all the parts' vectors."""
    parts = load_parts(work, world)
    n = sum(len(p.positions) for p in parts)
    choice = (tuning.choose_factory(n, dim, max_memory=max_memory) if factory == "auto"
              else tuning.FactoryChoice(factory, "given with --factory"))
    trained = tuning.make_index(choice.factory, dim)
    if not tuning.is_ivf(trained):  # exact or HNSW: one index built from every vector, by rank 0
        return {"ivf": False, "factory": choice.factory, "reason": choice.reason}
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(n, tuning.train_size(trained, n), replace=False))
    sample, start = [], 0
    for p in parts:
        local = picks[(picks >= start) & (picks < start + len(p.vectors))] - start
        sample.append(p.vectors[local])
        start += len(p.vectors)
    train_seconds = tuning.train(trained, np.concatenate(sample), None)
    path = work / "trained.faiss"
    index_lib.write_index(trained, path)
    return {"ivf": True, "trained": str(path), "factory": choice.factory, "reason": choice.reason,
            "train_vectors": int(len(picks)), "train_seconds": round(train_seconds, 2)}


def _finish_distributed(work: Path, plan: dict[str, Any], embedder: Embedder,
                        collection_: ShardSource | tuple[list[Path], list[str | None]], out: str | Path,
                        extra: dict[str, Any], *, factory: str, max_memory: int | None, target_recall: float,
                        seed: int, overwrite: bool, started: float, world: int) -> dict[str, Any]:
    """Rank 0: the parts merged into INDEX/ (on disk for an IVF, in memory otherwise)."""
    parts = load_parts(work, world)
    extra = dict(extra, embed_backend=embedder.backend_name, world_size=world)
    seen = sum(len(p.positions) + len(p.skipped) for p in parts)
    if plan["ivf"]:
        results = [{"ids": [q + 1 for q in p.positions], "items": items_of(p, collection_), "skipped": p.skipped,
                    "seconds": p.seconds, "vectors": str(part_folder(work, r) / "vectors.npy"),
                    "index": str(part_folder(work, r) / "index.faiss")} for r, p in enumerate(parts)]
        import faiss

        trained = faiss.read_index(plan["trained"])
        figures = {"images_seen": seen, "ranks": world, "train_vectors": plan["train_vectors"],
                   "train_seconds": plan["train_seconds"], "fill_seconds": round(time.perf_counter() - started, 2)}
        idx, figures = _merge_shards(results, trained, tuning.FactoryChoice(plan["factory"], plan["reason"]), out,
                                     figures, factory=factory, artifact_sha256=embedder.sha256,
                                     target_recall=target_recall, overwrite=overwrite,
                                     rng=np.random.default_rng(seed), extra=extra, dim=embedder.dim)
    else:
        done = EmbeddedFiles.concat(parts)
        items = items_of(done, collection_)
        seconds = time.perf_counter() - started
        figures = {"images_seen": seen, "images_embedded": len(items), "skipped": done.skipped, "ranks": world,
                   "embed_seconds": round(done.seconds, 2),
                   "images_per_s": round(len(items) / seconds, 1) if seconds else 0.0}
        extra["build"] = dict(figures)
        idx = index_lib.build(out, done.vectors, items, artifact_sha256=embedder.sha256, factory=factory,
                              max_memory=max_memory, target_recall=target_recall, seed=seed, extra=extra,
                              overwrite=overwrite)
    figures["seconds"] = round(time.perf_counter() - started, 2)
    return _summary(idx, figures)
