"""Response consumers for the asyncio client: SSE stream checking/timing and body capture.

A sink's ``now_ns``/``now_perf`` are set by the connection to the arrival time
of the bytes being fed, so every event is stamped with when it arrived.
"""

from __future__ import annotations

import json
from typing import Any

_MAX_ERRORS = 5


class TimedSink:
    """Base sink: records status, headers and arrival times."""

    def __init__(self) -> None:
        self.now_ns = 0  # time.time_ns() of the bytes being fed
        self.now_perf = 0  # time.perf_counter_ns() of the bytes being fed
        self.sent_perf = 0  # when the request was written
        self.first_byte_perf = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.errors: list[str] = []

    def error(self, message: str) -> None:
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(message)

    def on_headers(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers

    def on_body(self, data: bytes) -> None:
        raise NotImplementedError


class CollectSink(TimedSink):
    """Keeps the whole body."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []

    def on_body(self, data: bytes) -> None:
        self.parts.append(data)

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


class StreamRecorder(TimedSink):
    """Decodes the SSE body of a bench stream, validates it and times every chunk.

    A valid stream has ``expected`` JSON events with ``bench.seq`` 0..expected-1
    in order, the last one with ``usage`` and ``finish_reason`` "stop", then
    ``data: [DONE]``. For each event, ``arrival - bench.sent_ns`` is recorded in
    ``delays_ns``.
    """

    def __init__(self, expected: int, keep_delays: bool = True) -> None:
        super().__init__()
        self.expected = expected
        self.keep_delays = keep_delays
        self.next_seq = 0
        self.done = False
        self.first_event_perf = 0
        self.delays_ns: list[int] = []
        self._pending = b""

    def on_body(self, data: bytes) -> None:
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        buf = self._pending + data if self._pending else data
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            self._event(buf[start:end])
            start = end + 2
        self._pending = buf[start:]

    def _event(self, block: bytes) -> None:
        data_lines = []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                data_lines.append(value[1:] if value.startswith(b" ") else value)
            elif line and not line.startswith(b":"):
                self.error(f"unexpected SSE line {line[:60]!r}")
        if not data_lines:
            return
        payload = b"\n".join(data_lines)
        if not self.first_event_perf:
            self.first_event_perf = self.now_perf
        if payload == b"[DONE]":
            if self.done:
                self.error("duplicate [DONE]")
            elif self.next_seq != self.expected:
                self.error(f"[DONE] after {self.next_seq}/{self.expected} chunks")
            self.done = True
            return
        if self.done:
            self.error("data after [DONE]")
            return
        try:
            obj: Any = json.loads(payload)
            bench = obj["bench"]
            seq = int(bench["seq"])
            sent_ns = int(bench["sent_ns"])
        except (ValueError, KeyError, TypeError):
            self.error(f"bad chunk JSON {payload[:80]!r}")
            self.next_seq += 1
            return
        if seq != self.next_seq:
            self.error(f"chunk seq {seq}, expected {self.next_seq}")
        self.next_seq = seq + 1
        if self.keep_delays:
            self.delays_ns.append(self.now_ns - sent_ns)
        if seq == self.expected - 1:
            choice = (obj.get("choices") or [{}])[0]
            if "usage" not in obj or choice.get("finish_reason") != "stop":
                self.error("last chunk lacks usage or finish_reason=stop")

    def finish(self) -> None:
        """Record framing problems once the response is over."""
        if self.status != 200:
            self.error(f"status {self.status}")
        ctype = self.headers.get("content-type", "")
        if self.status == 200 and not ctype.startswith("text/event-stream"):
            self.error(f"content-type {ctype!r}")
        if self._pending.strip():
            self.error(f"trailing partial event {self._pending[:60]!r}")
        if not self.done and not self.errors:
            self.error(f"no [DONE] ({self.next_seq}/{self.expected} chunks)")

    @property
    def ok(self) -> bool:
        return not self.errors and self.done and self.next_seq == self.expected
