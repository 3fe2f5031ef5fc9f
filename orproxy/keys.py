"""The upstream key pool: which key serves the next attempt, and which keys rest.

Pure policy: no I/O, no awaits, no locks (one event loop calls it), time passed in from an
injected monotonic clock so cooldowns are testable without sleeping. It knows nothing of
HTTP: callers translate responses into ``cool_down`` / ``disable`` calls. Keys leave this
module only masked or as their short id.
"""

from __future__ import annotations

import enum
import hashlib
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

KEY_PREFIX = "sk-or-"
STRATEGIES = ("round-robin", "first", "random")


def mask_key(key: str) -> str:
    """``sk-or-…abcd``: enough to recognise a key, never enough to use it."""
    if len(key) < 16:
        return f"…({len(key)} chars)"
    prefix = KEY_PREFIX if key.startswith(KEY_PREFIX) else key[:3]
    return f"{prefix}…{key[-4:]}"


def key_id(key: str) -> str:
    """A short stable id (8 hex of sha256) for logs, metrics and the dashboard."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class KeyState(enum.Enum):
    AVAILABLE = "available"
    FREE_LIMITED = "free_limited"  # resting for free models only; serves paid ones
    COOLING = "cooling"
    DISABLED = "disabled"


@dataclass(eq=False)
class Key:
    """One upstream key and its rest state. Identity is the object itself."""

    secret: str
    id: str
    masked: str
    account: str | None
    cooling_until: float = 0.0  # resting for every request until then
    free_until: float = 0.0  # resting for free-model requests until then
    disabled: bool = False
    reason: str = ""
    message: str = ""  # OpenRouter's words on the limit that rests the key
    uses: int = 0

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


class KeyPool:
    def __init__(
        self,
        keys: Sequence[tuple[str, str | None]],
        *,
        strategy: str = "round-robin",
        same: bool = False,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        if not keys:
            raise ValueError("a key pool needs at least one key")
        self._keys = [Key(k, key_id(k), mask_key(k), account) for k, account in keys]
        self._strategy = strategy
        self._same = same
        self._next = 0
        self._last: Key | None = None
        self._rng = rng or random.Random()
        self.clock = clock

    def __len__(self) -> int:
        return len(self._keys)

    def acquire(self, exclude: Collection[Key] = (), now: float | None = None, *,
                free: bool = True) -> Key | None:
        """The key for the next attempt, or None if every key is resting or excluded.
        ``free``: the request is for a free model (or may be), so free-model rests count."""
        now = self.clock() if now is None else now
        last = self._last
        if (self._same and last is not None and last.usable(now, free)
                and last not in exclude):
            chosen: Key | None = last
        else:
            chosen = self._pick(exclude, now, free)
        if chosen is not None:
            chosen.uses += 1
            self._last = chosen
        return chosen

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

    def cool_down(
        self, key: Key, seconds: float, reason: str, *, account_wide: bool = False,
        free_only: bool = False, message: str = "", now: float | None = None,
    ) -> list[Key]:
        """Rest ``key`` (and, for an account-wide limit, every key of its account); a
        ``free_only`` rest applies to free-model requests only."""
        now = self.clock() if now is None else now
        until = now + max(seconds, 0.0)
        targets = [key]
        if account_wide and key.account is not None:
            targets = [k for k in self._keys if k.account == key.account]
        targets = [k for k in targets if not k.disabled]  # a disabled key keeps its reason
        for k in targets:
            current = k.free_until if free_only else k.cooling_until
            if until > current:
                if free_only:
                    k.free_until = until
                else:
                    k.cooling_until = until
                k.reason, k.message = reason, message
        return targets

    def disable(self, key: Key, reason: str) -> None:
        """Take a key out of rotation until restart (it was refused as invalid)."""
        key.disabled = True
        key.reason = reason

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
        views = []
        for k in self._keys:
            state = k.state(now)
            resting = state is not KeyState.AVAILABLE
            views.append(KeyView(k.id, k.masked, k.account, state,
                                 max(k.rest_end(True) - now, 0.0),
                                 k.reason if resting else "", k.message if resting else "",
                                 k.uses))
        return views

    def counts(self, now: float | None = None) -> dict[str, int]:
        counts = {s.value: 0 for s in KeyState}
        for view in self.snapshot(now):
            counts[view.state.value] += 1
        return counts
