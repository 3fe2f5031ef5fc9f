"""Header rewriting between the client and the upstream (RFC 9110 §7.6.1, RFC 9112 §6-7).

Pure functions over ``(raw_name, value)`` lists as h11 gives them. End-to-end headers keep
their order and casing; hop-by-hop headers (the fixed set and every name ``Connection``
lists) are dropped both ways. Framing headers are inputs for h11, which frames each side
itself. This module knows nothing of keys or sockets.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from email.utils import formatdate

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization",
    b"proxy-authenticate", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Replaced by the proxy on the way up: Host is the upstream's, Authorization the chosen key,
# Expect is answered locally, the body is re-sent with an exact Content-Length.
REPLACED_UPSTREAM = frozenset({b"host", b"authorization", b"expect", b"content-length",
                               b"x-request-id"})
REPLACED_DOWNSTREAM = frozenset({b"x-request-id"})
SERVER_NAME = b"orproxy"
REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:@+=/-]{1,128}")


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in ``Connection`` (lowercase)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def _end_to_end(headers: Iterable[tuple[bytes, bytes]], also_drop: frozenset[bytes]) -> Headers:
    headers = list(headers)
    drop = HOP_BY_HOP | also_drop
    if any(name.lower() == b"connection" for name, _ in headers):
        drop |= connection_tokens(headers)
    return [(n, v) for n, v in headers if n.lower() not in drop]


def upstream_request_headers(
    client_headers: Iterable[tuple[bytes, bytes]],
    *,
    host: bytes,
    authorization: bytes | None,
    request_id: bytes,
    body_length: int | None,
) -> Headers:
    """The request head sent upstream."""
    out: Headers = [(b"Host", host)]
    out += _end_to_end(client_headers, REPLACED_UPSTREAM)
    if authorization is not None:
        out.append((b"Authorization", authorization))
    if body_length is not None:
        out.append((b"Content-Length", str(body_length).encode()))
    out.append((b"X-Request-ID", request_id))
    return out


def client_response_headers(
    upstream_headers: Iterable[tuple[bytes, bytes]],
    *,
    request_id: bytes,
    close: bool,
) -> Headers:
    """The response head sent to the client: one Date, one Server, our X-Request-ID.

    A chunked upstream body loses its Content-Length, if the upstream sent both (h11 framed
    it by Transfer-Encoding; RFC 9112 §6.3), so the client sees one framing only.
    """
    upstream_headers = list(upstream_headers)
    chunked = any(n.lower() == b"transfer-encoding" for n, _ in upstream_headers)
    drop = REPLACED_DOWNSTREAM | ({b"content-length"} if chunked else set())
    out: Headers = []
    seen_date = seen_server = False
    for name, value in _end_to_end(upstream_headers, frozenset(drop)):
        lower = name.lower()
        if lower == b"date":
            if seen_date:
                continue
            seen_date = True
        elif lower == b"server":
            if seen_server:
                continue
            seen_server = True
        out.append((name, value))
    if not seen_date:
        out.append((b"Date", http_date()))
    if not seen_server:
        out.append((b"Server", SERVER_NAME))
    out.append((b"X-Request-ID", request_id))
    if close:
        out.append((b"Connection", b"close"))
    return out


def local_response_headers(
    content_type: bytes, request_id: bytes, *, close: bool, extra: Headers | None = None
) -> Headers:
    """Headers for a response the proxy makes itself (errors, /health, /metrics). Never
    cacheable: a cache in front of the proxy must not serve a stale "ok" or key table."""
    out: Headers = [
        (b"Date", http_date()),
        (b"Server", SERVER_NAME),
        (b"Content-Type", content_type),
        (b"Cache-Control", b"no-store"),
        (b"X-Request-ID", request_id),
    ]
    if extra:
        out += extra
    if close:
        out.append((b"Connection", b"close"))
    return out


def client_request_id(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The client's X-Request-ID if it is one sane token, else None (we make our own)."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            return value if REQUEST_ID_RE.fullmatch(value) else None
    return None


_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """IMF-fixdate for now, computed once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]


DECODABLE_CODINGS = frozenset({b"gzip", b"x-gzip", b"deflate", b"identity"})


def only_decodable_codings(headers: Headers) -> Headers:
    """Accept-Encoding narrowed to the codings whose bodies we can read for accounting
    (gzip, deflate): with br or zstd chosen, tokens and in-band errors would go unseen. The
    client still gets a coding it asked for; a list with nothing left becomes identity."""
    out: Headers = []
    for name, value in headers:
        if name.lower() == b"accept-encoding":
            kept = [c for c in (p.strip() for p in value.split(b","))
                    if c.split(b";", 1)[0].strip().lower() in DECODABLE_CODINGS]
            value = b", ".join(kept) or b"identity"
        out.append((name, value))
    return out
