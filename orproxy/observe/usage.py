"""Token and cost accounting from relayed response bodies, and in-band errors.

Owns: reading OpenRouter's ``usage`` objects (chat/completions, Responses API, Anthropic
messages) and the top-level ``error`` objects an HTTP 200 may carry, from a JSON body or an
SSE stream, into one normalised record. Must not know: HTTP framing, keys, metrics, the
event loop. Pure: bytes in, a ``BodySummary`` out; it never changes the relayed bytes.

The relay calls ``feed`` for every chunk it forwards, so ``feed`` does no parsing: it keeps
the first ``head_bytes`` and the last ``tail_bytes`` of the body as chunk references (only
the head's last piece is copied, once), which bounds memory whatever the body's size.
Everything is parsed once, in ``result()``. The window read is a function of the body
bytes alone (the whole body if it fits in head + tail, else exactly its first
``head_bytes`` and last ``tail_bytes``), so how the body was cut into chunks never changes
the answer.

SSE is read as the WHATWG spec reads it (§9.2.6): CRLF, LF or CR line ends, comments, one
optional space after the colon, multi-line data joined with ``\\n``, an event dispatched
only at a blank line (a stream cut short loses its unfinished event, as a client would).
Only events whose bytes say ``"usage"`` or ``error`` (and the first ones, until a model is
found) are parsed as JSON. A stream too large for the window is read best effort: the
events wholly in the head, those wholly in the tail, and the tail's first, cut event
searched for its last ``"usage":`` key (an event larger than the tail: a
``response.completed`` holding the whole output text).
"""

from __future__ import annotations

import json
import re
import zlib
from collections import deque
from dataclasses import dataclass
from itertools import chain
from typing import Any

HEAD_BYTES = 16384
TAIL_BYTES = 65536
MESSAGE_CHARS = 300  # as the classifier's messages
ENVELOPE_BYTES = 65536  # as the error body the exchange reads ahead before classifying
MAX_TOKENS = 10**12  # per response; anything larger is not a count but garbage
MAX_COST_USD = 1e6  # per response; likewise
MODEL_CHARS = 256
USAGE_CANDIDATES = 8  # "usage": keys tried from the end of a cut text; bounds hostile input

# Anthropic reports errors by type, not code; the two a key's fate depends on.
ANTHROPIC_ERROR_CODES = {"rate_limit_error": 429, "overloaded_error": 503}

_USAGE_KEY = re.compile(r'"usage"\s*:\s*')
_OBJECT_START = re.compile(r"\s*\{\s*")
_NEXT_MEMBER = re.compile(r"\s*,\s*")
_KEY_COLON = re.compile(r"\s*:\s*")
_DECODER = json.JSONDecoder()
_RawUsage = dict[str, float]  # canonical field → sanitised value; see _raw_usage


@dataclass(frozen=True, slots=True)
class Usage:
    """One response's usage, in every dialect's terms.

    ``prompt_tokens`` counts every prompt token, cached or not (OpenAI's meaning; Anthropic's
    ``input_tokens`` leaves out cache reads and writes, so those are added back).
    ``cached_tokens`` (read from cache) and ``cache_write_tokens`` are parts of it;
    ``reasoning_tokens`` is part of ``completion_tokens``. ``cost`` is USD, 0 when absent.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0


@dataclass(frozen=True, slots=True)
class InBandError:
    """The first error an HTTP 200 carried.

    ``code``: the error's integer ``code`` (an HTTP status, 100–999), or Anthropic's error
    type mapped (``rate_limit_error`` → 429, ``overloaded_error`` → 503), else None.
    ``envelope``: ``{"error": <the error object>}`` as compact JSON (None over 64 KiB), for
    the same classifier as an HTTP error body. ``before_content``: no content event (a data
    event that is neither an error nor ``[DONE]``) came before it. A JSON body is one piece,
    so there it is always True. For a stream larger than the scanner's window, events in the
    unseen middle are unknown: the answer then rests on head and tail alone, and an error
    hidden in the middle, or inside an event cut by the window, is not found.
    """

    code: int | None
    message: str
    envelope: bytes | None
    before_content: bool


@dataclass(frozen=True, slots=True)
class BodySummary:
    """What a body said: its usage (None if it gave none), its model, its first error."""

    usage: Usage | None
    model: str | None
    error: InBandError | None


class UsageScanner:
    """Collects a response body's head and tail as it is relayed; ``result()`` reads them.

    Chunks are kept by reference: a chunk must not be changed after it is fed (h11's
    ``Data`` and socket reads give a fresh object each time). Memory held: at most
    ``head_bytes`` + ``tail_bytes`` + one chunk (the largest), in at most that many
    chunk objects (empty chunks are not kept).
    """

    __slots__ = ("_head", "_head_cap", "_lost", "_room", "_size", "_sse", "_tail", "_tail_cap")

    def __init__(self, *, sse: bool, head_bytes: int = HEAD_BYTES,
                 tail_bytes: int = TAIL_BYTES) -> None:
        if head_bytes < 0 or tail_bytes < 1:
            raise ValueError("head_bytes must be >= 0 and tail_bytes >= 1")
        self._sse = sse
        self._head_cap = head_bytes
        self._tail_cap = tail_bytes
        self._head: list[bytes | bytearray] = []  # the body's first bytes, from the tail's front
        self._room = head_bytes  # head bytes still wanted
        self._tail: deque[bytes | bytearray] = deque()  # the last chunks, >= tail_cap bytes
        self._size = 0  # bytes in _tail
        self._lost = False  # some bytes went to neither head nor tail

    def feed(self, data: bytes | bytearray) -> None:
        """Note one relayed chunk (any size, possibly empty)."""
        # The hot path: one append and the trim, no parsing, no copy. A chunk leaves the tail
        # only when the rest still holds tail_cap bytes; the first ones become the head.
        if not data:  # else empty chunks would pile up in a tail that never fills
            return
        tail = self._tail
        tail.append(data)
        size = self._size + len(data)
        cap = self._tail_cap
        while size - len(tail[0]) >= cap:
            first = tail.popleft()
            size -= len(first)
            if self._room:
                self._keep_head(first)
            else:
                self._lost = True
        self._size = size

    def _keep_head(self, chunk: bytes | bytearray) -> None:
        room = self._room
        if len(chunk) > room:
            chunk = bytes(chunk[:room])  # keep only what the head needs, not the whole chunk
        self._head.append(chunk)
        self._room = room - len(chunk)

    @property
    def retained_bytes(self) -> int:
        """Body bytes held now (head + tail)."""
        return self._head_cap - self._room + self._size

    def result(self) -> BodySummary:
        """Parse what was kept. Idempotent (it reads, never consumes); never raises."""
        body_size = self.retained_bytes
        if self._sse and not self._lost and body_size <= self._head_cap + self._tail_cap:
            # the whole body is here: the common stream is read from its end alone
            fast = _one_usage_event(self._last(END_BYTES), self._first(START_BYTES),
                                    whole=body_size <= END_BYTES)
            if fast is not None:
                return fast
        head, tail = self._window()
        return _scan_sse(head, tail) if self._sse else _scan_json(head, tail)

    def _last(self, size: int) -> bytes:
        """The last ``size`` bytes of what was kept (all if shorter), joined from the
        fewest chunks."""
        parts: list[bytes | bytearray] = []
        got = 0
        for chunk in chain(reversed(self._tail), reversed(self._head)):
            parts.append(chunk)
            got += len(chunk)
            if got >= size:
                break
        parts.reverse()
        return b"".join(parts)[-size:]

    def _first(self, size: int) -> bytes:
        """The first ``size`` bytes of what was kept (all if shorter)."""
        parts: list[bytes | bytearray] = []
        got = 0
        for chunk in chain(self._head, self._tail):
            parts.append(chunk)
            got += len(chunk)
            if got >= size:
                break
        return b"".join(parts)[:size]

    def _window(self) -> tuple[bytes, bytes | None]:
        """(whole body, None) if it fits in head + tail, else (first head_cap, last tail_cap
        bytes): a function of the body alone, whatever the chunking. A leading BOM is
        dropped, as an SSE client drops it."""
        head = b"".join(self._head)
        tail = b"".join(self._tail)
        if not self._lost and len(head) + len(tail) <= self._head_cap + self._tail_cap:
            return _no_bom(head + tail), None
        if len(head) < self._head_cap:
            head += tail[: self._head_cap - len(head)]
        return _no_bom(head), tail[-self._tail_cap:]


class InflatingScanner:
    """A scanner for a gzip- or deflate-encoded body: a copy of each chunk is inflated for
    the scan (the relayed bytes stay as they are). Inflating stops after
    ``MAX_INFLATED_BYTES`` (a compression bomb costs bounded work) or at bad data."""

    __slots__ = ("_inflated", "_inflater", "_scanner")

    def __init__(self, scanner: UsageScanner) -> None:
        self._scanner = scanner
        # wbits 47 = 32 + 15: a zlib or gzip header, detected
        self._inflater: Any = zlib.decompressobj(47)
        self._inflated = 0

    def feed(self, data: bytes | bytearray) -> None:
        inflater = self._inflater
        if inflater is None or not data:
            return
        try:
            out = inflater.decompress(data, MAX_INFLATED_BYTES - self._inflated)
        except zlib.error:
            self._inflater = None
            return
        self._inflated += len(out)
        if self._inflated >= MAX_INFLATED_BYTES:
            self._inflater = None
        self._scanner.feed(out)

    def result(self) -> BodySummary:
        return self._scanner.result()


MAX_INFLATED_BYTES = 64 * 1024 * 1024
DECODABLE = frozenset({b"gzip", b"x-gzip", b"deflate"})


def scanner_for(content_type: bytes | None, content_encoding: bytes | None, *,
                head_bytes: int = HEAD_BYTES, tail_bytes: int = TAIL_BYTES
                ) -> UsageScanner | InflatingScanner | None:
    """A scanner for a response with these headers, or None when there is nothing to read:
    a media type other than SSE or JSON, or a coding we cannot undo (br, zstd, several)."""
    if content_type is None:
        return None
    codings = []
    if content_encoding:
        codings = [c.strip().lower() for c in content_encoding.split(b",")]
        codings = [c for c in codings if c not in (b"", b"identity")]
        if len(codings) > 1 or (codings and codings[0] not in DECODABLE):
            return None
    media = content_type.split(b";", 1)[0].strip().lower()
    if media not in (b"text/event-stream", b"application/json"):
        return None
    scanner = UsageScanner(sse=media == b"text/event-stream", head_bytes=head_bytes,
                           tail_bytes=tail_bytes)
    return InflatingScanner(scanner) if codings else scanner


def usage_from(obj: object) -> Usage | None:
    """One ``usage`` object of any dialect → Usage; None if it is not one. Bad fields
    (strings, booleans, negative, fractional, NaN, huge) count as 0."""
    raw = _raw_usage(obj)
    return None if raw is None else _build_usage(raw)


# --- usage fields --------------------------------------------------------------------------------

# canonical field ← (path in the usage object); the first present path wins
_FIELDS: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("prompt", (("prompt_tokens",),)),
    ("input", (("input_tokens",),)),
    ("completion", (("completion_tokens",), ("output_tokens",))),
    ("cached", (("prompt_tokens_details", "cached_tokens"),
                ("input_tokens_details", "cached_tokens"), ("cache_read_input_tokens",))),
    ("cache_write", (("prompt_tokens_details", "cache_write_tokens"), ("cache_write_tokens",),
                     ("cache_creation_input_tokens",))),
    ("reasoning", (("completion_tokens_details", "reasoning_tokens"),
                   ("output_tokens_details", "reasoning_tokens"))),
)
_MISSING = object()
_ANTHROPIC_MARKERS = ("cache_read_input_tokens", "cache_creation_input_tokens")


def _raw_usage(obj: object) -> _RawUsage | None:
    """The usage fields present in ``obj``, sanitised; None if it holds none."""
    if not isinstance(obj, dict):
        return None
    raw: _RawUsage = {}
    for name, paths in _FIELDS:
        for path in paths:  # paths are one or two keys long
            value = obj.get(path[0], _MISSING)
            if len(path) > 1 and value is not _MISSING:
                value = value.get(path[1], _MISSING) if isinstance(value, dict) else _MISSING
            if value is not _MISSING:
                raw[name] = _count(value)
                break
    if "cost" in obj:
        raw["cost"] = _cost(obj["cost"])
    if not raw:
        return None
    if any(marker in obj for marker in _ANTHROPIC_MARKERS):
        raw["anthropic"] = 1  # input_tokens leaves out the cache: add it back
    return raw


def _count(value: object) -> int:
    if type(value) is int:  # not bool
        return value if 0 <= value <= MAX_TOKENS else 0
    if type(value) is float and value.is_integer() and 0 <= value <= MAX_TOKENS:
        return int(value)
    return 0


def _cost(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    try:
        number = float(value)
    except OverflowError:  # an int beyond a float's range
        return 0.0
    return number if 0 < number <= MAX_COST_USD else 0.0  # NaN compares false


def _merge(into: _RawUsage, later: _RawUsage) -> None:
    """Anthropic streams give input counts early and cumulative output late: keep the
    earlier fields, overridden by later non-zero ones."""
    for name, value in later.items():
        if value or name not in into:
            into[name] = value


def _build_usage(raw: _RawUsage) -> Usage:
    cached = int(raw.get("cached", 0))
    write = int(raw.get("cache_write", 0))
    if "prompt" in raw:
        prompt = int(raw["prompt"])
    else:
        prompt = int(raw.get("input", 0))
        if raw.get("anthropic"):
            prompt += cached + write
    return Usage(prompt, int(raw.get("completion", 0)), cached, write,
                 int(raw.get("reasoning", 0)), float(raw.get("cost", 0.0)))


def _usage_near_end(text: str, *, cut_start: bool) -> _RawUsage | None:
    """The value of the last ``"usage":`` key in ``text`` that is a usage object.

    Inside a JSON string every quote is escaped, so a ``"usage":`` whose quote follows an
    even run of backslashes is a key, wherever the text was cut.
    """
    matches = list(_USAGE_KEY.finditer(text))
    for match in reversed(matches[-USAGE_CANDIDATES:]):
        if not _unescaped(text, match.start(), cut_start=cut_start):
            continue
        try:
            value, _ = _DECODER.raw_decode(text, match.end())
        except (ValueError, RecursionError):
            continue
        raw = _raw_usage(value)
        if raw is not None:
            return raw
    return None


def _unescaped(text: str, pos: int, *, cut_start: bool) -> bool:
    start = pos
    while pos > 0 and text[pos - 1] == "\\":
        pos -= 1
    if pos == 0 and cut_start:
        return False  # what came before the cut (a backslash?) is unknown
    return (start - pos) % 2 == 0


# --- model and errors ---------------------------------------------------------------------------


def _model_of(doc: dict[str, Any]) -> str | None:
    """Chat: top-level ``model``; Responses: ``response.model``; Anthropic: ``message.model``."""
    for holder in (doc, doc.get("response"), doc.get("message")):
        if isinstance(holder, dict):
            model = holder.get("model")
            if isinstance(model, str) and 0 < len(model) <= MODEL_CHARS:
                return model
    return None


def _error_object(doc: dict[str, Any], *, named_error: bool) -> dict[str, Any] | None:
    error = doc.get("error")
    if isinstance(error, dict):  # OpenRouter's envelope; Anthropic's error event
        return error
    if named_error or doc.get("type") == "error":  # Responses: the event is the error
        return doc
    response = doc.get("response")  # Responses: response.failed
    error = response.get("error") if isinstance(response, dict) else None
    return error if isinstance(error, dict) else None


def _in_band(error: dict[str, Any], *, before_content: bool) -> InBandError:
    code = error.get("code")
    if type(code) is not int or not 100 <= code <= 999:
        kind = error.get("type")
        code = ANTHROPIC_ERROR_CODES.get(kind) if isinstance(kind, str) else None
    message = error.get("message")
    try:
        envelope: bytes | None = json.dumps({"error": error}, separators=(",", ":")).encode()
    except (ValueError, RecursionError):
        envelope = None
    if envelope is not None and len(envelope) > ENVELOPE_BYTES:
        envelope = None
    return InBandError(code, message[:MESSAGE_CHARS] if isinstance(message, str) else "",
                       envelope, before_content)


# --- JSON bodies --------------------------------------------------------------------------------


def _scan_json(head_bytes: bytes, tail_bytes: bytes | None) -> BodySummary:
    head = _text(head_bytes)
    tail = None if tail_bytes is None else _text(tail_bytes)
    if tail is None:  # the whole body
        doc = _loads(head)
        if isinstance(doc, dict):
            raw = _raw_usage(doc.get("usage"))
            error = _error_object(doc, named_error=False)
            return BodySummary(None if raw is None else _build_usage(raw), _model_of(doc),
                               None if error is None else _in_band(error, before_content=True))
    # Too large for the window, or not JSON: members near the start, usage near the end.
    found = _leading_members(head)
    model = found.get("model")
    error = found.get("error")
    raw = _usage_near_end(head if tail is None else tail, cut_start=tail is not None)
    if raw is None:
        raw = _raw_usage(found.get("usage"))
    return BodySummary(
        None if raw is None else _build_usage(raw),
        model if isinstance(model, str) and 0 < len(model) <= MODEL_CHARS else None,
        _in_band(error, before_content=True) if isinstance(error, dict) else None)


def _leading_members(text: str) -> dict[str, Any]:
    """The members of the top-level object that lie wholly in ``text``, read one by one up
    to the first that the cut (or bad JSON) leaves unreadable. OpenRouter puts ``model``
    and ``error`` before the long ``choices`` / ``output`` / ``content``."""
    found: dict[str, Any] = {}
    match = _OBJECT_START.match(text)
    pos = match.end() if match is not None else len(text)
    while text.startswith('"', pos):
        try:
            key, pos = _DECODER.raw_decode(text, pos)
            colon = _KEY_COLON.match(text, pos)
            if colon is None:
                break
            value, pos = _DECODER.raw_decode(text, colon.end())
        except (ValueError, RecursionError):
            break
        found.setdefault(key, value)
        comma = _NEXT_MEMBER.match(text, pos)
        if comma is None:
            break
        pos = comma.end()
    return found


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # an upstream's odd bytes never break the relay
        return None


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")  # as an SSE client decodes; JSON is UTF-8 too


def _no_bom(data: bytes) -> bytes:
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


# --- SSE streams --------------------------------------------------------------------------------


def _blocks(text: bytes) -> list[bytes]:
    """``text`` split at blank lines: each piece holds one event's lines (or only comments),
    and the last one is what follows the last blank line, not (yet) dispatched. CRLF and a
    bare CR become LF first, so a CRLF cut in two reads as one line end either way."""
    if b"\r" in text:  # a one-byte search is cheap; the two-byte replace is not
        text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return text.split(b"\n\n")


def _fields(block: bytes) -> tuple[bytes, bytes | None]:
    """(event type, data) of one block; data None when it has no data line (no event)."""
    event_type = b""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        # A comment (": OPENROUTER PROCESSING") has the empty name; an empty line
        # dispatches an empty buffer, which is nothing.
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event_type = value
    return event_type, b"\n".join(data) if data else None


def _fragment_data(block: bytes) -> tuple[bytes, bool]:
    """The data of an event cut at its start: the first line is a part of unknown kind,
    taken as data. Also whether the block holds a whole data line."""
    first, _, others = block.partition(b"\n")
    _, data = _fields(others)
    return first if data is None else first + b"\n" + data, data is not None


def _has_data(block: bytes) -> bool:
    return any(line.partition(b":")[0] == b"data" for line in block.split(b"\n"))


def _scan_sse(head: bytes, tail: bytes | None) -> BodySummary:
    state = _StreamState()
    blocks = _blocks(head)
    rest = blocks.pop()
    state.events(blocks)
    tail_blocks: list[bytes] = []
    if tail is not None:
        state.content_seen |= _has_data(rest)  # an event the window cuts; sent in full
        tail_blocks = _blocks(tail)
        tail_blocks.pop()
        if tail_blocks:  # the first one started before the cut: perhaps a huge last event
            fragment, has_data = _fragment_data(tail_blocks.pop(0))
            state.content_seen |= has_data
            if b'"usage"' in fragment:
                state.add_usage(_usage_near_end(_text(fragment), cut_start=True))
        state.events(tail_blocks)
    if state.model is None:  # no usage or error event named it
        state.model = _first_model(blocks + tail_blocks)
    usage = None if state.usage is None else _build_usage(state.usage)
    return BodySummary(usage, state.model, state.error)


def _one_usage_event(end: bytes, start: bytes, *, whole: bool) -> BodySummary | None:
    """The common stream, read from its end alone: its last event with a ``usage`` key
    holds usage and a model, no ``"error"`` is near it, the line ends are LF and it is not
    Anthropic's (whose usage merges two events). ``end``: the body's last bytes (``whole``:
    all of it); ``start``: its first bytes. An in-band error ends a stream (OpenRouter
    sends nothing after it but ``[DONE]``), so it would lie in the usage event, the two
    events before it or after it. None when the stream is not that simple: the full
    reading then decides. Paid once per stream; scanning the whole of a long stream for a
    few words cost more than relaying it."""
    if whole and end.startswith(b"\xef\xbb\xbf"):
        end = end[3:]
    at = end.rfind(b'"usage"')
    if at < 0 or b"\r" in end or b"message_start" in start:
        return None
    begin = end.rfind(b"\n\n", 0, at)
    stop = end.find(b"\n\n", at)
    if stop < 0 or (begin < 0 and not whole):
        return None  # not dispatched, or it began before the end part: the full reading
    near = end.rfind(b"\n\n", 0, begin) if begin > 0 else -1
    near = end.rfind(b"\n\n", 0, near) if near > 0 else -1
    # quoted, "error" is a key or a value, never words in a text (whose quotes are escaped)
    if end.find(b'"error"', near + 1) >= 0:
        return None
    _, data = _fields(end[begin + 2 if begin >= 0 else 0:stop])
    doc = None if data is None else _loads(_text(data))
    if not isinstance(doc, dict):
        return None
    raw = _raw_usage(doc.get("usage")) or _nested_usage(doc)
    model = _model_of(doc)
    if raw is None or model is None:
        return None
    return BodySummary(_build_usage(raw), model, None)


END_BYTES = 8192  # the last events of a stream: its usage event, an error if any
START_BYTES = 2048  # Anthropic's streams start with message_start


def _first_model(blocks: list[bytes]) -> str | None:
    for block in blocks:
        if b'"model"' in block:
            _, data = _fields(block)
            doc = None if data is None else _loads(_text(data))
            if isinstance(doc, dict) and (model := _model_of(doc)) is not None:
                return model
    return None


class _StreamState:
    """What the events of a stream have said so far."""

    __slots__ = ("content_seen", "error", "model", "usage")

    def __init__(self) -> None:
        self.model: str | None = None
        self.usage: _RawUsage | None = None
        self.error: InBandError | None = None
        self.content_seen = False

    def add_usage(self, raw: _RawUsage | None) -> None:
        if raw is not None:
            if self.usage is None:
                self.usage = raw
            else:
                _merge(self.usage, raw)

    def events(self, blocks: list[bytes]) -> None:
        for block in blocks:
            # Read only the blocks that can tell something: most deltas cannot. The model
            # comes from the first event parsed; chat's usage event names it too.
            maybe_error = self.error is None and b"error" in block
            maybe_usage = b'"usage"' in block
            if not (maybe_error or maybe_usage or not self.content_seen):
                continue
            event_type, data = _fields(block)
            if data is None or data.strip() == b"[DONE]":
                continue
            named_error = event_type == b"error"
            doc = _loads(_text(data)) if maybe_error or maybe_usage else None
            if not isinstance(doc, dict):
                self.content_seen |= not named_error
                continue
            if self.model is None:
                self.model = _model_of(doc)
            if maybe_usage:
                self.add_usage(_raw_usage(doc.get("usage")) or _nested_usage(doc))
            error = _error_object(doc, named_error=named_error) if maybe_error else None
            if error is not None:
                self.error = _in_band(error, before_content=not self.content_seen)
            elif not (named_error or doc.get("type") == "error"):
                self.content_seen = True


def _nested_usage(doc: dict[str, Any]) -> _RawUsage | None:
    """Responses: ``response.usage``; Anthropic ``message_start``: ``message.usage``."""
    for holder in (doc.get("response"), doc.get("message")):
        if isinstance(holder, dict):
            raw = _raw_usage(holder.get("usage"))
            if raw is not None:
                return raw
    return None
