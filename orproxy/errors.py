"""Error types by origin, and the one mapping from an error to a status and a JSON body.

Errors raised while talking to the client, to the upstream, or while choosing a key are kept
apart so that the handler can decide in one place what the client sees. Bodies follow
OpenRouter's envelope: ``{"error": {"code": <status>, "message": <str>, "metadata": {...}}}``.
"""

from __future__ import annotations

import json
from typing import Any


class StreamClosed(Exception):
    """The peer closed or reset the connection."""


class StreamTimeout(Exception):
    """A read, write or connect did not complete in its time."""


class ClientRequestError(Exception):
    """The client's request is malformed or over a limit; answered locally, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UpstreamError(Exception):
    """Talking to the upstream failed; ``status`` is what the client gets if nothing else works.

    ``before_response`` tells whether the failure happened before any response byte arrived,
    which is what makes a retry safe.
    """

    status = 502
    public_message = "upstream failed"  # what the client is told; details are logged only

    def __init__(self, message: str, *, before_response: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.before_response = before_response


class UpstreamConnectError(UpstreamError):
    """The upstream (or the outgoing proxy) could not be reached."""

    public_message = "upstream unreachable"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer, or stalled mid-body, within its timeout."""

    status = 504
    public_message = "upstream timed out"


class UpstreamProtocolError(UpstreamError):
    """The upstream broke HTTP/1.1 or closed the connection early."""

    public_message = "upstream sent an invalid or incomplete response"


def error_body(status: int, message: str, metadata: dict[str, Any] | None = None) -> bytes:
    """An OpenRouter-shaped JSON error body."""
    error: dict[str, Any] = {"code": status, "message": message}
    if metadata:
        error["metadata"] = metadata
    return json.dumps({"error": error}, separators=(",", ":")).encode()
