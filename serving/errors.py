"""What a client is told when a request cannot be served: one exception type, and one mapper to it.

A ``RequestError`` is a ``UserError`` (the client can fix it: the message says what was wrong) and a BentoML
error, so BentoML's own API routes (``/embed``, ``/classify``, ``/search``) answer it with its status, and the
page's routes (``serving.routes``) turn it into the same ``{"error": message}`` answer. ``client_error`` is the
one place that decides which other exceptions are the client's or the index's problem (4xx, 503) rather than a
bug (500, with a traceback in the log).
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from bentoml.exceptions import BentoMLException

from mae.errors import UserError

log = logging.getLogger("mae.serving")

NO_INDEX = "this server has no index: start it with --index INDEX (mae index build makes one)"


class RequestError(UserError, BentoMLException):
    """A request answered with ``status`` and the message: a 4xx, or a 503 when the server cannot serve it now
    (its index is damaged, its model cannot be loaded: what the operator can fix)."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, headers: dict[str, str] | None = None
                 ) -> None:
        super().__init__(message, error_code=HTTPStatus(status))
        self.headers = dict(headers or {})
        """Headers of the answer (``Retry-After`` of a 429), on the routes that answer through ``handled``."""

    @property
    def status(self) -> int:
        return int(self.error_code)


def client_error(e: BaseException) -> RequestError | None:
    """The answer a client gets for ``e``, or None when ``e`` is a bug (answered 500, its traceback logged).

    BentoML's own errors keep their status (a bad input field is a 400, an overloaded encoder a 503); an index
    write that cannot get the lock is a 409 (nothing changed: try again); a damaged index a 503 naming the part;
    an item that vanished between two reads of one request a 404.
    """
    from retrieval.index import IndexBusyError, IndexDamagedError

    if isinstance(e, RequestError):
        return e
    if isinstance(e, BentoMLException):
        return RequestError(e.message, e.error_code)
    if isinstance(e, IndexBusyError):
        return RequestError(str(e), HTTPStatus.CONFLICT)
    if isinstance(e, IndexDamagedError):
        return RequestError(damaged_message(e), HTTPStatus.SERVICE_UNAVAILABLE)
    if isinstance(e, KeyError):
        return RequestError(str(e.args[0]) if e.args else "no such item", HTTPStatus.NOT_FOUND)
    return None


def damaged_message(e: Exception) -> str:
    """What a client is told about a damaged index: the part and the way out, not the server's paths (those go
    to the log, once)."""
    log.error("%s", e)
    text = str(e).split("; run `mae index check")[0]
    text = re.sub(r"(/[^\s;:,()']+)+/([^/\s;:,()']+)", r"\2", text)  # /srv/index/items.sqlite -> items.sqlite
    return f"the index cannot be used: {text}; the operator must run `mae index check` on the server (--repair)"
