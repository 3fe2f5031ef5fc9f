"""Checks on a parsed request head that h11 leaves to us (RFC 9112 / RFC 9110).

Pure. h11 accepts some heads a proxy must not forward: Content-Length together with
Transfer-Encoding (a request-smuggling vector, RFC 9112 §6.3), HTTP versions other than
1.0/1.1, Transfer-Encoding on HTTP/1.0 (§6.1), control characters in field values
(RFC 9110 §5.5), a malformed Host (§7.2), and heads that arrive in one piece larger than
h11's incremental limit. Each problem maps to the status RFC 9110 gives it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from orproxy.errors import ClientRequestError

# field-value may hold VCHAR, obs-text, SP and HTAB; any other control byte is an error
_CTL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HOST_RE = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]{0,5})?")


@dataclass(frozen=True, slots=True)
class BodyFraming:
    """How the request body is framed, as found while checking the head."""

    content_length: int | None
    chunked: bool

    @property
    def framed(self) -> bool:
        """The client framed a body (possibly empty)."""
        return self.chunked or self.content_length is not None

    @property
    def bodiless(self) -> bool:
        return not self.chunked and not self.content_length


def check_request_head(
    http_version: bytes,
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    max_head_bytes: int,
    max_header_count: int,
    max_target_bytes: int,
) -> BodyFraming:
    """Raise ClientRequestError for a head that must not be served or forwarded; else say
    how its body is framed (one scan of the headers serves both)."""
    if http_version not in (b"1.1", b"1.0"):
        raise ClientRequestError(505, "HTTP version not supported")
    if len(target) > max_target_bytes:
        raise ClientRequestError(414, "request target too long")
    if len(headers) > max_header_count:
        raise ClientRequestError(431, "too many header fields")
    size = len(method) + len(target) + 12
    length: int | None = None
    has_te = False
    for name, value in headers:
        size += len(name) + len(value) + 4
        if _CTL_RE.search(value):
            raise ClientRequestError(400, "control character in a header field value")
        if name == b"content-length":
            length = int(value)  # h11 has checked it is digits, and one value
        elif name == b"transfer-encoding":
            has_te = True
        elif name == b"host" and not _HOST_RE.fullmatch(value):
            raise ClientRequestError(400, "invalid Host header")
    if size > max_head_bytes:
        raise ClientRequestError(431, "request header section too large")
    if has_te and length is not None:
        raise ClientRequestError(400, "both Content-Length and Transfer-Encoding")
    if has_te and http_version == b"1.0":
        raise ClientRequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
    return BodyFraming(length, has_te)
