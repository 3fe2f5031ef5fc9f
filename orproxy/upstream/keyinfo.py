"""What OpenRouter says about one key: ``GET /api/v1/key``, read into plain values.

Pure: bytes in, KeyInfo out; odd or missing fields become None, never an exception. The
facts (OPENROUTER.md): ``data.label``, ``limit`` (null = none), ``limit_remaining``,
``limit_reset`` (daily/weekly/monthly, UTC midnight), ``usage``, ``usage_daily``,
``is_free_tier``, ``expires_at`` (ISO 8601), ``free_model_daily_requests {used, limit,
remaining}`` (UTC day) and ``creator_user_id`` (the account: keys of one account share it).
Asking costs no quota.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

MAX_TEXT = 120


@dataclass(frozen=True)
class KeyInfo:
    label: str | None = None
    account: str | None = None  # creator_user_id
    limit: float | None = None  # USD; None: no limit
    limit_remaining: float | None = None
    limit_reset: str | None = None  # "daily", "weekly", "monthly" or None
    usage: float | None = None  # USD, all time
    usage_daily: float | None = None
    is_free_tier: bool | None = None
    expires_at: float | None = None  # Unix time
    free_requests_limit: int | None = None  # free-model requests a day
    free_requests_remaining: int | None = None

    def exhausted(self) -> bool:
        """The key's own spending limit is used up."""
        return self.limit is not None and self.limit_remaining is not None and (
            self.limit_remaining <= 0)

    def free_exhausted(self) -> bool:
        """No free-model requests are left today (for its whole account)."""
        return self.free_requests_remaining is not None and self.free_requests_remaining <= 0

    def expired(self, wall_now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= wall_now


def parse_key_info(body: bytes) -> KeyInfo | None:
    """The ``data`` of a /key answer, or None if the body is not one."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        return None
    free = data.get("free_model_daily_requests")
    free = free if isinstance(free, dict) else {}
    return KeyInfo(
        label=_text(data.get("label")),
        account=_text(data.get("creator_user_id")),
        limit=_number(data.get("limit")),
        limit_remaining=_number(data.get("limit_remaining")),
        limit_reset=_text(data.get("limit_reset")),
        usage=_number(data.get("usage")),
        usage_daily=_number(data.get("usage_daily")),
        is_free_tier=data.get("is_free_tier") if isinstance(data.get("is_free_tier"),
                                                            bool) else None,
        expires_at=_time(data.get("expires_at")),
        free_requests_limit=_count(free.get("limit")),
        free_requests_remaining=_count(free.get("remaining")),
    )


def _text(value: Any) -> str | None:
    if isinstance(value, str | int) and not isinstance(value, bool):
        text = str(value)
        return "".join(c if c.isprintable() else " " for c in text)[:MAX_TEXT] or None
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _count(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number >= 0 else None


def _time(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None
