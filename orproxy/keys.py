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
    COOLING = "cooling"
    DISABLED = "disabled"


@dataclass(eq=False)
class Key:
    """One upstream key and its rest state. Identity is the object itself."""

    secret: str
    id: str
    masked: str
    account: str | None
    cooling_until: float = 0.0
    disabled: bool = False
    reason: str = ""
    uses: int = 0

    def state(self, now: float) -> KeyState:
        if self.disabled:
            return KeyState.DISABLED
        return KeyState.COOLING if self.cooling_until > now else KeyState.AVAILABLE

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

    def acquire(self, exclude: Collection[Key] = (), now: float | None = None) -> Key | None:
        """The key for the next attempt, or None if every key is resting or excluded."""
        now = self.clock() if now is None else now
        last = self._last
        if self._same and last is not None and self._usable(last, exclude, now):
            chosen: Key | None = last
        else:
            chosen = self._pick(exclude, now)
        if chosen is not None:
            chosen.uses += 1
            self._last = chosen
        return chosen

    def _usable(self, key: Key, exclude: Collection[Key], now: float) -> bool:
        return not key.disabled and key.cooling_until <= now and key not in exclude

    def _pick(self, exclude: Collection[Key], now: float) -> Key | None:
        keys, n = self._keys, len(self._keys)
        if self._strategy == "random":
            usable = [k for k in keys if self._usable(k, exclude, now)]
            return self._rng.choice(usable) if usable else None
        start = self._next if self._strategy == "round-robin" else 0
        for i in range(n):
            key = keys[(start + i) % n]
            if self._usable(key, exclude, now):
                self._next = (start + i + 1) % n
                return key
        return None

    def cool_down(
        self, key: Key, seconds: float, reason: str, *, account_wide: bool = False,
        now: float | None = None,
    ) -> list[Key]:
        """Rest ``key`` (and, for an account-wide limit, every key of its account)."""
        now = self.clock() if now is None else now
        until = now + max(seconds, 0.0)
        targets = [key]
        if account_wide and key.account is not None:
            targets = [k for k in self._keys if k.account == key.account]
        targets = [k for k in targets if not k.disabled]  # a disabled key keeps its reason
        for k in targets:
            if until > k.cooling_until:
                k.cooling_until = until
                k.reason = reason
        return targets

    def disable(self, key: Key, reason: str) -> None:
        """Take a key out of rotation until restart (it was refused as invalid)."""
        key.disabled = True
        key.reason = reason

    def soonest_available(self, now: float | None = None) -> float | None:
        """Seconds until the first resting key returns; None if none will (all disabled)."""
        now = self.clock() if now is None else now
        waits = [k.cooling_until - now for k in self._keys if not k.disabled]
        return max(min(waits), 0.0) if waits else None

    def snapshot(self, now: float | None = None) -> list[KeyView]:
        now = self.clock() if now is None else now
        return [
            KeyView(k.id, k.masked, k.account, k.state(now), max(k.cooling_until - now, 0.0),
                    k.reason if k.state(now) is not KeyState.AVAILABLE else "", k.uses)
            for k in self._keys
        ]

    def counts(self, now: float | None = None) -> dict[str, int]:
        counts = {s.value: 0 for s in KeyState}
        for view in self.snapshot(now):
            counts[view.state.value] += 1
        return counts
