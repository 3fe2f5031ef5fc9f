"""CORS for browser clients (the Fetch standard's CORS protocol), when ``server.cors_origins``
allows the page's origin.

Pure. The proxy answers preflights itself (no access key: a preflight carries none by
design and can do nothing) and marks every response to an allowed origin with
``Access-Control-Allow-Origin`` (the origin itself, with ``Vary: Origin``: it is right for
``*`` and for credentialed requests alike) and the headers a client may read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

ALLOW_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
BASE_HEADERS = (b"authorization", b"content-type")
EXPOSE = b"X-Request-ID, Retry-After, Server-Timing, X-Generation-Id, X-Orproxy-Cache"
MAX_AGE = b"600"
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def allowed_origin(origins: tuple[str, ...], headers: Iterable[tuple[bytes, bytes]],
                   ) -> bytes | None:
    """The request's Origin if the configuration allows it, else None."""
    if not origins:
        return None
    origin = _header(headers, b"origin")
    if origin is None or origin == b"null":
        return None
    if "*" in origins or origin.decode("latin-1") in origins:
        return origin
    return None


def response_headers(origin: bytes) -> Headers:
    return [(b"Access-Control-Allow-Origin", origin), (b"Vary", b"Origin"),
            (b"Access-Control-Expose-Headers", EXPOSE)]


def preflight_headers(origin: bytes, headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The answer to a preflight: the methods, and the headers it asked for (any well-formed
    names: attribution headers such as X-Title pass too) besides the two every client sends."""
    asked = _header(headers, b"access-control-request-headers") or b""
    names = list(BASE_HEADERS)
    for part in asked.split(b","):
        name = part.strip().lower()
        if name and _TOKEN.fullmatch(name) and name not in names:
            names.append(name)
    return [(b"Access-Control-Allow-Origin", origin), (b"Vary", b"Origin"),
            (b"Access-Control-Allow-Methods", ALLOW_METHODS),
            (b"Access-Control-Allow-Headers", b", ".join(names)),
            (b"Access-Control-Max-Age", MAX_AGE)]


def without_cors(headers: Headers) -> Headers:
    """The upstream's own CORS headers dropped: ours replace them."""
    return [(n, v) for n, v in headers if not n.lower().startswith(b"access-control-")]
