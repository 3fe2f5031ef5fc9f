"""A guard that follows a chunked request body beside h11, to refuse at once what h11 would
wait on forever.

Pure. h11 frames the body; this only watches the chunk-size and trailer lines go by:
- a chunk size longer than 16 hex digits (400), or larger than what is left of the body
  limit (413), is refused as soon as its digits arrive — h11 would wait for the bytes of a
  chunk that can never be sent;
- a chunk-size or trailer line ended by a bare LF (400) — h11 would wait for a CRLF that
  never comes (RFC 9112 §7.1 requires CRLF).
Chunk data is skipped by count, so the cost is per line, not per byte.
"""

from __future__ import annotations

import enum

from orproxy.errors import ClientRequestError

MAX_SIZE_DIGITS = 16
MAX_LINE_BYTES = 4096  # chunk extensions included; h11 bounds the rest


class _At(enum.Enum):
    SIZE = "size"  # in a chunk-size line
    DATA = "data"  # in chunk data
    DATA_END = "data_end"  # in the CRLF after chunk data (h11 checks its bytes)
    TRAILER = "trailer"  # in the trailer section
    DONE = "done"  # past the last CRLF: what follows is the next request


class ChunkedGuard:
    __slots__ = ("_at", "_left", "_limit", "_line")

    def __init__(self, limit: int) -> None:
        self._at = _At.SIZE
        self._line = b""
        self._left = 0  # bytes of chunk data (DATA) or of CRLF (DATA_END) still to come
        self._limit = limit  # bytes the remaining chunks may still carry

    @property
    def done(self) -> bool:
        return self._at is _At.DONE

    def feed(self, data: bytes) -> None:
        """Follow ``data`` (the next bytes after those fed before); raise
        ClientRequestError for framing that must be refused now."""
        i, n = 0, len(data)
        while i < n and self._at is not _At.DONE:
            if self._at is _At.DATA or self._at is _At.DATA_END:
                take = min(self._left, n - i)
                self._left -= take
                i += take
                if not self._left:
                    if self._at is _At.DATA:
                        self._at, self._left = _At.DATA_END, 2
                    else:
                        self._at = _At.SIZE
                continue
            end = data.find(b"\n", i)
            self._line += data[i:n if end < 0 else end]
            if len(self._line) > MAX_LINE_BYTES:
                raise ClientRequestError(400, "bad chunked framing (line too long)")
            if end < 0:
                if self._at is _At.SIZE:
                    self._size(self._line)
                return
            i = end + 1
            self._line_done()

    def _line_done(self) -> None:
        line, self._line = self._line, b""
        if not line.endswith(b"\r"):
            raise ClientRequestError(400, "bad chunked framing (bare LF)")
        if self._at is _At.TRAILER:
            if line == b"\r":
                self._at = _At.DONE
            return
        size = self._size(line)
        if size is None:
            return  # not a size line: h11 refuses it
        if size == 0:
            self._at = _At.TRAILER
        else:
            self._limit -= size
            self._at, self._left = _At.DATA, size

    def _size(self, line: bytes) -> int | None:
        """The chunk size a (possibly incomplete) size line gives so far; refused once it
        cannot fit, however many digits are still to come."""
        digits = 0
        while digits < len(line) and line[digits] in b"0123456789abcdefABCDEF":
            digits += 1
        if digits > MAX_SIZE_DIGITS:
            raise ClientRequestError(400, "bad chunked framing (chunk size too long)")
        if not digits:
            return None
        size = int(line[:digits], 16)
        if size > self._limit:
            raise ClientRequestError(413, "request body too large")
        return size
