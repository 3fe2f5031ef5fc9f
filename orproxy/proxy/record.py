"""What one request leaves behind: its record for the access log and metrics, and the trace
of its upstream attempts.

Plain data filled in as the request moves through its phases; the connection loop writes
the access line and the metrics from it once the response is done.
"""

from __future__ import annotations

import enum
import itertools
import os
import time
from dataclasses import dataclass, field


class Outcome(enum.Enum):
    """How a request ended, from the proxy's side."""

    OK = "ok"  # the upstream's answer was delivered whole
    LOCAL = "local"  # answered by the proxy itself (/health, /metrics …)
    LOCAL_ERROR = "local_error"  # the proxy refused it (401, 404, 405, 417 …)
    BAD_REQUEST = "bad_request"  # malformed or over a limit; the connection closes
    NO_KEY = "no_key"  # every key resting or disabled (429 / 503)
    UPSTREAM_ERROR = "upstream_error"  # upstream failed before the head (502 / 504)
    ABORTED = "aborted"  # upstream failed after the head: the client connection was cut
    CLIENT_GONE = "client_gone"  # the client left before the answer was done
    SHUTDOWN = "shutdown"  # the shutdown grace ended first (503 if nothing was sent)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One upstream attempt: which key (short id) and how it ended."""

    key_id: str
    outcome: str  # classify's verdict, or connect_error / upstream_error / timeout
    seconds: float


@dataclass(slots=True)
class RequestRecord:
    method: bytes
    path: bytes  # without the query, cut at 256 bytes
    request_id: bytes
    route: str = "unknown"
    status: int = 0
    outcome: Outcome = Outcome.OK
    sent_bytes: int = 0
    received_bytes: int = 0
    model: str = ""  # the bounded label the answer was counted under
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    cors: list[tuple[bytes, bytes]] = field(default_factory=list)  # for an allowed Origin
    started: float = field(default_factory=time.monotonic)

    @property
    def key_id(self) -> str:
        """The key of the last attempt (the one whose answer the client got)."""
        return self.attempts[-1].key_id if self.attempts else "-"

    @property
    def upstream_seconds(self) -> float:
        return sum(attempt.seconds for attempt in self.attempts)


_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count(1)


def new_request_id() -> bytes:
    """Unique per process (a random prefix per start, then a counter): no syscall per
    request, unlike os.urandom."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}".encode()
