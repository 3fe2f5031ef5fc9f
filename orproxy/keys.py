"""The upstream key pool: which key serves the next attempt, which keys rest, and what each
key has done.

Pure policy: no I/O, no awaits, no locks (one event loop calls it), time passed in from
injected clocks (monotonic for rests, wall for what is shown and saved) so rests are
testable without sleeping. It knows nothing of HTTP: callers translate answers into
``cool_down`` / ``disable`` / ``record_*`` calls. Every change of a key's state is reported
once to ``on_change`` (logs, the state saver). Keys leave this module only masked or as
their short id.
"""

from __future__ import annotations

import enum
import hashlib
import random
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

KEY_PREFIX = "sk-or-"
STRATEGIES = ("round-robin", "first", "random")
# a key refused as invalid stays out across restarts, but is tried again after this long
DISABLED_RECHECK_SECONDS = 24 * 3600.0


def mask_key(key: str) -> str:
    """``sk-or-…abcd``: enough to recognise a key, never enough to use it."""
    if len(key) < 16:
        return f"…({len(key)} chars)"
    prefix = KEY_PREFIX if key.startswith(KEY_PREFIX) else key[:3]
    return f"{prefix}…{key[-4:]}"


_KEY_LIKE = re.compile(r"sk-or-[A-Za-z0-9_\-]*", re.IGNORECASE)


def scrub(text: str) -> str:
    """Upstream words with anything key-like masked: an error message may quote the key it
    refused, and those words are logged, shown and saved."""
    return _KEY_LIKE.sub(lambda m: mask_key(m.group()), text) if "sk-" in text.lower() else text


def key_id(key: str) -> str:
    """A short stable id (8 hex of sha256) for logs, metrics and the dashboard."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class KeyState(enum.Enum):
    AVAILABLE = "available"
    FREE_LIMITED = "free_limited"  # resting for free models only; serves paid ones
    COOLING = "cooling"
    DISABLED = "disabled"


@dataclass
class KeyStats:
    """What a key has done since it was first seen (kept across restarts)."""

    requests: int = 0  # upstream attempts made with it
    successes: int = 0  # answers delivered whole, 2xx, no in-band error
    rate_limited: int = 0  # 429s, as HTTP status or in-band
    errors: int = 0  # every other failed attempt or in-band error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0  # USD, as OpenRouter reports it
    errors_by_kind: dict[str, int] = field(default_factory=dict)  # "429", "timeout", …
    last_error: str = ""
    last_error_at: float = 0.0  # wall clock


COUNTERS = ("requests", "successes", "rate_limited", "errors", "prompt_tokens",
            "completion_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens",
            "cost")


@dataclass(eq=False)
class Key:
    """One upstream key, its rest state and its stats. Identity is the object itself."""

    secret: str
    id: str
    masked: str
    account: str | None
    cooling_until: float = 0.0  # resting for every request until then (monotonic)
    free_until: float = 0.0  # resting for free-model requests until then (monotonic)
    disabled: bool = False
    disabled_at: float = 0.0  # wall clock
    reason: str = ""
    message: str = ""  # OpenRouter's words on the limit that rests the key
    uses: int = 0
    stats: KeyStats = field(default_factory=KeyStats)
    account_learned: bool = False  # the account came from OpenRouter, not the config
    _resting: bool = False  # a rest was announced and its end not yet

    def state(self, now: float) -> KeyState:
        if self.disabled:
            return KeyState.DISABLED
        if self.cooling_until > now:
            return KeyState.COOLING
        return KeyState.FREE_LIMITED if self.free_until > now else KeyState.AVAILABLE

    def usable(self, now: float, free: bool) -> bool:
        """Can serve a request now; ``free``: the request is for a free model."""
        return (not self.disabled and self.cooling_until <= now
                and (not free or self.free_until <= now))

    def rest_end(self, free: bool) -> float:
        return max(self.cooling_until, self.free_until) if free else self.cooling_until

    def __repr__(self) -> str:
        return f"<Key {self.id} {self.masked} {self.reason or 'ok'}>"


class Change(enum.Enum):
    RESTED = "rested"
    DISABLED = "disabled"
    RETURNED = "returned"


@dataclass(frozen=True)
class KeyEvent:
    """One change of a key's state, as the logs and the state saver see it."""

    change: Change
    key_id: str
    masked: str
    account: str | None
    reason: str = ""
    message: str = ""
    seconds: float = 0.0  # how long the rest lasts
    until: float = 0.0  # wall clock the rest ends
    free_only: bool = False
    account_wide: bool = False


@dataclass(frozen=True)
class KeyView:
    """What the outside may see of a key at one moment."""

    id: str
    masked: str
    account: str | None
    state: KeyState
    cooling_seconds: float
    reason: str
    message: str
    uses: int
    rest_until: float = field(default=0.0, compare=False)  # wall clock; 0: not resting
    stats: KeyStats = field(default_factory=KeyStats, compare=False)


@dataclass(frozen=True)
class SavedKey:
    """What survives a restart, by key id (never the key)."""

    id: str
    rest_until: float  # wall clock; 0 = not resting
    free_only: bool  # the rest applies to free-model requests only
    disabled: bool
    disabled_at: float
    reason: str
    message: str
    stats: KeyStats


class KeyPool:
    def __init__(
        self,
        keys: Sequence[tuple[str, str | None]],
        *,
        strategy: str = "round-robin",
        same: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._keys: list[Key] = []
        self._strategy = strategy
        self._same = same
        self._next = 0
        self._last: Key | None = None
        self._rng = rng or random.Random()
        self.clock = clock
        self.wall = wall
        self.on_change: Callable[[KeyEvent], None] | None = None
        self._next_return = float("inf")  # earliest announced rest end: cheap return checks
        self._free_rests_until = 0.0  # the latest end of any free-model rest
        self.reconfigure(keys, strategy=strategy, same=same)

    def reconfigure(self, keys: Sequence[tuple[str, str | None]], *, strategy: str,
                    same: bool) -> None:
        """Take a new key list and strategy (a config reload): kept keys keep their state
        and stats, new keys start fresh, removed keys are forgotten."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        if not keys:
            raise ValueError("a key pool needs at least one key")
        old = {k.secret: k for k in self._keys}
        fresh = []
        for secret, account in keys:
            key = old.get(secret) or Key(secret, key_id(secret), mask_key(secret), account)
            if account is not None or not key.account_learned:
                key.account, key.account_learned = account, False
            fresh.append(key)
        self._keys = fresh
        self._strategy, self._same = strategy, same
        self._next = 0
        if self._last is not None and self._last not in fresh:
            self._last = None

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._keys)

    def by_id(self, key_id_: str) -> Key | None:
        for key in self._keys:
            if key.id == key_id_:
                return key
        return None

    # --- choosing ------------------------------------------------------------------------------

    def acquire(self, exclude: Collection[Key] = (), now: float | None = None, *,
                free: bool = True, prefer: str | None = None) -> Key | None:
        """The key for the next attempt, or None if every key is resting or excluded.
        ``free``: the request is for a free model (or may be), so free-model rests count;
        ``prefer``: a key id to use if it can serve (a conversation's key)."""
        now = self.clock() if now is None else now
        self._check_returns(now)
        chosen = None
        if prefer is not None:
            chosen = self._if_usable(self.by_id(prefer), exclude, now, free)
        if chosen is None and self._same:
            chosen = self._if_usable(self._last, exclude, now, free)
        if chosen is None:
            chosen = self._pick(exclude, now, free)
        if chosen is not None:
            chosen.uses += 1
            self._last = chosen
        return chosen

    @staticmethod
    def _if_usable(key: Key | None, exclude: Collection[Key], now: float,
                   free: bool) -> Key | None:
        return key if key is not None and key.usable(now, free) and key not in exclude else None

    def _pick(self, exclude: Collection[Key], now: float, free: bool) -> Key | None:
        keys, n = self._keys, len(self._keys)
        if self._strategy == "random":
            usable = [k for k in keys if k.usable(now, free) and k not in exclude]
            return self._rng.choice(usable) if usable else None
        start = self._next if self._strategy == "round-robin" else 0
        for i in range(n):
            key = keys[(start + i) % n]
            if key.usable(now, free) and key not in exclude:
                self._next = (start + i + 1) % n
                return key
        return None

    # --- resting -------------------------------------------------------------------------------

    def cool_down(
        self, key: Key, seconds: float, reason: str, *, account_wide: bool = False,
        free_only: bool = False, message: str = "", now: float | None = None,
    ) -> list[Key]:
        """Rest ``key`` (and, for an account-wide limit, every key of its account); a
        ``free_only`` rest applies to free-model requests only. Returns the keys it covers
        (a rest already lasting longer is kept as it is)."""
        now = self.clock() if now is None else now
        seconds = max(seconds, 0.0)
        until = now + seconds
        targets = [key]
        if account_wide and key.account is not None:
            targets = [k for k in self._keys if k.account == key.account]
        rested = []
        for k in targets:
            if k.disabled:  # a disabled key keeps its reason
                continue
            rested.append(k)
            if until <= (k.free_until if free_only else k.cooling_until):
                continue
            if free_only:
                k.free_until = until
                self._free_rests_until = max(self._free_rests_until, until)
            else:
                k.cooling_until = until
            k.reason, k.message = scrub(reason), scrub(message)
            k._resting = True
            self._next_return = min(self._next_return, until)
            self._emit(KeyEvent(Change.RESTED, k.id, k.masked, k.account, k.reason, k.message,
                                seconds, self.wall() + seconds, free_only, account_wide))
        return rested

    def disable(self, key: Key, reason: str, message: str = "") -> None:
        """Take a key out of rotation (it was refused as invalid)."""
        if key.disabled:
            return
        key.disabled, key.disabled_at = True, self.wall()
        key.reason, key.message = scrub(reason), scrub(message)
        key._resting = False
        self._emit(KeyEvent(Change.DISABLED, key.id, key.masked, key.account, key.reason,
                            key.message))

    def learn_account(self, key: Key, account: str) -> None:
        """An account OpenRouter told us (``creator_user_id``); a configured one wins."""
        if key.account is None or key.account_learned:
            key.account, key.account_learned = account, True

    def _check_returns(self, now: float) -> None:
        """Announce, once, each rest that has ended."""
        if now < self._next_return:
            return
        upcoming = float("inf")
        for k in self._keys:
            if not k._resting:
                continue
            end = k.rest_end(True)
            if end <= now:
                k._resting = False
                self._emit(KeyEvent(Change.RETURNED, k.id, k.masked, k.account, k.reason))
            else:
                upcoming = min(upcoming, end)
        self._next_return = upcoming

    def _emit(self, event: KeyEvent) -> None:
        if self.on_change is not None:
            self.on_change(event)

    # --- accounting ----------------------------------------------------------------------------

    def record_attempt(self, key: Key, outcome: str, status: int, reason: str = "") -> None:
        """One upstream attempt with ``key`` ended: ``outcome`` as the attempt loop names
        it ("ok", "key_limited", "timeout" …), ``status`` its HTTP status (0 if none)."""
        stats = key.stats
        stats.requests += 1
        if outcome == "ok" and status < 400:
            return
        if outcome in ("overloaded", "busy"):  # the upstream's capacity, not this key's
            stats.errors_by_kind[outcome] = stats.errors_by_kind.get(outcome, 0) + 1
            stats.last_error, stats.last_error_at = scrub(reason or outcome), self.wall()
            return
        kind = str(status) if status else outcome
        text = reason or (f"{status} {outcome}" if status and outcome != "ok" else kind)
        self._error(stats, kind, text, limited=status == 429)

    def record_in_band_error(self, key: Key, code: int | None, reason: str) -> None:
        """An error inside a 200 (a JSON body or a stream event)."""
        self._error(key.stats, f"in_band_{code}" if code else "in_band", reason,
                    limited=code == 429)

    def _error(self, stats: KeyStats, kind: str, text: str, *, limited: bool) -> None:
        if limited:
            stats.rate_limited += 1
        else:
            stats.errors += 1
        stats.errors_by_kind[kind] = stats.errors_by_kind.get(kind, 0) + 1
        stats.last_error, stats.last_error_at = scrub(text[:200]), self.wall()

    def record_success(self, key: Key) -> None:
        key.stats.successes += 1

    def record_usage(self, key: Key, *, prompt: int, completion: int, cached: int,
                     cache_write: int, reasoning: int, cost: float) -> None:
        stats = key.stats
        stats.prompt_tokens += prompt
        stats.completion_tokens += completion
        stats.cached_tokens += cached
        stats.cache_write_tokens += cache_write
        stats.reasoning_tokens += reasoning
        stats.cost += cost

    # --- views ---------------------------------------------------------------------------------

    def free_rests(self, now: float | None = None) -> bool:
        """Some key rests for free models only: whether a request is for a free model
        matters to which keys may serve it."""
        return (self.clock() if now is None else now) < self._free_rests_until

    def soonest(self, now: float | None = None, *, free: bool = True,
                ) -> tuple[float, str] | None:
        """Seconds until the first resting key returns for such a request, with
        OpenRouter's words on that key's limit; None if none will (all disabled)."""
        now = self.clock() if now is None else now
        live = [k for k in self._keys if not k.disabled]
        if not live:
            return None
        key = min(live, key=lambda k: k.rest_end(free))
        return max(key.rest_end(free) - now, 0.0), key.message

    def soonest_available(self, now: float | None = None) -> float | None:
        """Seconds until the first resting key returns; None if none will (all disabled)."""
        soonest = self.soonest(now)
        return None if soonest is None else soonest[0]

    def snapshot(self, now: float | None = None) -> list[KeyView]:
        now = self.clock() if now is None else now
        self._check_returns(now)
        wall = self.wall()
        views = []
        for k in self._keys:
            state = k.state(now)
            resting = state is not KeyState.AVAILABLE
            left = max(k.rest_end(True) - now, 0.0)
            views.append(KeyView(k.id, k.masked, k.account, state, left,
                                 k.reason if resting else "", k.message if resting else "",
                                 k.uses, wall + left if left > 0 else 0.0,
                                 replace(k.stats, errors_by_kind=dict(k.stats.errors_by_kind))))
        return views

    def counts(self, now: float | None = None) -> dict[str, int]:
        counts = {s.value: 0 for s in KeyState}
        for view in self.snapshot(now):
            counts[view.state.value] += 1
        return counts

    # --- durable state -------------------------------------------------------------------------

    def export(self, now: float | None = None) -> list[SavedKey]:
        """Every key's state and stats, rests as wall-clock ends."""
        now = self.clock() if now is None else now
        wall = self.wall()
        out = []
        for k in self._keys:
            full = k.cooling_until > now
            end = k.cooling_until if full else k.free_until
            until = wall + (end - now) if end > now else 0.0
            out.append(SavedKey(k.id, until, not full and until > 0, k.disabled, k.disabled_at,
                                k.reason, k.message,
                                replace(k.stats, errors_by_kind=dict(k.stats.errors_by_kind))))
        return out

    def restore(self, saved: Iterable[SavedKey], now: float | None = None, *,
                max_rest_seconds: float = 31 * 86400.0) -> int:
        """Take back what an earlier run saved, by key id: keys no longer configured are
        ignored, a rest that ended while we were down is over, a rest longer than
        ``max_rest_seconds`` is cut to it. Returns how many keys were restored."""
        now = self.clock() if now is None else now
        wall = self.wall()
        by_id = {k.id: k for k in self._keys}
        restored = 0
        for record in saved:
            key = by_id.get(record.id)
            if key is None:
                continue
            restored += 1
            key.stats = replace(record.stats, errors_by_kind=dict(record.stats.errors_by_kind))
            if record.disabled and wall - record.disabled_at < DISABLED_RECHECK_SECONDS:
                key.disabled, key.disabled_at = True, record.disabled_at
                key.reason, key.message = record.reason, record.message
                continue
            left = min(record.rest_until - wall, max_rest_seconds)
            if left > 0:
                if record.free_only:
                    key.free_until = now + left
                    self._free_rests_until = max(self._free_rests_until, now + left)
                else:
                    key.cooling_until = now + left
                key.reason, key.message, key._resting = record.reason, record.message, True
                self._next_return = min(self._next_return, now + left)
        return restored
