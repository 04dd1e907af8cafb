"""The settings this server process runs with, read once from the ``MAE_*`` variables when BentoML imports the
service (``serving.settings`` says what each one means; ``mae serve`` writes them)."""

from __future__ import annotations

from pathlib import Path

from mae.errors import UsageError
from serving.settings import Limits, Settings, var

SETTINGS = Settings.from_env()
LIMITS = Limits.from_env()


def require_artifact() -> Path:
    """The artifact folder this server serves; a server started without one says how to name it."""
    if not SETTINGS.artifact:
        raise UsageError(f"no artifact: set {var('artifact')} (mae serve --artifact A does)")
    return Path(SETTINGS.artifact)
