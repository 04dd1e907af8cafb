"""What stands between the network and the service: the Host allow-list and same-origin writes.

- **Host.** A page on any web site can make a visitor's browser send requests to ``127.0.0.1:3000`` under a name
  it controls (DNS rebinding), and a server bound to every interface answers any name. Requests whose ``Host``
  is not in the allow-list (``MAE_ALLOWED_HOSTS``; by default the loopback names) are refused with a 400, except
  the health probes, which orchestrators send by IP and which reveal nothing.
- **Origin.** An HTML form on another site can POST ``multipart/form-data`` here without any CORS preflight, and
  the browser sends it. Unsafe methods (POST, PUT, PATCH, DELETE) from a browser on another origin are refused
  with a 403: a browser says where a request comes from (``Origin``, ``Sec-Fetch-Site``); clients that are not
  browsers send neither and are not affected. ``allowed_origins`` lets named sites through (for CORS).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit

from serving.settings import LOOPBACK_NAMES

log = logging.getLogger("mae.serving")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PROBES = frozenset({"/healthz", "/livez", "/readyz"})


def host_name(host_header: str) -> str:
    """``Host`` header -> lower-case name without port or IPv6 brackets: ``[::1]:3000`` -> ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuard:
    """ASGI middleware: refuse requests for other host names and cross-origin writes from browsers."""

    def __init__(self, app: Any, allowed_hosts: Collection[str] = LOOPBACK_NAMES,
                 allowed_origins: Collection[str] = ()) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = frozenset(h.strip().lower().strip("[]") for h in allowed_hosts)
        self.origins = frozenset(o.strip().lower().rstrip("/") for o in allowed_origins)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        host = headers.get("host", "")
        path = scope.get("path", "")
        if path not in PROBES and not self.any_host and host_name(host) not in self.hosts:
            return await self._refuse(scope, send, 400, f"Host {host!r} is not served here; the operator lists the "
                                                       "names clients use in MAE_ALLOWED_HOSTS (mae serve "
                                                       "--allowed-hosts)")
        if scope.get("method", "GET") not in SAFE_METHODS:
            problem = self._cross_origin(headers, host)
            if problem:
                return await self._refuse(scope, send, 403, problem)
        return await self.app(scope, receive, send)

    def _cross_origin(self, headers: dict[str, str], host: str) -> str | None:
        """Why a write comes from a browser page on another origin, or None."""
        origin = headers.get("origin")
        if origin is not None:
            if origin.lower().rstrip("/") in self.origins:
                return None
            if origin == "null" or urlsplit(origin).netloc.lower() != host.strip().lower():
                return (f"cross-origin request refused: a page at {origin} may not send {host} writes "
                        "(browsers send forms across sites without asking)")
            return None
        site = headers.get("sec-fetch-site")
        if site in ("cross-site", "same-site"):
            return f"cross-origin request refused (Sec-Fetch-Site: {site})"
        return None

    @staticmethod
    async def _refuse(scope: dict[str, Any], send: Any, status: int, message: str) -> None:
        log.warning("%s %s -> %d: %s", scope.get("method"), scope.get("path"), status, message)
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

