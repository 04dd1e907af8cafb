"""The one distinction every face makes: errors a user can fix, and bugs.

A ``UserError`` is something the person running the command can act on: a missing or damaged file, a flag or
config value out of range, an index built by another model, a dependency to install. The CLI prints it as one
line (``mae COMMAND: error: ...``) and exits 1; the HTTP layer answers it with a 4xx. Anything else is a bug:
the CLI prints its traceback, so that it can be reported rather than mistaken for a usage problem.

Domain errors derive from it (``ImageError``, ``ArtifactError``, ``IndexDamagedError``, ...) and keep the
builtin they always were (``ValueError``, ``RuntimeError``) as a second base, so callers that catch those
still do.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message says what was wrong and, where it helps, what to do."""


class UsageError(UserError, ValueError):
    """A flag, option, config key or value that is not valid (unknown, out of range, contradictory)."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra that brings it."""


class NotFoundError(UserError, FileNotFoundError):
    """A file, folder or data source the user named that does not exist, or that holds nothing usable."""


class AlreadyExistsError(UserError, FileExistsError):
    """A destination that already holds what the command would write (a run's checkpoint, packed shards)."""
