"""Every error type of the proxy, the one boundary helper that maps foreign exceptions onto
them, and the one function that turns an error into what the client is told.

Errors are split by origin: the socket (``StreamClosed`` / ``StreamTimeout``), the client's
request (``ClientRequestError``), the upstream (``UpstreamError`` and kin, tagged with how
far the request got), and the key pool (``NoKeyAvailable``). Foreign exceptions (OSError,
ssl, h11) become ours at the boundary through ``map_exceptions``, nowhere else. Bodies follow
OpenRouter's envelope: ``{"error": {"code": <status>, "message": <str>, "metadata": {...}}}``;
messages are our own words and never echo client input or upstream addresses.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

Headers = list[tuple[bytes, bytes]]


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


# What the client is told for a request h11 refused, by h11's status hint: our own words,
# never h11's (which quote the client's bytes).
PROTOCOL_MESSAGES = {
    400: "malformed request",
    408: "request not received in time",
    413: "request body too large",
    414: "request target too long",
    431: "request header section too large",
    501: "transfer coding not implemented",
    505: "HTTP version not supported",
}


def client_protocol_error(status: int) -> ClientRequestError:
    return ClientRequestError(status, PROTOCOL_MESSAGES.get(status, "malformed request"))


class Stage(enum.Enum):
    """How far a request got with the upstream when an attempt failed: what decides whether
    it may be sent again (RFC 9110 §9.2.2: a proxy must not repeat a non-idempotent
    request the upstream may have received)."""

    CONNECT = "connect"  # nothing was sent: connect, TLS or outgoing-proxy failure
    SENT = "sent"  # the request went out, no response byte came back
    RESPONSE = "response"  # response bytes had arrived


class UpstreamError(Exception):
    """Talking to the upstream failed; ``status`` is what the client gets if nothing else
    works, ``public_message`` what it is told (details are logged only)."""

    status = 502
    public_message = "upstream failed"

    def __init__(self, message: str, stage: Stage) -> None:
        super().__init__(message)
        self.message = message
        self.stage = stage


class UpstreamConnectError(UpstreamError):
    """The upstream (or the outgoing proxy) could not be reached."""

    public_message = "upstream unreachable"

    def __init__(self, message: str) -> None:
        super().__init__(message, Stage.CONNECT)


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer, or stalled mid-body, within its timeout."""

    status = 504
    public_message = "upstream timed out"


class UpstreamProtocolError(UpstreamError):
    """The upstream broke HTTP/1.1 or closed the connection early."""

    public_message = "upstream sent an invalid or incomplete response"


class NoKeyAvailable(Exception):
    """Every upstream key is resting (``retry_after`` seconds until the soonest returns) or
    disabled (``retry_after`` None)."""

    def __init__(self, retry_after: float | None, upstream_message: str = "") -> None:
        super().__init__("no upstream key available")
        self.retry_after = retry_after
        self.upstream_message = upstream_message  # OpenRouter's words on the soonest key's limit


class ConnectionLimit(Exception):
    """The proxy serves this connection from its reserve: only its own pages, no forwarding."""


class ShuttingDown(Exception):
    """The shutdown grace period ended before this request was answered."""


class map_exceptions:
    """Translate foreign exceptions at a boundary: ``with map_exceptions({OSError:
    StreamClosed}):``. Each value builds our exception from the foreign one (an exception
    class taking a message, or a factory); the original is chained. A class, not a
    generator context manager: it is entered on hot paths."""

    __slots__ = ("_mapping",)

    def __init__(self, mapping: Mapping[type[BaseException],
                                        Callable[[str], Exception]]) -> None:
        self._mapping = mapping

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if exc is None or not isinstance(exc, Exception):
            return False
        for foreign, make in self._mapping.items():
            if isinstance(exc, foreign):
                raise make(str(exc) or type(exc).__name__) from exc
        return False


@dataclass(frozen=True)
class Answer:
    """What the client is told for an error: status, message, extra headers, metadata."""

    status: int
    message: str
    headers: Headers = field(default_factory=list)
    metadata: dict[str, Any] | None = None
    close: bool = False  # the connection must close after it


def whole_seconds(seconds: float) -> int:
    """Seconds rounded up, at least 1: what a Retry-After may say."""
    whole = int(seconds)
    return max(whole + (whole < seconds), 1)


def answer_for(exc: BaseException) -> Answer:
    """The one mapping from an error to the client's answer."""
    if isinstance(exc, ClientRequestError):
        return Answer(exc.status, exc.message, close=True)
    if isinstance(exc, UpstreamError):
        return Answer(exc.status, exc.public_message)
    if isinstance(exc, NoKeyAvailable):
        if exc.retry_after is None:
            return Answer(503, "every upstream key is disabled")
        seconds = whole_seconds(exc.retry_after)
        metadata: dict[str, Any] = {"retry_after_seconds": seconds}
        if exc.upstream_message:  # which of OpenRouter's limits rests the soonest key
            metadata["upstream_message"] = exc.upstream_message
        return Answer(429, f"every upstream key is rate limited; retry in {seconds}s",
                      [(b"Retry-After", str(seconds).encode())], metadata)
    if isinstance(exc, ConnectionLimit):
        return Answer(503, "proxy at its connection limit; retry shortly",
                      [(b"Retry-After", b"1")], close=True)
    if isinstance(exc, ShuttingDown):
        return Answer(503, "proxy shutting down; retry shortly", [(b"Retry-After", b"1")],
                      close=True)
    return Answer(500, "internal error", close=True)


def error_body(status: int, message: str, metadata: dict[str, Any] | None = None) -> bytes:
    """An OpenRouter-shaped JSON error body."""
    error: dict[str, Any] = {"code": status, "message": message}
    if metadata:
        error["metadata"] = metadata
    return json.dumps({"error": error}, separators=(",", ":")).encode()
