"""Durable key state as plain records, their JSON form, and the store interface.

Owns ``KeyRecord`` / ``Snapshot`` (validated on construction, so an invalid record cannot
be built, saved or loaded), the versioned JSON encoding, the ``StateStore`` protocol every
backend implements, and ``MemoryStore``. Pure: no I/O, no clock. It must not know the key
pool (which exports and imports these records) nor where or how a backend keeps them.
Records carry a key's short id, never the key: any text that contains ``sk-or-`` is refused.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

FORMAT = "orproxy-key-state"
# The major version. Adding a field does not bump it (readers ignore unknown fields);
# changing or removing one does, and a reader refuses a version newer than its own.
VERSION = 1

SCOPES = ("all", "free")
MAX_REASON_CHARS = 200
MAX_MESSAGE_CHARS = 300
MAX_WRITER_CHARS = 200
MAX_COUNTERS = 64
MAX_KEYS = 100_000
MAX_FILE_BYTES = 16 * 1024 * 1024
# Epoch seconds beyond this (year 2286) are a corrupt number, not a date.
MAX_EPOCH = 1e10

_ID = re.compile(r"[0-9a-f]{8}")
_COUNTER = re.compile(r"[a-z][a-z0-9_]{0,39}")
_SECRET = re.compile(r"sk-or-\S*", re.IGNORECASE)
_RECORD_FIELDS = ("id", "rest_until", "rest_scope", "disabled", "reason", "message",
                  "counters", "updated")


class StateFormatError(Exception):
    """The content as a whole is unusable (not JSON, wrong shape, unknown version)."""


def clean_text(text: str, limit: int) -> str:
    """Make free text (an upstream message, a reason) acceptable to a record.

    Anything that looks like a key becomes ``[key]``, characters that are not printable
    (controls, line breaks, bidi overrides, lone surrogates) become spaces so the text
    cannot split or disguise a log line, and it is cut to ``limit`` characters.
    """
    text = _SECRET.sub("[key]", text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    return text[:limit]


# --- field checks: they name the field and the rule, never the value (it may be a secret) ---


def _text(name: str, value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    if len(value) > limit:
        raise ValueError(f"{name} is longer than {limit} characters")
    if not value.isprintable():
        raise ValueError(f"{name} has characters that are not printable")
    if "sk-or-" in value.lower():
        raise ValueError(f"{name} looks like it holds a key")
    return value


def _number(name: str, value: object, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{name} is out of range") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite")
    if not 0.0 <= number <= high:
        raise ValueError(f"{name} is out of range")
    return number


def _counters(value: object) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        raise ValueError("counters must be an object")
    if len(value) > MAX_COUNTERS:
        raise ValueError(f"counters has more than {MAX_COUNTERS} entries")
    out: dict[str, float] = {}
    for name, count in value.items():
        if not isinstance(name, str) or not _COUNTER.fullmatch(name):
            raise ValueError("a counter name is not [a-z][a-z0-9_]{0,39}")
        out[name] = _number(f"counter {name}", count, math.inf)
    return MappingProxyType(out)


@dataclass(frozen=True)
class KeyRecord:
    """One key's durable state. Raises ValueError (naming the field) if any field is bad."""

    id: str  # the key's short id (8 lowercase hex of sha256), never the key itself
    rest_until: float  # wall-clock epoch seconds the rest ends; 0.0 = not resting
    rest_scope: str  # "all", or "free": the rest applies to free models only
    disabled: bool
    reason: str  # ours, e.g. "429 free-models-per-day"
    message: str  # OpenRouter's words; pass it through clean_text(…, MAX_MESSAGE_CHARS)
    counters: Mapping[str, float]  # lifetime: requests, successes, rate_limited, … cost
    updated: float  # wall-clock epoch seconds of the last change

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID.fullmatch(self.id):
            raise ValueError("id is not 8 lowercase hex digits")
        set_ = object.__setattr__  # frozen: normalise in place once, here
        set_(self, "rest_until", _number("rest_until", self.rest_until, MAX_EPOCH))
        if self.rest_scope not in SCOPES:
            raise ValueError(f"rest_scope must be one of {', '.join(SCOPES)}")
        if not isinstance(self.disabled, bool):
            raise ValueError("disabled must be true or false")
        _text("reason", self.reason, MAX_REASON_CHARS)
        _text("message", self.message, MAX_MESSAGE_CHARS)
        set_(self, "counters", _counters(self.counters))
        set_(self, "updated", _number("updated", self.updated, MAX_EPOCH))


@dataclass(frozen=True)
class Snapshot:
    """Every key's durable state at one moment."""

    keys: Mapping[str, KeyRecord] = field(default_factory=dict)  # by id
    saved_at: float = 0.0  # wall-clock epoch seconds; 0.0 = never saved
    writer: str = ""  # who wrote it (host:pid), informational

    def __post_init__(self) -> None:
        keys = dict(self.keys)
        if len(keys) > MAX_KEYS:
            raise ValueError(f"more than {MAX_KEYS} keys")
        for id_, record in keys.items():
            if not isinstance(record, KeyRecord) or record.id != id_:
                raise ValueError("keys must map each record's id to the record")
        object.__setattr__(self, "keys", MappingProxyType(keys))
        object.__setattr__(self, "saved_at", _number("saved_at", self.saved_at, MAX_EPOCH))
        _text("writer", self.writer, MAX_WRITER_CHARS)


class StateStore(Protocol):
    """Where snapshots live. ``save`` may block (it runs in a worker thread)."""

    def load(self) -> Snapshot:
        """The stored snapshot; an empty one if there is none or it is unusable. Never raises
        on bad content."""
        ...

    def save(self, snapshot: Snapshot) -> None:
        """Store ``snapshot`` durably, replacing the previous one whole."""
        ...

    def poll(self) -> Snapshot | None:
        """A snapshot written by someone else since our last load/save, else None."""
        ...


class MemoryStore:
    """A StateStore in memory: for tests, and when persistence is off. One writer only, so
    ``poll`` never has news."""

    def __init__(self, initial: Snapshot | None = None) -> None:
        self._lock = threading.Lock()  # save runs in a worker thread
        self._snapshot = initial if initial is not None else Snapshot()

    def load(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def save(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    def poll(self) -> Snapshot | None:
        return None


# --- JSON ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dropped:
    """A record left out while decoding, and why (the why never quotes the content)."""

    index: int
    id: str | None  # None when the id itself was unusable
    reason: str

    def __str__(self) -> str:
        return f"record {self.index}{f' ({self.id})' if self.id else ''}: {self.reason}"


@dataclass(frozen=True)
class Decoded:
    snapshot: Snapshot
    dropped: tuple[Dropped, ...]


def _record_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id, "rest_until": record.rest_until, "rest_scope": record.rest_scope,
        "disabled": record.disabled, "reason": record.reason, "message": record.message,
        "counters": dict(record.counters), "updated": record.updated,
    }


def encode(snapshot: Snapshot) -> bytes:
    """The file's bytes: a header, then one record per line (readable, grep-able)."""
    dump = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
    head = dump({"format": FORMAT, "version": VERSION, "saved_at": snapshot.saved_at,
                 "writer": snapshot.writer})
    records = ",\n".join(dump(_record_json(snapshot.keys[i])) for i in sorted(snapshot.keys))
    return f'{head[:-1]},"keys":[\n{records}\n]}}\n'.encode()


def decode(data: bytes) -> Decoded:
    """Parse and validate; bad records are dropped with a reason, bad files raise
    StateFormatError."""
    doc = _parse(data)
    try:
        saved_at, writer = doc["saved_at"], doc["writer"]
        Snapshot(saved_at=saved_at, writer=writer)  # validates the header fields
    except (KeyError, ValueError) as exc:
        raise StateFormatError(f"bad header: {_why(exc)}") from None
    items = doc.get("keys")
    if not isinstance(items, list):
        raise StateFormatError("keys is not a list")
    if len(items) > MAX_KEYS:
        raise StateFormatError(f"more than {MAX_KEYS} keys")
    keys: dict[str, KeyRecord] = {}
    dropped: list[Dropped] = []
    for index, item in enumerate(items):
        try:
            record = _record(item)
        except ValueError as exc:
            dropped.append(Dropped(index, _safe_id(item), str(exc)))
            continue
        if record.id in keys:
            dropped.append(Dropped(index, record.id, "duplicate id"))
            continue
        keys[record.id] = record
    return Decoded(Snapshot(keys, saved_at, writer), tuple(dropped))


def _parse(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_FILE_BYTES:
        raise StateFormatError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise StateFormatError("not UTF-8") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nesting
        raise StateFormatError(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise StateFormatError(f"the top level is a JSON {_json_type(doc)}, not an object")
    if doc.get("format") != FORMAT:
        raise StateFormatError("not an orproxy key state file (format field)")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StateFormatError("no valid format version")
    if version > VERSION:
        raise StateFormatError(f"format version {version} is newer than {VERSION}")
    return doc


def _record(item: object) -> KeyRecord:
    if not isinstance(item, dict):
        raise ValueError(f"a JSON {_json_type(item)}, not an object")
    missing = [name for name in _RECORD_FIELDS if name not in item]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return KeyRecord(**{name: item[name] for name in _RECORD_FIELDS})


def _safe_id(item: object) -> str | None:
    """The record's id, only if it is a well-formed one (so it cannot be a key)."""
    id_ = item.get("id") if isinstance(item, dict) else None
    return id_ if isinstance(id_, str) and _ID.fullmatch(id_) else None


def _why(exc: Exception) -> str:
    return f"missing {exc.args[0]}" if isinstance(exc, KeyError) else str(exc)


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
