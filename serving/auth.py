"""API keys and CORS for the service: who may read, who may write, which web pages may call it.

**Keys** live in a file (``mae serve --api-keys FILE`` or ``MAE_API_KEYS_FILE``), one per line::

    # scope  key                                                          name (optional, for people)
    read     3q2hXk0P1uB4Vq8kC7n1mZ5x9Lw2Yt6Rr0Ee4Ss8Aa                   dashboard
    write    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  ingest-bot

A key is at least 16 characters (``python -c "import secrets; print(secrets.token_urlsafe(32))"`` makes a good
one) or, so that the file need not hold it, ``sha256:`` and the hex digest of one. A ``write`` key may also
read. Clients send ``Authorization: Bearer KEY``.

* Writes (``POST /items``, ``DELETE /items/{id}``) always need a write key; a server without keys takes none.
* Reads (everything else the API serves) need a read or write key once keys are configured, unless
  ``--public-read``; without keys configured they are open, as before.
* The page, its files, the OpenAPI docs and BentoML's health and metrics endpoints stay open: the page asks
  for a key and sends it.
* No key: 401 with ``WWW-Authenticate: Bearer``; a key the server does not know: 401; a read key on a write:
  403. The presented key is hashed and compared with every configured digest in constant time
  (``hmac.compare_digest``, no early exit), and it is never logged or echoed.

**CORS** is off unless origins are listed (``--cors-origin https://app.example``, repeatable; ``MAE_CORS_ORIGINS``
comma-separated): a listed origin gets ``Access-Control-Allow-Origin`` for itself and its preflight requests
are answered; any other origin gets no CORS headers (its preflight a 403), so browsers keep its pages from
reading answers or sending keys.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mae.errors import UsageError

SCOPES = ("read", "write")
MIN_KEY_LENGTH = 16
# Open to anyone whatever the keys: the page and its files, the API docs, BentoML's probes and metrics.
PUBLIC = re.compile(r"^/(|web/.*|docs|docs\.json|static_content/.*|healthz|livez|readyz|metrics)$")
WRITE_ROUTES = (("POST", re.compile(r"^/items/?$")), ("DELETE", re.compile(r"^/items/[^/]+/?$")))
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


@dataclass(frozen=True)
class Key:
    scope: str
    digest: bytes  # sha256 of the key: the key itself is not kept in memory once read
    name: str

    def __repr__(self) -> str:  # never show even the digest in a log or a traceback
        return f"Key(scope={self.scope!r}, name={self.name!r})"


class KeyRing:
    """The configured keys; ``scope_of`` answers which scope a presented key grants, in constant time."""

    def __init__(self, keys: Iterable[Key] = ()):
        self.keys = list(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, path: str | Path | None) -> KeyRing:
        """Read a key file; a bad line is a UsageError naming the file and line, never quoting the key."""
        if not path:
            return cls()
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"no API key file at {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the API key file {path} ({type(e).__name__})") from None
        keys: list[Key] = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) < 2 or fields[0] not in SCOPES:
                raise UsageError(f"{path}:{n}: expected 'read KEY [name]' or 'write KEY [name]'")
            scope, secret, name = fields[0], fields[1], " ".join(fields[2:]) or f"line {n}"
            if secret.startswith("sha256:"):
                hexdigest = secret.removeprefix("sha256:")
                if not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigest):
                    raise UsageError(f"{path}:{n}: a sha256: key is 64 hex digits")
                digest = bytes.fromhex(hexdigest)
            else:
                if len(secret) < MIN_KEY_LENGTH:
                    raise UsageError(f"{path}:{n}: keys are at least {MIN_KEY_LENGTH} characters "
                                     "(python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
                digest = hashlib.sha256(secret.encode()).digest()
            keys.append(Key(scope, digest, name))
        if not keys:
            raise UsageError(f"{path} holds no keys; remove --api-keys to run without them")
        return cls(keys)

    def scope_of(self, presented: str) -> Key | None:
        """The key matching ``presented`` (every key compared, in constant time), or None."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs: "write", "read", or None for what is always open."""
    if any(method == m and pattern.match(path) for m, pattern in WRITE_ROUTES):
        return "write"
    if method in ("GET", "HEAD") and PUBLIC.match(path):
        return None
    return "read"


class Guard:
    """ASGI middleware: CORS for the listed origins, then API keys (see the module docstring).

    Settings come from the environment (``MAE_API_KEYS_FILE``, ``MAE_PUBLIC_READ``, ``MAE_CORS_ORIGINS``), read
    once per worker process when BentoML builds the app.
    """

    def __init__(self, app: Any, keys: KeyRing | None = None, public_read: bool | None = None,
                 cors_origins: Iterable[str] | None = None) -> None:
        from serving.settings import Settings

        settings = Settings.from_env() if keys is None or public_read is None or cors_origins is None else None
        self.app = app
        self.keys = keys if keys is not None else KeyRing.load(settings.api_keys_file)
        self.public_read = public_read if public_read is not None else settings.public_read
        origins = cors_origins if cors_origins is not None else settings.cors_origins.split(",")
        self.origins = {o.strip().rstrip("/") for o in origins if o.strip()}
        self.worker = str(os.getpid()).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        allowed = origin is not None and origin.rstrip("/") in self.origins
        method = scope["method"]
        if method == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            if not allowed:
                return await _answer(send, 403, {"error": f"origin {origin[:100]!r} may not call this API"})
            return await _answer(send, 204, None, self._cors(origin) + [
                (b"access-control-allow-methods", CORS_METHODS.encode()),
                (b"access-control-allow-headers", CORS_HEADERS.encode()),
                (b"access-control-max-age", b"600")])
        extra = self._cors(origin) if allowed else []
        extra.append((b"x-mae-worker", self.worker))
        problem = self._check(method, scope.get("path", ""), headers.get("authorization"))
        if problem is not None:
            status, message = problem
            if status == 401:
                extra.append((b"www-authenticate", b'Bearer realm="mae"'))
            return await _answer(send, status, {"error": message}, extra)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _check(self, method: str, path: str, authorization: str | None) -> tuple[int, str] | None:
        needed = required_scope(method, path)
        if needed is None or (needed == "read" and (not self.keys or self.public_read)):
            return None
        if not self.keys:  # a write, and no keys configured
            return 403, "writes need an API key with write scope, and this server has none: start it with " \
                        "--api-keys FILE"
        if authorization is None:
            return 401, f"this endpoint needs an API key with {needed} scope: send 'Authorization: Bearer KEY'"
        kind, _, presented = authorization.partition(" ")
        if kind.lower() != "bearer" or not presented.strip():
            return 401, "send the API key as 'Authorization: Bearer KEY'"
        key = self.keys.scope_of(presented.strip())
        if key is None:
            return 401, "this API key is not valid here"
        if needed == "write" and key.scope != "write":
            return 403, "this API key may read but not write"
        return None

    @staticmethod
    def _cors(origin: str | None) -> list[tuple[bytes, bytes]]:
        if origin is None:
            return []
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


async def _answer(send: Any, status: int, payload: dict[str, Any] | None,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = b"" if payload is None else json.dumps(payload).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})
