"""Client-side HTTP/1.1 framing: request bytes and an incremental response parser.

The parser handles a status line, headers, and a body framed by Content-Length,
chunked transfer encoding, or connection close. It calls a :class:`BodySink`
for headers and each decoded body piece, so that streaming consumers see
data as it arrives.
"""

from __future__ import annotations

from typing import Protocol


class ProtocolError(Exception):
    """The response did not follow HTTP/1.1 framing."""


class BodySink(Protocol):
    """Receives one response as it is parsed."""

    def on_headers(self, status: int, headers: dict[str, str]) -> None: ...

    def on_body(self, data: bytes) -> None: ...


def build_request(
    method: str,
    path: str,
    host: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    """Serialize a request; a body always gets a Content-Length."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ResponseParser:
    """Incremental parser for one response at a time; call :meth:`reset` to reuse."""

    def __init__(self, sink: BodySink, head_request: bool = False) -> None:
        self.sink = sink
        self.head_request = head_request
        self.state = _HEAD
        self.buf = b""
        self.remaining = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = True

    @property
    def complete(self) -> bool:
        return self.state == _DONE

    def reset(self, sink: BodySink) -> bytes:
        """Start a new response with ``sink``; returns bytes left over from the previous one."""
        left = self.buf
        self.sink = sink
        self.state = _HEAD
        self.buf = b""
        self.headers = {}
        return left

    def feed(self, data: bytes) -> None:
        """Consume ``data``; stops after a complete response (extra bytes kept in ``buf``)."""
        buf = self.buf + data if self.buf else data
        sink = self.sink
        while True:
            state = self.state
            if state == _CHUNK_DATA:
                if not buf:
                    break
                if len(buf) <= self.remaining:
                    self.remaining -= len(buf)
                    sink.on_body(buf)
                    buf = b""
                    if self.remaining == 0:
                        self.state = _CHUNK_CRLF
                    break
                piece, buf = buf[: self.remaining], buf[self.remaining :]
                self.remaining = 0
                sink.on_body(piece)
                self.state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise ProtocolError("chunk not followed by CRLF")
                buf = buf[2:]
                self.state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                i = buf.find(b"\r\n")
                if i < 0:
                    if len(buf) > 1024:
                        raise ProtocolError("chunk size line too long")
                    break
                try:
                    size = int(buf[:i].split(b";", 1)[0].strip(), 16)
                except ValueError as exc:
                    raise ProtocolError(f"bad chunk size {buf[:i]!r}") from exc
                buf = buf[i + 2 :]
                if size == 0:
                    self.state = _TRAILERS
                else:
                    self.remaining = size
                    self.state = _CHUNK_DATA
            elif state == _LENGTH:
                if not buf:
                    break
                take = buf[: self.remaining]
                buf = buf[len(take) :]
                self.remaining -= len(take)
                sink.on_body(take)
                if self.remaining == 0:
                    self.state = _DONE
            elif state == _HEAD:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(buf) > 65536:
                        raise ProtocolError("response head too long")
                    break
                self._parse_head(buf[:i])
                buf = buf[i + 4 :]
            elif state == _TRAILERS:
                i = buf.find(b"\r\n")
                if i < 0:
                    break
                line, buf = buf[:i], buf[i + 2 :]
                if not line:
                    self.state = _DONE
            elif state == _UNTIL_CLOSE:
                if buf:
                    sink.on_body(buf)
                buf = b""
                break
            else:  # _DONE
                break
        self.buf = buf

    def eof(self) -> None:
        """The connection closed; completes a close-delimited body."""
        if self.state == _UNTIL_CLOSE:
            self.state = _DONE

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0]!r}")
        try:
            self.status = int(parts[1])
        except ValueError as exc:
            raise ProtocolError(f"bad status line {lines[0]!r}") from exc
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"bad header line {line!r}")
            key = name.strip().lower().decode("latin-1")
            val = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {val}" if key in headers else val
        self.headers = headers
        conn = headers.get("connection", "").lower()
        self.keep_alive = "close" not in conn if parts[0] == b"HTTP/1.1" else "keep-alive" in conn
        if 100 <= self.status < 200:
            self.state = _HEAD  # interim response: wait for the final one
            return
        self.sink.on_headers(self.status, headers)
        te = headers.get("transfer-encoding", "").lower()
        if self.head_request or self.status in (204, 304):
            self.state = _DONE
        elif "chunked" in te:
            self.state = _CHUNK_SIZE
        elif "content-length" in headers:
            try:
                self.remaining = int(headers["content-length"])
            except ValueError as exc:
                raise ProtocolError("bad Content-Length") from exc
            self.state = _LENGTH if self.remaining else _DONE
        else:
            self.keep_alive = False
            self.state = _UNTIL_CLOSE
