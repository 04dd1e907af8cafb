"""What stands between the network and the service: the Host allow-list and same-origin writes.

- **Host.** A page on any web site can make a visitor's browser send requests to ``127.0.0.1:3000`` under a name
  it controls (DNS rebinding), and a server bound to every interface answers any name. Requests whose ``Host``
  is not in the allow-list (``MAE_ALLOWED_HOSTS``; by default the loopback names) are refused with a 400, except
  the health probes, which orchestrators send by IP and which reveal nothing.
- **Origin.** An HTML form on another site can POST ``multipart/form-data`` here without any CORS preflight, and
  the browser sends it. Unsafe methods (POST, PUT, PATCH, DELETE) from a browser on another origin are refused
  with a 403: a browser says where a request comes from (``Origin``, ``Sec-Fetch-Site``); clients that are not
  browsers send neither and are not affected. ``allowed_origins`` lets named sites through (for CORS).
- **Framing and sniffing.** The page holds a write key and delete buttons: no other site may frame it
  (clickjacking) or run script in it. Every answer says so (``SecurityHeaders``): a Content-Security-Policy that
  lets the page load only its own scripts and styles (no inline code anywhere in ``serving/web/``), ``frame-ancestors
  'none'`` and ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``.
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

# The page (serving/web/): its own files only; thumbnails arrive as blobs (fetched with the key) and the picked
# file is shown from a blob: URL.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
# BentoML's Swagger UI at /docs sets inline styles and embeds an analytics snippet: its own scripts run, the
# snippet does not.
DOCS_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'")
# Everything else is data (JSON, PNG, metrics): nothing in it may run, and nothing may frame it.
API_POLICY = "default-src 'none'; frame-ancestors 'none'"


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



def security_policy(path: str) -> str:
    """The Content-Security-Policy of an answer to ``path``."""
    if path == "/" or path.startswith("/web/"):
        return PAGE_POLICY
    if path in ("/docs", "/docs.json") or path.startswith("/static_content/"):
        return DOCS_POLICY
    return API_POLICY


class SecurityHeaders:
    """ASGI middleware: every answer gets the headers that keep other sites from framing the page or making a
    browser run or sniff what the service sends (see the module docstring); a header a route set is kept."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = [(b"content-security-policy", security_policy(scope.get("path", "")).encode()),
                 (b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                 (b"referrer-policy", b"no-referrer")]

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                message = {**message, "headers": headers + [(k, v) for k, v in extra if k not in present]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
