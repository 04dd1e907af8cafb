"""Stored uploads that no committed generation names: found and removed.

``POST /items`` stores each upload in ``INDEX/uploads/`` before it waits for the index's lock (so the lock is held
only for the commit), and a writer killed while it waits (SIGKILL, a power cut) leaves those files behind: no item
names them, and nothing else would ever remove them. The server removes them when it starts and, at most every
``SWEEP_EVERY_S``, after a write of its own (``serving.index_access``); ``mae index check --repair`` does the same.

A file is an orphan when no live item of the index's generation names it *and* it is older than ``ORPHAN_AGE_S``:
a younger one may belong to a writer of another process that is still waiting for the lock (a writer that reuses
an old file refreshes its time first). The age is far above any lock wait (``MAE_WRITE_WAIT_S``) and commit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

ORPHAN_AGE_S = 3600.0
"""Uploads younger than this are never orphans: they may be in flight in another writer."""
SWEEP_EVERY_S = 600.0
"""How often a server looks for orphans after its own writes (listing the folder costs one stat per upload)."""


def orphan_uploads(index: Any, min_age_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Files in ``index.uploads`` older than ``min_age_s`` seconds that no live item of ``index`` names.

    ``index``: an open index (``retrieval.index.Index``) at the generation to check against; its uploads folder
    and its path lookup (``by_path``) are all this uses.
    """
    folder = Path(index.uploads)
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    cutoff = time.time() - min_age_s
    old = []
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                old.append(entry.path)
        except FileNotFoundError:  # removed meanwhile
            continue
    named = index.ids_by_path(old) if old else {}
    return sorted(Path(p) for p in old if p not in named)


def remove_orphan_uploads(index: Any, min_age_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Remove what ``orphan_uploads`` finds; returns the files removed."""
    removed = []
    for path in orphan_uploads(index, min_age_s):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed
