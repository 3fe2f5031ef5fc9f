"""What an upstream answer means for the key that carried it.

Pure: (status, headers, the first bytes of an error body, the wall clock) → Verdict. The
facts behind the rules are in OPENROUTER.md: a 429 is either the key's (or its account's)
quota, with a reset time in epoch milliseconds, or the upstream's own overload, which is no
key's fault; 401 means the key is invalid, 402 that it has no credit.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

# Statuses whose body must be read before deciding whether the client sees them.
STATUSES_TO_CLASSIFY = frozenset({401, 402, 429})

OVERLOAD_MARKERS = ("temporarily rate-limited upstream", "resource_exhausted")
OVERLOAD_SOURCES = frozenset({"openrouter_shared_capacity", "upstream_provider_shared_pool"})
ACCOUNT_MARKERS = ("free-models-per-day",)
ACCOUNT_SOURCES = frozenset({"openrouter_free_tier_daily"})
MESSAGE_CHARS = 300
MAX_COOLDOWN_SECONDS = 31 * 86400.0


class Outcome(enum.Enum):
    OK = "ok"  # deliver; the key is fine
    KEY_LIMITED = "key_limited"  # the key's (or account's) quota: rest it, try another
    OVERLOADED = "overloaded"  # the upstream's capacity: nobody's key rests
    KEY_INVALID = "key_invalid"  # 401: out of rotation until restart
    NO_CREDIT = "no_credit"  # 402: a long rest


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    cooldown_seconds: float | None = None  # reported reset, seconds from now; None: use default
    account_wide: bool = False
    reason: str = ""
    # the upstream's own words, for the client if no key is left; informs, decides nothing
    message: str = field(default="", compare=False)

    @property
    def retry(self) -> bool:
        return self.outcome is not Outcome.OK


OK = Verdict(Outcome.OK)


def classify(
    status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes, wall_now: float
) -> Verdict:
    if status not in STATUSES_TO_CLASSIFY:
        return OK
    if status == 401:
        return Verdict(Outcome.KEY_INVALID, reason="401 invalid key")
    if status == 402:
        return Verdict(Outcome.NO_CREDIT, reason="402 insufficient credit")
    error = _error_object(body)
    metadata = error.get("metadata") if isinstance(error.get("metadata"), dict) else {}
    assert isinstance(metadata, dict)
    if _is_overload(error, metadata):
        return Verdict(Outcome.OVERLOADED, reason="429 upstream overloaded")
    header_map = {name.lower(): value for name, value in headers}
    meta_headers = metadata.get("headers")
    reset = None
    if isinstance(meta_headers, dict):
        reset = _reset_seconds(_get_ci(meta_headers, "x-ratelimit-reset"), wall_now)
    if reset is None:
        reset = _reset_seconds(_decode(header_map.get(b"x-ratelimit-reset")), wall_now)
    if reset is None:
        reset = retry_after_seconds(header_map.get(b"retry-after"), wall_now)
    message = str(error.get("message", ""))[:MESSAGE_CHARS]
    lower = message.lower()
    account_wide = any(m in lower for m in ACCOUNT_MARKERS) or (
        metadata.get("limit_source") in ACCOUNT_SOURCES
    )
    return Verdict(Outcome.KEY_LIMITED, reset, account_wide, "429 rate limited", message)


def _error_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # an upstream's odd bytes never break the proxy
        return {}
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, dict) else {}


def _is_overload(error: dict[str, Any], metadata: dict[str, Any]) -> bool:
    raw = metadata.get("raw")
    text = (json.dumps(raw) if not isinstance(raw, str) else raw).lower() if raw else ""
    text += " " + str(error.get("message", "")).lower()
    if any(marker in text for marker in OVERLOAD_MARKERS):
        return True
    if metadata.get("limit_source") in OVERLOAD_SOURCES:
        return True
    availability = error.get("availability")
    return isinstance(availability, dict) and availability.get("code") == "capacity_exhausted"


def _get_ci(mapping: dict[str, Any], name: str) -> Any:
    for key, value in mapping.items():
        if isinstance(key, str) and key.lower() == name:
            return value
    return None


def _decode(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def _reset_seconds(value: Any, wall_now: float) -> float | None:
    """A reset given as epoch milliseconds (OpenRouter), epoch seconds, or seconds from now."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if number != number or number < 0:
        return None
    if number > 1e11:
        seconds = number / 1000.0 - wall_now
    elif number > 1e9:
        seconds = number - wall_now
    else:
        seconds = number
    return min(max(seconds, 1.0), MAX_COOLDOWN_SECONDS)


def retry_after_seconds(value: bytes | None, wall_now: float) -> float | None:
    """``Retry-After``: delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isascii() and text.isdigit():
        return min(max(float(text), 1.0), MAX_COOLDOWN_SECONDS)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime dates carry no zone; HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return min(max(when.timestamp() - wall_now, 1.0), MAX_COOLDOWN_SECONDS)

