"""What an upstream answer means for the key that carried it.

Pure: (status, headers, the first bytes of an error body, the wall clock) → Verdict. No I/O,
no await; the wall clock is passed in because OpenRouter states resets as epoch times. The
same function reads an in-band error (a 200 JSON body or an SSE event carrying ``error``):
the caller passes ``status = error.code`` and ``body = {"error": …}``.

The rules are one table, ``RULES``, tried in order; the first whose test matches decides.
Each row cites the OPENROUTER.md fact it rests on. This module knows OpenRouter's error
shapes; it knows nothing of keys, pools or sockets (the caller turns a Verdict into a rest,
a disable or a retry).
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

# Statuses whose body must be read before deciding whether the client sees them: the
# key's own (401/402/403/429), and those an `error.availability` may ride on (a model gone
# for free keys). 2xx never: a success is never held back; in-band errors are found later.
STATUSES_TO_CLASSIFY = frozenset({400, 401, 402, 403, 404, 410, 429, 502, 503})

MESSAGE_CHARS = 300
REASON_NAME_CHARS = 64
MODEL_CHARS = 200
MIN_SECONDS = 1.0
MAX_SECONDS = 31 * 86400.0
DAY_SECONDS = 86400.0

# OPENROUTER.md "429 origin": a provider's 429 names the provider's raw answer or code.
OVERLOAD_MARKERS = ("temporarily rate-limited upstream", "resource_exhausted")
# OPENROUTER.md "Errors": shared capacity is nobody's quota.
OVERLOAD_SOURCES = frozenset({"openrouter_shared_capacity", "upstream_provider_shared_pool"})
# OPENROUTER.md "error.availability": the model, not the key. Only this one is known to mean
# "gone for free keys"; other codes (capacity_exhausted, …) are availability, i.e. overload.
MODEL_GONE_CODES = frozenset({"free_variant_ended"})
# OPENROUTER.md "Rate limits": free-model limits are per account and cover free models only.
FREE_LIMIT_PREFIXES = ("free-models-per-", "openrouter_free_tier")
# OPENROUTER.md "402 by metadata.limit_source".
IN_FLIGHT_BUDGET = "openrouter_in_flight_budget"
KEY_LIMIT = "openrouter_key_limit"
ACCOUNT_CREDITS = "openrouter_credits"

_LIMIT_NAME = re.compile(r"rate limit exceeded:\s*([A-Za-z0-9_./:@-]+)", re.IGNORECASE)
_FREE_LIMIT_NAME = re.compile(r"free-models-per-[a-z-]+", re.IGNORECASE)
_NEGATIVE_BALANCE = re.compile(r"negative\s+(?:credit\s+|account\s+)?balance", re.IGNORECASE)
_KEY_PROBLEM = re.compile(r"\bkey\b.{0,40}?\b(disabled|expired|revoked)\b", re.IGNORECASE)
_REASON_UNSAFE = re.compile(r"[^A-Za-z0-9_./:@-]")
_NUMBER = re.compile(r"\s*\+?\d+(?:\.\d*)?\s*")


class Outcome(enum.Enum):
    OK = "ok"  # deliver; the key is fine
    KEY_LIMITED = "key_limited"  # the key's (or account's) quota: rest it, try another
    OVERLOADED = "overloaded"  # a provider's capacity: nobody's key rests
    KEY_INVALID = "key_invalid"  # out of rotation until the config changes
    NO_CREDIT = "no_credit"  # 402: a long rest (the key, or its account)
    BUSY = "busy"  # 402 in-flight budget: transient, wait retry_after, no rest
    MODEL_GONE = "model_gone"  # the model is gone for free keys: the client gets the answer


class Scope(enum.Enum):
    KEY = "key"
    ACCOUNT = "account"  # every key sharing the account rests


RETRY_OUTCOMES = frozenset({Outcome.KEY_LIMITED, Outcome.OVERLOADED, Outcome.KEY_INVALID,
                            Outcome.NO_CREDIT, Outcome.BUSY})


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    rest_seconds: float | None = None  # how long the key/account rests; None: caller's default
    scope: Scope = Scope.KEY
    free_only: bool = False  # the rest applies to free-model requests only
    retry_after: float | None = None  # wait this long before the next attempt (no rest)
    reason: str = ""  # short and bounded, for logs and metrics
    # OpenRouter's own words, for the client if no key is left; informs, decides nothing
    message: str = field(default="", compare=False)
    model: str | None = None  # for MODEL_GONE: the model the body names

    @property
    def retry(self) -> bool:
        """Another key may succeed."""
        return self.outcome in RETRY_OUTCOMES


OK = Verdict(Outcome.OK)


@dataclass(frozen=True)
class Signals:
    """What one answer says, read once; the rules only look at this."""

    status: int
    headers: Mapping[bytes, bytes]  # lower-cased names, first value wins
    error: Mapping[str, Any]
    metadata: Mapping[str, Any]
    availability: Mapping[str, Any]
    message: str  # bounded
    limit_source: str
    limit_name: str  # the message's "Rate limit exceeded: <name>", or ""
    wall_now: float

    @property
    def availability_code(self) -> str:
        code = self.availability.get("code")
        return code if isinstance(code, str) else ""

    @property
    def limit_names(self) -> tuple[str, ...]:
        return tuple(name for name in (self.limit_source, self.limit_name) if name)


@dataclass(frozen=True)
class Rule:
    name: str
    test: Callable[[Signals], bool]
    verdict: Callable[[Signals], Verdict]


def classify(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes | Mapping[str, Any],
    wall_now: float,
) -> Verdict:
    """The verdict of the first matching rule; OK when none does. Never raises on odd input."""
    signals = read_signals(status, headers, body, wall_now)
    for rule in RULES:
        if rule.test(signals):
            return rule.verdict(signals)
    return OK


def read_signals(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes | Mapping[str, Any],
    wall_now: float,
) -> Signals:
    error = _mapping(_document(body).get("error"))
    metadata = _mapping(error.get("metadata"))
    availability = _mapping(error.get("availability")) or _mapping(metadata.get("availability"))
    message = error.get("message")
    message = message[: MESSAGE_CHARS * 4] if isinstance(message, str) else ""
    source = metadata.get("limit_source")
    header_map: dict[bytes, bytes] = {}
    for name, value in headers:
        header_map.setdefault(name.lower(), value)
    return Signals(
        status=status, headers=header_map, error=error, metadata=metadata,
        availability=availability, message=message,
        limit_source=_safe_name(source) if isinstance(source, str) else "",
        limit_name=_limit_name(message), wall_now=wall_now,
    )


# --- the tests the rules are made of ---------------------------------------------------------


def _is_provider_429(s: Signals) -> bool:
    """OPENROUTER.md "429 origin": a provider's 429 carries `provider_code` or its `raw` answer;
    shared-capacity sources and `error.availability` speak of capacity, not of a key."""
    raw = s.metadata.get("raw")
    if s.metadata.get("provider_code") is not None or (raw is not None and raw != ""):
        return True
    if s.limit_source in OVERLOAD_SOURCES or s.availability:
        return True
    lower = s.message.lower()
    return any(marker in lower for marker in OVERLOAD_MARKERS)


def _has_ratelimit_headers(s: Signals) -> bool:
    """OPENROUTER.md: only OpenRouter's own limits carry X-RateLimit-*, as headers or in
    `error.metadata.headers`."""
    if any(name.startswith(b"x-ratelimit-") for name in s.headers):
        return True
    meta_headers = _mapping(s.metadata.get("headers"))
    return any(isinstance(k, str) and k.lower().startswith("x-ratelimit-") for k in meta_headers)


def _is_key_problem(s: Signals) -> bool:
    return _KEY_PROBLEM.search(s.message) is not None


def _is_account_credit(s: Signals) -> bool:
    return s.limit_source == ACCOUNT_CREDITS or _NEGATIVE_BALANCE.search(s.message) is not None


# --- the verdicts ------------------------------------------------------------------------


def _key_invalid(s: Signals) -> Verdict:
    reason = f"{s.status} invalid key"
    if s.status == 403:
        match = _KEY_PROBLEM.search(s.message)
        reason = f"403 key {match.group(1).lower()}" if match else reason
    return Verdict(Outcome.KEY_INVALID, reason=reason, message=_message(s))


def _model_gone(s: Signals) -> Verdict:
    return Verdict(Outcome.MODEL_GONE, reason=f"{s.status} {_safe_name(s.availability_code)}",
                   message=_message(s), model=_model(s))


def _own_limit(s: Signals) -> Verdict:
    """OpenRouter's own limit: rest until its reset; free-model limits are the account's and
    concern free models only; a daily one without a reset lasts until the next UTC midnight."""
    free = any(name.lower().startswith(FREE_LIMIT_PREFIXES) for name in s.limit_names)
    daily = any(_is_daily(name) for name in s.limit_names)
    rest = _ratelimit_reset(s)
    if rest is None:
        rest = retry_after_seconds(s.headers.get(b"retry-after"), s.wall_now)
    if rest is None and daily:
        rest = _bound(DAY_SECONDS - s.wall_now % DAY_SECONDS)
    name = s.limit_source or s.limit_name or "rate limited"
    return Verdict(Outcome.KEY_LIMITED, rest_seconds=rest,
                   scope=Scope.ACCOUNT if free else Scope.KEY, free_only=free,
                   reason=f"429 {name}", message=_message(s))


def _overloaded(s: Signals) -> Verdict:
    return Verdict(Outcome.OVERLOADED, retry_after=_retry_after(s),
                   reason="429 upstream overloaded", message=_message(s))


def _busy(s: Signals) -> Verdict:
    return Verdict(Outcome.BUSY, retry_after=_retry_after(s), reason=f"402 {IN_FLIGHT_BUDGET}",
                   message=_message(s))


def _key_limit(s: Signals) -> Verdict:
    rest = _limit_reset(s.metadata.get("limit_reset"), s.wall_now)
    if rest is None:
        rest = _ratelimit_reset(s)
    return Verdict(Outcome.NO_CREDIT, rest_seconds=rest, reason=f"402 {KEY_LIMIT}",
                   message=_message(s))


def _account_credit(s: Signals) -> Verdict:
    name = ACCOUNT_CREDITS if s.limit_source == ACCOUNT_CREDITS else "negative balance"
    return Verdict(Outcome.NO_CREDIT, scope=Scope.ACCOUNT, reason=f"402 {name}",
                   message=_message(s))


def _no_credit(s: Signals) -> Verdict:
    return Verdict(Outcome.NO_CREDIT, reason="402 no credit", message=_message(s))


# First match wins. Each row: the OPENROUTER.md fact it rests on.
RULES: tuple[Rule, ...] = (
    # "401 invalid/disabled key … take it out of rotation until the config changes"
    Rule("401 invalid key", lambda s: s.status == 401, _key_invalid),
    # "403 moderation or permission": a disabled or expired key is the key's; the rest pass on
    Rule("403 key disabled/expired", lambda s: s.status == 403 and _is_key_problem(s),
         _key_invalid),
    # "error.availability.code (free_variant_ended, …)": the model, for every free key alike
    Rule("model gone", lambda s: s.availability_code in MODEL_GONE_CODES, _model_gone),
    # "Only OpenRouter's own limits carry X-RateLimit-*": theirs even beside provider fields
    Rule("429 OpenRouter limit (X-RateLimit-*)",
         lambda s: s.status == 429 and _has_ratelimit_headers(s), _own_limit),
    # "429 passed through from a provider … not the key's fault"
    Rule("429 provider / capacity", lambda s: s.status == 429 and _is_provider_429(s),
         _overloaded),
    # "429 for the key's own quota": a 429 with no provider sign is OpenRouter's own
    Rule("429 OpenRouter limit", lambda s: s.status == 429, _own_limit),
    # "openrouter_in_flight_budget — transient, with Retry-After"
    Rule("402 in-flight budget", lambda s: s.status == 402 and s.limit_source == IN_FLIGHT_BUDGET,
         _busy),
    # "openrouter_key_limit — the key's own spending cap (resets at limit_reset)"
    Rule("402 key limit", lambda s: s.status == 402 and s.limit_source == KEY_LIMIT, _key_limit),
    # "openrouter_credits — the account balance"; "a negative balance gives 402"
    Rule("402 account credits", lambda s: s.status == 402 and _is_account_credit(s),
         _account_credit),
    # "402 no credit … a long cooldown"
    Rule("402 no credit", lambda s: s.status == 402, _no_credit),
)


# --- reading values --------------------------------------------------------------------------


def _document(body: bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(body, Mapping):
        return body
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # an upstream's odd bytes never break the proxy
        return {}
    return doc if isinstance(doc, dict) else {}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _safe_name(text: str) -> str:
    """An upstream-given name made safe for a bounded log/metric reason."""
    return _REASON_UNSAFE.sub("_", text[:REASON_NAME_CHARS])


def _limit_name(message: str) -> str:
    match = _LIMIT_NAME.search(message) or _FREE_LIMIT_NAME.search(message)
    if match is None:
        return ""
    return _safe_name((match.group(1) if match.groups() else match.group(0)).rstrip(".:"))


def _is_daily(name: str) -> bool:
    lower = name.lower()
    return "per-day" in lower or "daily" in lower


def _message(s: Signals) -> str:
    return s.message[:MESSAGE_CHARS]


def _model(s: Signals) -> str | None:
    for where, key in ((s.availability, "model"), (s.metadata, "model"), (s.metadata, "model_id"),
                       (s.metadata, "model_slug"), (s.error, "model")):
        value = where.get(key)
        if isinstance(value, str) and 0 < len(value) <= MODEL_CHARS:
            return value
    return None


def _retry_after(s: Signals) -> float | None:
    """`error.availability.retry_after` (seconds), else the `Retry-After` header."""
    seconds = _seconds(s.availability.get("retry_after"))
    if seconds is not None:
        return seconds
    return retry_after_seconds(s.headers.get(b"retry-after"), s.wall_now)


def _ratelimit_reset(s: Signals) -> float | None:
    """X-RateLimit-Reset from `error.metadata.headers` (the body wins), else the header."""
    meta_headers = _mapping(s.metadata.get("headers"))
    for key, value in meta_headers.items():
        if isinstance(key, str) and key.lower() == "x-ratelimit-reset":
            seconds = _reset_seconds(value, s.wall_now)
            if seconds is not None:
                return seconds
    header = s.headers.get(b"x-ratelimit-reset")
    return _reset_seconds(header.decode("latin-1"), s.wall_now) if header is not None else None


def _bound(seconds: float) -> float:
    return min(max(seconds, MIN_SECONDS), MAX_SECONDS)


def _number(value: Any) -> float | None:
    """A JSON number or a plain decimal string; never a bool, NaN or a negative."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if not _NUMBER.fullmatch(value):
            return None
        value = value.strip()
    if not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return None if math.isnan(number) or number < 0 else number


def _seconds(value: Any) -> float | None:
    number = _number(value)
    return None if number is None else _bound(number)


def _reset_seconds(value: Any, wall_now: float) -> float | None:
    """A reset as epoch milliseconds (OpenRouter's), epoch seconds, or seconds from now."""
    number = _number(value)
    if number is None:
        return None
    if number > 1e11:
        return _bound(number / 1000.0 - wall_now)
    if number > 1e9:
        return _bound(number - wall_now)
    return _bound(number)


def _limit_reset(value: Any, wall_now: float) -> float | None:
    """`metadata.limit_reset`: a time (as `_reset_seconds`, or ISO 8601), or the key's reset
    period. OPENROUTER.md: periods end at UTC midnight; weeks run Monday to Sunday."""
    if not isinstance(value, str):
        return _reset_seconds(value, wall_now)
    seconds = _reset_seconds(value, wall_now)
    if seconds is not None:
        return seconds
    period = value.strip().lower()
    if period in ("daily", "weekly", "monthly"):
        return _bound(_period_end(period, wall_now) - wall_now)
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return _bound(when.timestamp() - wall_now)


def _period_end(period: str, wall_now: float) -> float:
    try:
        now = datetime.fromtimestamp(wall_now, UTC)
    except (ValueError, OverflowError, OSError):
        return wall_now + DAY_SECONDS
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        end = midnight + timedelta(days=1)
    elif period == "weekly":
        end = midnight + timedelta(days=7 - now.weekday())
    else:
        first = midnight.replace(day=1)
        end = first.replace(year=first.year + 1, month=1) if first.month == 12 else (
            first.replace(month=first.month + 1))
    return end.timestamp()


def retry_after_seconds(value: bytes | None, wall_now: float) -> float | None:
    """``Retry-After``: delay-seconds or an HTTP-date (RFC 9110 §10.2.3), bounded."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isascii() and text.isdigit():
        return _bound(float(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime dates carry no zone; HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return _bound(when.timestamp() - wall_now)
