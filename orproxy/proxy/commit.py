"""Commit late: hold a stream's head until its first real event says whether it failed.

OpenRouter may answer 200 to a streaming request and then, before any content, send an SSE
event carrying `error` (OPENROUTER.md "Newer signals": a rate limit hit after generation
began arrives as an SSE event with `error` and `finish_reason: "error"`, possibly before any
content). While nothing has reached the client, such an answer can still be retried on
another key; `FirstEvent` reads the stream's first bytes and says when that chance is over.

Pure and incremental: bytes in, a Decision out, the same whatever the split (the decision
depends only on the first `max_hold_bytes` bytes and on whether more came). It parses SSE
framing per the WHATWG event-stream rules (LF, CRLF or CR line ends, `:` comments, `data:`
lines joined by LF, `event:` names) and knows the error shapes of the chat, Responses and
Anthropic streams. It holds no bytes for the caller and knows nothing of sockets or keys.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any

BOM = b"\xef\xbb\xbf"
DONE = b"[DONE]"
ERROR_EVENTS = frozenset({"error", "response.failed"})  # Anthropic/Responses event names
KEEPALIVE_TYPES = frozenset({"ping"})  # Anthropic's keep-alive event: not a real event
MESSAGE_CHARS = 300

_EOL = re.compile(rb"[\r\n]")
# An event without these can be neither an error nor a keep-alive, so the first content
# event commits undecoded: keys and values are quoted, words inside a text have their
# quotes escaped, and \u escapes (which could spell any of them) send it to the decoder.
_MAYBE_NOT_CONTENT = re.compile(rb'"error"|failed"|"ping"|\\u')


class Decision(enum.Enum):
    HOLD = "hold"  # nothing decisive yet: keep holding the head and the bytes
    COMMIT = "commit"  # a real event (or too much held): send the head and everything held
    ERROR = "error"  # the first real event is an error: the answer may be retried


class FirstEvent:
    """Feed the stream's bytes as they come; the first decision sticks."""

    def __init__(self, *, max_hold_bytes: int = 64 * 1024) -> None:
        if max_hold_bytes < 1:
            raise ValueError("max_hold_bytes must be at least 1")
        self.max_hold_bytes = max_hold_bytes
        self.decision = Decision.HOLD
        self.error_envelope: bytes | None = None  # compact JSON {"error": …} of the event
        self.error_status: int | None = None  # its error.code when an int HTTP status
        self._fed = 0  # bytes fed while holding
        self._line = bytearray()  # the line not yet ended
        self._first_line = True
        self._skip_lf = False  # the last line ended with CR: an LF right after belongs to it
        self._data: list[bytes] = []
        self._event = b""

    def __repr__(self) -> str:
        return f"<FirstEvent {self.decision.value} fed={self._fed}/{self.max_hold_bytes}>"

    def feed(self, data: bytes) -> Decision:
        if self.decision is not Decision.HOLD:
            return self.decision
        window = self.max_hold_bytes - self._fed  # only these first bytes may decide
        self._fed += len(data)
        self._scan(data if len(data) <= window else data[:max(0, window)])
        if self.decision is Decision.HOLD and self._fed > self.max_hold_bytes:
            self.decision = Decision.COMMIT  # held too much: stop waiting
        return self.decision

    def _scan(self, data: bytes) -> None:
        pos, end = 0, len(data)
        if self._skip_lf and end:
            self._skip_lf = False
            pos = 1 if data[0] == 0x0A else 0
        while pos < end:
            match = _EOL.search(data, pos)
            if match is None:
                self._line += data[pos:]
                return
            j = match.start()
            line = bytes(self._line) + data[pos:j] if self._line else data[pos:j]
            self._line.clear()
            pos = j + 1
            if data[j] == 0x0D:
                if pos < end:
                    pos += data[pos] == 0x0A
                else:
                    self._skip_lf = True
            if self._on_line(line):
                return

    def _on_line(self, line: bytes) -> bool:
        """One complete line; True once decided."""
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(BOM)
        if not line:
            return self._dispatch()
        # a comment (": OPENROUTER PROCESSING") is a field with an empty name: ignored below
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        return False  # id, retry and unknown fields change nothing here

    def _dispatch(self) -> bool:
        data, event = self._data, self._event
        self._data, self._event = [], b""
        if not data:  # a blank line with no data: no event (keep-alive padding)
            return False
        decision, error = _judge(event.decode("utf-8", "replace"), b"\n".join(data))
        if decision is Decision.HOLD:
            return False
        self.decision = decision
        if error is not None:
            self.error_envelope, self.error_status = _envelope(error)
        return True


def _judge(event: str, data: bytes) -> tuple[Decision, Any]:
    """One complete event → its decision, and the error object for ERROR."""
    if data == DONE:
        return Decision.COMMIT, None
    if event not in ERROR_EVENTS and _MAYBE_NOT_CONTENT.search(data) is None:
        return Decision.COMMIT, None  # what decoding it would say, for far less
    try:
        doc: Any = json.loads(data)
    except (ValueError, RecursionError):
        if event in ERROR_EVENTS:
            return Decision.ERROR, {"message": data.decode("utf-8", "replace")[:MESSAGE_CHARS]}
        return Decision.COMMIT, None
    if not isinstance(doc, dict):
        return (Decision.ERROR, {"message": "error event"}) if event in ERROR_EVENTS else (
            Decision.COMMIT, None)
    error = _error_of(event, doc)
    if error is not None:
        return Decision.ERROR, error
    kind = doc.get("type")
    if isinstance(kind, str) and kind in KEEPALIVE_TYPES and len(doc) == 1:
        return Decision.HOLD, None
    return Decision.COMMIT, None


def _error_of(event: str, doc: dict[str, Any]) -> Any:
    """The error an event carries, or None.

    Chat chunks and Anthropic `error` events carry a top-level `error`; the Responses API's
    `error` event carries its fields at the top level, `response.failed` in `response.error`.
    """
    if doc.get("error"):
        return doc["error"]
    kind = doc.get("type")
    if kind == "response.failed" or (event == "response.failed" and kind is None):
        response = doc.get("response")
        error = response.get("error") if isinstance(response, dict) else None
        return error or {"message": "response failed"}
    if kind == "error" or event in ERROR_EVENTS:
        return {k: v for k, v in doc.items() if k not in ("type", "sequence_number")}
    return None


def _envelope(error: Any) -> tuple[bytes, int | None]:
    try:
        envelope = json.dumps({"error": error}, separators=(",", ":"), ensure_ascii=True)
    except (ValueError, RecursionError):
        envelope = '{"error":{"message":"upstream error"}}'
    code = error.get("code") if isinstance(error, dict) else None
    status = code if type(code) is int and 100 <= code <= 599 else None
    return envelope.encode("ascii"), status
