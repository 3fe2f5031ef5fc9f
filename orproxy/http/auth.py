"""The local access check: ``Authorization: Bearer <access_key>`` in constant time, and for
the proxy's own pages also HTTP Basic with the access key as the password (so a browser
shows its login prompt; the user name is ignored).

Pure. The comparison never short-circuits on the key's content (hmac.compare_digest), and
a request carrying several Authorization headers is refused rather than guessed at.
"""

from __future__ import annotations

import binascii
import hmac
from base64 import b64decode
from collections.abc import Iterable


def _credentials(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, bytes] | None:
    """(scheme lowercased, credentials) of the single Authorization header."""
    values = [v for n, v in headers if n.lower() == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, rest = values[0].strip().partition(b" ")
    return scheme.lower(), rest.strip()


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The single Bearer token, or None if absent, malformed or repeated."""
    found = _credentials(headers)
    if found is None or found[0] != b"bearer":
        return None
    return found[1] or None


def basic_password(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The password of a single well-formed Basic header, or None."""
    found = _credentials(headers)
    if found is None or found[0] != b"basic":
        return None
    try:
        decoded = b64decode(found[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    _user, colon, password = decoded.partition(b":")
    return password if colon else None


def check_access(headers: Iterable[tuple[bytes, bytes]], access_key: bytes, *,
                 basic: bool = False) -> bool:
    headers = list(headers)
    token = bearer_token(headers)
    if token is None and basic:
        token = basic_password(headers)
    # compare against the key even when no token came, so timing says nothing either way
    return hmac.compare_digest(token or b"", access_key) and token is not None
