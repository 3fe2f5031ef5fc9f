"""Keep a conversation on the key it started on.

OpenRouter keeps a conversation on one provider per account, model and conversation (named
by `session_id`, `x-session-id` or `prompt_cache_key`) for 10 minutes idle, and its response
cache is per API key (OPENROUTER.md "Stickiness"): sending each turn through the same key
keeps the provider's prompt cache warm. This module names a conversation from a request and
remembers which key id served it.

Pure: no I/O, no await; the clock is injected. It reads the request body and never changes
it. It knows nothing of keys beyond their short id, nor of HTTP beyond a header list.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Bodies up to this size are parsed whole: json.loads is exact and, at ~1 ms per MB, cheap.
# Larger ones (a request may carry 32 MiB) are scanned instead: one regex pass finds the
# field names we want followed by a colon, and only their values are decoded (raw_decode),
# `messages` / `input` only up to their first user message. The scan is ~3x cheaper than a
# full parse and allocates nothing for the skipped bulk, but it does not track nesting: a
# same-named key deeper in the body (say a tool schema property) is taken if its value has
# the expected type and it comes first. That can only change which key a conversation sticks
# to, never the request, and it is the same on every turn of a conversation.
FULL_PARSE_BYTES = 1 << 20
MAX_REJECTED = 1000  # scan candidates without a usable value before giving up (hostile bodies)
ID_HEX_CHARS = 32  # 128 bits of sha256: ids stay short and bounded whatever the client sends
# Strings longer than this are hashed as their head and length: a base64 image of megabytes
# costs no more to name than its first 64 KiB.
LONG_STRING_CHARS = 64 * 1024

SESSION_HEADER = b"x-session-id"
SYSTEM_ROLES = frozenset({"system", "developer"})
# field → the first characters of the values we accept for it when scanning
_SCANNED = {"session_id": '"', "prompt_cache_key": '"', "model": '"', "instructions": '"',
            "system": '"[', "messages": "[", "input": '"[', "models": "["}
_LIST_FIELDS = frozenset({"messages", "input"})
# Per-part markers that move from turn to turn (Anthropic-style caching marks the latest
# messages): not part of what the conversation said.
_VOLATILE_PART_KEYS = frozenset({"cache_control"})

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class _Malformed(Exception):
    """A scanned value is not the JSON we can read."""


def conversation_id(
    headers: Sequence[tuple[bytes, bytes]], body: bytes, *, full_parse_bytes: int = FULL_PARSE_BYTES
) -> str | None:
    """`session:`, `cache:` or `content:` and 32 hex; None if the body names no conversation.

    In order: the body's top-level `session_id`, the `x-session-id` header, the body's
    `prompt_cache_key`, else a hash of the model, the system prompt and the first user
    message. The system prompt is Anthropic's top-level `system`, the Responses API's
    `instructions`, or the first system/developer message before the first user message
    (a later developer message would otherwise rename a conversation in mid-course).
    """
    return conversation_of(headers, request_fields(body, full_parse_bytes=full_parse_bytes))


def conversation_of(headers: Sequence[tuple[bytes, bytes]], fields: dict[str, Any],
                    ) -> str | None:
    """``conversation_id`` from fields already read (``request_fields``)."""
    session = fields.get("session_id")
    if isinstance(session, str) and session:
        return _named("session", session.encode("utf-8", "surrogatepass"))
    for name, value in headers:
        if name.lower() == SESSION_HEADER and value.strip():
            return _named("session", value.strip())
    cache_key = fields.get("prompt_cache_key")
    if isinstance(cache_key, str) and cache_key:
        return _named("cache", cache_key.encode("utf-8", "surrogatepass"))
    try:
        return _content_id(fields)
    except RecursionError:  # content nested deeper than Python recursion
        return None


def _named(kind: str, value: bytes) -> str:
    return f"{kind}:{hashlib.sha256(value).hexdigest()[:ID_HEX_CHARS]}"


def _content_id(fields: dict[str, Any]) -> str | None:
    system, user = _system_and_user(fields)
    if system is None and user is None:
        return None
    model = fields.get("model")
    canonical = json.dumps([model if isinstance(model, str) else None,
                            _canonical(system, part=False), _canonical(user, part=False)],
                           sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return _named("content", canonical.encode("ascii"))


def _system_and_user(fields: dict[str, Any]) -> tuple[Any, Any]:
    system = fields.get("system")
    if system is None:
        system = fields.get("instructions")
    items = fields.get("messages")
    if not isinstance(items, list):
        items = fields.get("input")
    if isinstance(items, str):  # Responses API: the input is the user's text
        return system, items
    user = None
    for item in items if isinstance(items, list) else ():
        role = item.get("role") if isinstance(item, dict) else None
        if role == "user":
            user = item.get("content")
            break
        if role in SYSTEM_ROLES and system is None:
            system = item.get("content")
    return system, user


def _canonical(value: Any, *, part: bool) -> Any:
    """What a message said: volatile part markers dropped, long strings cut to head+length."""
    if isinstance(value, str):
        if len(value) <= LONG_STRING_CHARS:
            return value
        return f"{value[:LONG_STRING_CHARS]}\u2026({len(value)} chars)"
    if isinstance(value, list):
        return [_canonical(item, part=True) for item in value]
    if isinstance(value, dict):
        return {k: _canonical(v, part=False) for k, v in value.items()
                if not (part and k in _VOLATILE_PART_KEYS)}
    return value


# --- reading the fields -------------------------------------------------------------------


def request_fields(body: bytes, *, full_parse_bytes: int = FULL_PARSE_BYTES) -> dict[str, Any]:
    """The fields we name conversations by; {} when the body is not a JSON object.
    Scanned `messages` / `input` lists stop at their first user message."""
    try:
        if len(body) <= full_parse_bytes:
            doc = json.loads(body)
            return doc if isinstance(doc, dict) else {}
        text = body.decode(json.detect_encoding(body))
    except (ValueError, RecursionError):  # JSON and Unicode errors alike
        return {}
    first = _ws(text, 0)
    return _scan(text) if text[first:first + 1] == "{" else {}


@functools.cache  # at most 2**7 subsets of the field names
def _pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    """`"name"` then a colon, for the names still wanted (a field found is no longer sought)."""
    return re.compile(r'"(' + "|".join(names) + r')"[ \t\n\r]*:[ \t\n\r]*')


def _scan(text: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    wanted = sorted(_SCANNED)
    pos, rejected = 0, 0
    while wanted and rejected < MAX_REJECTED:
        match = _pattern(tuple(wanted)).search(text, pos)
        if match is None:
            break
        name, pos = match.group(1), match.end()
        found = _value_at(text, pos, name)
        if found is None:
            rejected += 1
            continue
        # go on after what was decoded: keys inside a value found are not the request's
        fields[name], pos = found
        wanted.remove(name)
        if name == "messages" and "input" in wanted:  # messages win over input anyway
            wanted.remove("input")
    return fields


def _value_at(text: str, i: int, name: str) -> tuple[Any, int] | None:
    """The value at `i` and where its decoding stopped, if it has the field's type."""
    if i >= len(text) or text[i] not in _SCANNED[name]:
        return None
    try:
        if name in _LIST_FIELDS and text[i] == "[":
            return _list_head(text, i)
        value, end = _DECODER.raw_decode(text, i)
    except (ValueError, RecursionError, IndexError, _Malformed):
        return None
    return value, end


def _list_head(text: str, start: int) -> tuple[list[Any], int]:
    """The items of the array at `start` up to and including its first user message, and
    where they end."""
    items: list[Any] = []
    i = _ws(text, start + 1)
    if text[i] == "]":
        return items, i + 1
    while True:
        item, i = _DECODER.raw_decode(text, i)
        items.append(item)
        if isinstance(item, dict) and item.get("role") == "user":
            return items, i
        i = _ws(text, i)
        if text[i] == "]":
            return items, i + 1
        if text[i] != ",":
            raise _Malformed
        i = _ws(text, i + 1)


def _ws(text: str, i: int) -> int:
    match = _WS.match(text, i)
    assert match is not None  # `*` always matches
    return match.end()


# --- the map ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    key_id: str
    used: float  # the clock when last put or hit


class StickyMap:
    """conversation → key id. LRU with a capacity and a sliding idle TTL (OpenRouter's own
    stickiness lasts 10 minutes idle, so ours does too by default).

    `evictions` counts entries dropped for idleness or capacity, not those forgotten.
    """

    def __init__(
        self,
        *,
        ttl_seconds: float = 600.0,
        capacity: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl_seconds > 0:
            raise ValueError("ttl_seconds must be positive")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.ttl_seconds = ttl_seconds
        self.capacity = capacity
        self.clock = clock
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        # least recently used first: the idle and the overflow are both at the front
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"<StickyMap {len(self._entries)}/{self.capacity} hits={self.hits} "
                f"misses={self.misses} evictions={self.evictions}>")

    def get(self, conversation: str) -> str | None:
        """The key id this conversation last used; a hit slides its idle TTL."""
        entry = self._entries.get(conversation)
        if entry is None:
            self.misses += 1
            return None
        now = self.clock()
        if now - entry.used >= self.ttl_seconds:
            del self._entries[conversation]
            self.evictions += 1
            self.misses += 1
            return None
        entry.used = now
        self._entries.move_to_end(conversation)
        self.hits += 1
        return entry.key_id

    def put(self, conversation: str, key_id: str) -> None:
        now = self.clock()
        entry = self._entries.get(conversation)
        if entry is None:
            self._entries[conversation] = _Entry(key_id, now)
        else:
            entry.key_id, entry.used = key_id, now
            self._entries.move_to_end(conversation)
        self._trim(now)

    def forget_key(self, key_id: str) -> None:
        """Drop every conversation on this key (it was disabled). O(n), and rare."""
        for conversation in [c for c, e in self._entries.items() if e.key_id == key_id]:
            del self._entries[conversation]

    def _trim(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest = next(iter(entries.values()))
            if len(entries) <= self.capacity and now - oldest.used < self.ttl_seconds:
                return
            entries.popitem(last=False)
            self.evictions += 1
