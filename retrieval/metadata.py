"""Metadata sidecars: labels and tags for images, read from a JSON-lines or CSV file keyed by path.

``mae index build|add --metadata items.jsonl`` (or ``items.csv``) attaches them to the catalogue rows of the
images it indexes, so that searches can filter on them (``--where tag.camera=X100``)::

    {"path": "2024/beach.jpg", "label": "beach", "tags": {"camera": "X100", "trip": "2024-08"}}
    {"path": "/photos/2024/dog.jpg", "camera": "X100"}        <- other keys are tags too

    path,label,camera,trip                                     <- CSV: a header with a path column;
    2024/beach.jpg,beach,X100,2024-08                             every column but path and label is a tag

A path is absolute, or relative to an indexed folder, to the folder above it (the form answers show), or to
the sidecar itself. A label given here replaces the class-folder label (an empty one keeps it, JSON null
removes it); tags are text, merged over the item's own.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mae.errors import UsageError
from retrieval.catalog import Item, clean_tags

UNSET = object()  # a label the sidecar does not give: the item keeps its own


@dataclass
class Sidecar:
    """What a sidecar says, by absolute path; ``apply`` hands it to the catalogue items."""

    source: Path
    entries: dict[str, tuple[Any, dict[str, str] | None]] = field(default_factory=dict)
    records: int = 0

    def apply(self, items: Sequence[Item]) -> tuple[list[Item], int]:
        """The items with their sidecar label and tags, and how many of them the sidecar named."""
        out, matched = [], 0
        for it in items:
            entry = self.entries.get(it.path)
            if entry is None:
                out.append(it)
                continue
            matched += 1
            label, tags = entry
            merged = dict(it.tags or {}, **(tags or {}))
            out.append(replace(it, label=it.label if label is UNSET else label, tags=merged or None))
        return out, matched


def annotate(index: Any, path: str | Path, roots: Sequence[str | Path]) -> dict[str, Any]:
    """Apply a sidecar to an index's live items (``mae index build --metadata``); returns counts to report."""
    sidecar = read_sidecar(path, roots)
    changed = index.annotate(sidecar.entries)
    return {"metadata": str(sidecar.source), "metadata_records": sidecar.records, "metadata_items": changed}


def read_sidecar(path: str | Path, roots: Sequence[str | Path]) -> Sidecar:
    """Parse ``path`` (``.jsonl``/``.json`` or ``.csv``); problems are ValueErrors naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metadata file {path}")
    records = list(_csv(path) if path.suffix.lower() == ".csv" else _jsonl(path))
    sidecar = Sidecar(path.resolve(), records=len(records))
    bases = [Path(r).resolve() for r in roots]
    bases = [*bases, *(b.parent for b in bases), path.resolve().parent]
    for where, record in records:
        name = record.pop("path", None)
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"{path}:{where}: every record needs a 'path'")
        label = record.pop("label", UNSET)
        if label is not UNSET and label is not None and not isinstance(label, str):
            label = str(label)
        if label == "":  # an empty CSV cell gives no label: the item keeps its own (JSON null clears it)
            label = UNSET
        tags = record.pop("tags", None) or {}
        if isinstance(tags, str):
            try:
                tags = json.loads(tags)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{where}: 'tags' is not a JSON object ({e})") from e
        if not isinstance(tags, dict):
            raise UsageError(f"{path}:{where}: 'tags' must be an object of name: value")
        tags = {**{k.removeprefix("tag."): v for k, v in record.items() if v not in (None, "")}, **tags}
        try:
            clean = clean_tags(tags)
        except ValueError as e:
            raise UsageError(f"{path}:{where}: {e}") from e
        given = Path(name.strip()).expanduser()
        candidates = [given] if given.is_absolute() else [b / given for b in bases]
        for c in candidates:
            sidecar.entries.setdefault(str(c.resolve()), (label, clean))
    return sidecar


def _jsonl(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":  # one JSON list of records
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not valid JSON ({e})") from e
        if not isinstance(data, list):
            raise UsageError(f"{path}: expected a list of records")
        lines = [(f"record {i + 1}", r) for i, r in enumerate(data)]
    else:
        lines = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                lines.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:line {n} is not valid JSON ({e})") from e
    for where, record in lines:
        if not isinstance(record, dict):
            raise UsageError(f"{path}:{where}: expected an object with a 'path'")
        yield where, dict(record)


def _csv(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise UsageError(f"{path}: the CSV header needs a 'path' column")
            for n, row in enumerate(reader, 2):
                yield f"line {n}", {k: v for k, v in row.items() if k is not None}
        except csv.Error as e:  # e.g. a field past the csv module's limit (131,072 characters): a bound we keep
            where = f"line {reader.line_num + 1}"  # the line being read when the error came
            limit = csv.field_size_limit()
            why = (f"a field is longer than {limit:,} characters, the most a path, label or tag may have"
                   if "field larger than field limit" in str(e) else f"not readable as CSV ({e})")
            raise UsageError(f"{path}:{where}: {why}") from None
