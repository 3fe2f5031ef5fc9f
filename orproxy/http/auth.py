"""The local access check: ``Authorization: Bearer <access_key>`` in constant time.

Pure. The comparison never short-circuits on the key's content (hmac.compare_digest), and
a request carrying several Authorization headers is refused rather than guessed at.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The single Bearer token, or None if absent, malformed or repeated."""
    values = [v for n, v in headers if n.lower() == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token or None


def check_access(headers: Iterable[tuple[bytes, bytes]], access_key: bytes) -> bool:
    token = bearer_token(headers)
    # compare against the key even when no token came, so timing says nothing either way
    return hmac.compare_digest(token or b"", access_key) and token is not None
