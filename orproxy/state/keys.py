"""The key pool's saved state as store records, and back.

Pure translation between ``keys.SavedKey`` (what the pool exports and restores) and
``store.KeyRecord`` (what a backend keeps): counters by name, errors by kind as
``err_<kind>``, text cleaned of anything key-like. Never sees a key, only ids.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from orproxy.keys import COUNTERS, KeyStats, SavedKey
from orproxy.state.store import (
    MAX_COUNTERS,
    MAX_MESSAGE_CHARS,
    MAX_REASON_CHARS,
    KeyRecord,
    Snapshot,
    clean_text,
)

ERROR_PREFIX = "err_"
_KIND = re.compile(r"[a-z0-9_]{1,35}")
MAX_ERROR_KINDS = MAX_COUNTERS - len(COUNTERS) - 1


def to_records(saved: Iterable[SavedKey], wall_now: float) -> dict[str, KeyRecord]:
    records = {}
    for key in saved:
        counters: dict[str, float] = {name: float(getattr(key.stats, name)) for name in COUNTERS}
        kinds = sorted(key.stats.errors_by_kind.items(), key=lambda item: -item[1])
        for kind, count in kinds[:MAX_ERROR_KINDS]:
            if _KIND.fullmatch(kind):
                counters[ERROR_PREFIX + kind] = float(count)
        if key.stats.last_error_at:
            counters["last_error_at"] = key.stats.last_error_at
        records[key.id] = KeyRecord(
            id=key.id, rest_until=key.rest_until, rest_scope="free" if key.free_only else "all",
            disabled=key.disabled, reason=clean_text(key.reason, MAX_REASON_CHARS),
            message=clean_text(key.message, MAX_MESSAGE_CHARS), counters=counters,
            updated=key.disabled_at if key.disabled else wall_now)
    return records


def from_snapshot(snapshot: Snapshot) -> list[SavedKey]:
    out = []
    for record in snapshot.keys.values():
        counters = record.counters
        stats = KeyStats()
        for name in COUNTERS:
            value = counters.get(name, 0.0)
            setattr(stats, name, value if name == "cost" else int(value))
        stats.errors_by_kind = {name[len(ERROR_PREFIX):]: int(count)
                                for name, count in counters.items()
                                if name.startswith(ERROR_PREFIX)}
        stats.last_error_at = counters.get("last_error_at", 0.0)
        out.append(SavedKey(record.id, record.rest_until, record.rest_scope == "free",
                            record.disabled, record.updated, record.reason, record.message,
                            stats))
    return out

