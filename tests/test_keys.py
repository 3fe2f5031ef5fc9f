"""Tier 1: the key pool (strategies, `same`, cooldowns on a fake clock, masking)."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orproxy.keys import Key, KeyPool, KeyState, KeyView, key_id, mask_key

SECRETS = ["sk-or-v1-" + hashlib.sha256(f"key {i}".encode()).hexdigest() for i in range(6)]
K0, K1, K2, K3 = SECRETS[:4]


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_pool(
    n: int = 3,
    *,
    strategy: str = "round-robin",
    same: bool = False,
    accounts: list[str | None] | None = None,
    clock: FakeClock | None = None,
    seed: int = 0,
) -> KeyPool:
    accounts = accounts if accounts is not None else [None] * n
    return KeyPool(list(zip(SECRETS[:n], accounts, strict=True)), strategy=strategy, same=same,
                   clock=clock or FakeClock(), rng=random.Random(seed))


def acquire_all(pool: KeyPool) -> list[Key]:
    """Every usable key, in the order the pool hands them out when each is excluded in turn."""
    got: list[Key] = []
    while (key := pool.acquire(exclude=got)) is not None:
        got.append(key)
    return got


def handles(pool: KeyPool) -> list[Key]:
    """Every Key of a fresh pool in configured order, found through the public API only.

    Round-robin and first hand them out in order, leaving the round-robin cursor back at the
    first key; the last one acquired becomes the pool's `same` key.
    """
    order = [view.id for view in pool.snapshot()]
    return sorted(acquire_all(pool), key=lambda k: order.index(k.id))


def secrets_of(pool: KeyPool, count: int, **kwargs: object) -> list[str | None]:
    out: list[str | None] = []
    for _ in range(count):
        key = pool.acquire(**kwargs)  # type: ignore[arg-type]
        out.append(None if key is None else key.secret)
    return out


# --- construction --------------------------------------------------------------------------


def test_rejects_unknown_strategy_and_empty_pool() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'lru'"):
        KeyPool([(K0, None)], strategy="lru")
    with pytest.raises(ValueError, match="at least one key"):
        KeyPool([])


def test_len_and_keys_carry_id_mask_and_account() -> None:
    pool = make_pool(2, accounts=["alice", None])
    assert len(pool) == 2
    views = pool.snapshot()
    assert [v.id for v in views] == [key_id(K0), key_id(K1)]
    assert [v.masked for v in views] == [mask_key(K0), mask_key(K1)]
    assert [v.account for v in views] == ["alice", None]


# --- strategies ----------------------------------------------------------------------------


def test_round_robin_cycles_in_order() -> None:
    pool = make_pool(3)
    assert secrets_of(pool, 7) == [K0, K1, K2, K0, K1, K2, K0]


def test_round_robin_skips_a_resting_key_and_keeps_cycling() -> None:
    clock = FakeClock()
    pool = make_pool(3, clock=clock)
    first = pool.acquire()
    assert first is not None and first.secret == K0
    second = pool.acquire()
    assert second is not None and second.secret == K1
    pool.cool_down(second, 50, "429")
    assert secrets_of(pool, 4) == [K2, K0, K2, K0]
    clock.advance(50)
    assert secrets_of(pool, 3) == [K1, K2, K0]


def test_first_always_takes_the_first_usable_key() -> None:
    clock = FakeClock()
    pool = make_pool(3, strategy="first", clock=clock)
    assert secrets_of(pool, 3) == [K0, K0, K0]
    k0 = pool.acquire()
    assert k0 is not None
    pool.cool_down(k0, 10, "429")
    assert secrets_of(pool, 3) == [K1, K1, K1]
    clock.advance(10)
    assert secrets_of(pool, 2) == [K0, K0]


def test_first_with_exclude_takes_the_next_usable() -> None:
    pool = make_pool(3, strategy="first")
    k0 = pool.acquire()
    assert k0 is not None
    k1 = pool.acquire(exclude=[k0])
    assert k1 is not None and k1.secret == K1
    k2 = pool.acquire(exclude=[k0, k1])
    assert k2 is not None and k2.secret == K2
    assert pool.acquire(exclude=[k0, k1, k2]) is None


def test_random_never_picks_an_excluded_key() -> None:
    # protects: the random strategy draws only among keys both usable and not excluded
    pool = make_pool(3, strategy="random", seed=5)
    first = pool.acquire()
    assert first is not None
    assert all(pool.acquire(exclude=[first]) is not first for _ in range(30))


def test_random_is_the_seeded_rng_choice_over_usable_keys() -> None:
    pool = make_pool(4, strategy="random", seed=1234)
    expected = random.Random(1234)
    got = secrets_of(pool, 40)
    assert got == [expected.choice(SECRETS[:4]) for _ in range(40)]
    assert set(got) == set(SECRETS[:4])  # the seed reaches every key in 40 draws


def test_random_only_picks_usable_keys() -> None:
    clock = FakeClock()
    pool = make_pool(4, strategy="random", clock=clock, seed=7)
    keys = handles(pool)
    pool.cool_down(keys[0], 100, "429")
    pool.disable(keys[2], "401")
    got = [pool.acquire(exclude=[keys[3]]) for _ in range(30)]
    assert all(k is keys[1] for k in got)
    got = [pool.acquire() for _ in range(60)]
    assert {k.secret for k in got if k is not None} == {K1, K3}
    assert None not in got


def test_random_with_nothing_usable_returns_none() -> None:
    pool = make_pool(2, strategy="random")
    keys = handles(pool)
    pool.disable(keys[0], "401")
    assert pool.acquire(exclude=[keys[1]]) is None


# --- option `same` ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["round-robin", "first", "random"])
def test_same_keeps_the_last_key_until_it_rests_then_moves_on(strategy: str) -> None:
    clock = FakeClock()
    pool = make_pool(3, strategy=strategy, same=True, clock=clock, seed=3)
    first = pool.acquire()
    assert first is not None
    assert all(pool.acquire() is first for _ in range(5))
    pool.cool_down(first, 30, "429")
    second = pool.acquire()
    assert second is not None and second is not first
    assert all(pool.acquire() is second for _ in range(5))
    clock.advance(30)  # the first key is back, but `same` stays on the second
    assert all(pool.acquire() is second for _ in range(5))


def test_same_round_robin_moves_to_the_next_key_in_order() -> None:
    pool = make_pool(3, same=True)
    k0 = pool.acquire()
    assert k0 is not None and k0.secret == K0
    pool.disable(k0, "401")
    assert secrets_of(pool, 3) == [K1, K1, K1]


def test_same_respects_exclude() -> None:
    pool = make_pool(3, same=True)
    k0 = pool.acquire()
    assert k0 is not None
    other = pool.acquire(exclude=[k0])
    assert other is not None and other.secret == K1


def test_without_same_round_robin_does_not_stick() -> None:
    pool = make_pool(2, same=False)
    assert secrets_of(pool, 4) == [K0, K1, K0, K1]


def test_uses_counts_every_acquisition() -> None:
    pool = make_pool(2)
    secrets_of(pool, 5)
    assert [v.uses for v in pool.snapshot()] == [3, 2]


# --- exclude ----------------------------------------------------------------------------------


def test_exclude_everything_gives_none_and_counts_no_use() -> None:
    pool = make_pool(2)
    keys = handles(pool)
    before = [v.uses for v in pool.snapshot()]
    assert pool.acquire(exclude=keys) is None
    assert [v.uses for v in pool.snapshot()] == before


def test_exclude_is_by_identity() -> None:
    pool = make_pool(2)
    k0, k1 = handles(pool)
    twin = Key(k0.secret, k0.id, k0.masked, k0.account)  # equal fields, another key object
    got = pool.acquire(exclude=[twin, k1])
    assert got is k0


# --- cooldowns ---------------------------------------------------------------------------------


def test_cooldown_ends_exactly_at_the_reset_time() -> None:
    clock = FakeClock(now=5000.0)
    pool = make_pool(1, clock=clock)
    key = pool.acquire()
    assert key is not None
    assert pool.cool_down(key, 120.0, "429 rate limited") == [key]
    assert pool.acquire() is None
    clock.advance(119.999)
    assert pool.acquire() is None
    assert pool.acquire(now=5119.9999) is None
    clock.now = 5120.0
    assert pool.acquire() is key


def test_cooldown_cools_exactly_that_key() -> None:
    clock = FakeClock()
    pool = make_pool(3, clock=clock, accounts=["a", "a", "a"])
    _, k1, _ = handles(pool)
    assert pool.cool_down(k1, 60, "429") == [k1]
    views = pool.snapshot()
    assert [v.state for v in views] == [KeyState.AVAILABLE, KeyState.COOLING, KeyState.AVAILABLE]
    assert [v.cooling_seconds for v in views] == [0.0, 60.0, 0.0]
    assert [v.reason for v in views] == ["", "429", ""]


def test_zero_or_negative_cooldown_does_not_rest_the_key() -> None:
    pool = make_pool(1)
    key = pool.acquire()
    assert key is not None
    pool.cool_down(key, -5, "odd")
    assert pool.acquire() is key
    pool.cool_down(key, 0, "odd")
    assert pool.acquire() is key


def test_a_shorter_cooldown_never_shortens_a_longer_one() -> None:
    clock = FakeClock()
    pool = make_pool(1, clock=clock)
    key = pool.acquire()
    assert key is not None
    pool.cool_down(key, 3600, "daily")
    pool.cool_down(key, 10, "per-minute")
    view = pool.snapshot()[0]
    assert (view.cooling_seconds, view.reason) == (3600.0, "daily")
    pool.cool_down(key, 7200, "longer")
    view = pool.snapshot()[0]
    assert (view.cooling_seconds, view.reason) == (7200.0, "longer")


def test_account_wide_cooldown_cools_every_key_of_that_account_only() -> None:
    clock = FakeClock()
    pool = make_pool(5, clock=clock, accounts=["alice", "bob", "alice", None, "alice"])
    keys = handles(pool)
    targets = pool.cool_down(keys[2], 900, "daily", account_wide=True)
    assert targets == [keys[0], keys[2], keys[4]]
    states = [v.state for v in pool.snapshot()]
    assert states == [KeyState.COOLING, KeyState.AVAILABLE, KeyState.COOLING,
                      KeyState.AVAILABLE, KeyState.COOLING]
    assert {pool.acquire().secret for _ in range(6)} == {SECRETS[1], SECRETS[3]}  # type: ignore[union-attr]
    clock.advance(900)
    assert pool.counts() == {"available": 5, "free_limited": 0, "cooling": 0, "disabled": 0}


def test_account_wide_on_a_key_without_account_cools_only_that_key() -> None:
    pool = make_pool(3, accounts=[None, None, "x"])
    keys = handles(pool)
    assert pool.cool_down(keys[0], 60, "daily", account_wide=True) == [keys[0]]
    assert [v.state for v in pool.snapshot()] == [
        KeyState.COOLING, KeyState.AVAILABLE, KeyState.AVAILABLE]


def test_account_wide_does_not_shorten_a_sibling_longer_rest() -> None:
    pool = make_pool(2, accounts=["a", "a"])
    k0, k1 = handles(pool)
    pool.cool_down(k1, 5000, "402 no credit")
    pool.cool_down(k0, 100, "daily", account_wide=True)
    assert [(v.cooling_seconds, v.reason) for v in pool.snapshot()] == [
        (100.0, "daily"), (5000.0, "402 no credit")]


def test_cooldown_uses_the_explicit_now_over_the_clock() -> None:
    clock = FakeClock(now=0.0)
    pool = make_pool(1, clock=clock)
    key = pool.acquire()
    assert key is not None
    pool.cool_down(key, 10, "429", now=100.0)
    assert pool.acquire(now=109.0) is None
    assert pool.acquire(now=110.0) is key


# --- disable -----------------------------------------------------------------------------------


def test_disable_is_permanent() -> None:
    clock = FakeClock()
    pool = make_pool(2, clock=clock)
    k0, k1 = handles(pool)
    pool.disable(k0, "401 invalid key")
    clock.advance(10 * 365 * 86400)
    assert secrets_of(pool, 4) == [K1, K1, K1, K1]
    pool.cool_down(k0, 0, "429")
    assert pool.acquire(exclude=[k1]) is None
    assert pool.snapshot()[0].state is KeyState.DISABLED


def test_a_sibling_account_wide_cooldown_keeps_the_disabled_reason() -> None:
    """A key disabled for 401 stays disabled *and says why* when its account is later
    cooled through another key's daily limit (the dashboard shows the reason)."""
    clock = FakeClock()
    pool = make_pool(2, clock=clock, accounts=["alice", "alice"])
    k0, k1 = handles(pool)
    pool.disable(k0, "401 invalid key")
    pool.cool_down(k1, 900, "429 rate limited", account_wide=True)
    clock.advance(900)
    view = pool.snapshot()[0]
    assert (view.state, view.reason) == (KeyState.DISABLED, "401 invalid key")
    assert repr(k0).endswith("401 invalid key>")


# --- soonest_available, snapshot, counts -------------------------------------------------------


def test_soonest_available() -> None:
    clock = FakeClock()
    pool = make_pool(3, clock=clock)
    k0, k1, k2 = handles(pool)
    assert pool.soonest_available() == 0.0
    pool.cool_down(k0, 30, "429")
    pool.cool_down(k1, 10, "429")
    assert pool.soonest_available() == 0.0  # k2 is free now
    pool.cool_down(k2, 20, "429")
    assert pool.soonest_available() == 10.0
    pool.disable(k1, "401")
    assert pool.soonest_available() == 20.0
    clock.advance(25)
    assert pool.soonest_available() == 0.0
    assert pool.soonest_available(now=1000.0) == 20.0


def test_soonest_available_is_none_when_all_disabled() -> None:
    pool = make_pool(2)
    for key in handles(pool):
        pool.disable(key, "401")
    assert pool.soonest_available() is None
    assert pool.acquire() is None


def test_snapshot_and_counts_follow_the_clock() -> None:
    clock = FakeClock()
    pool = make_pool(3, clock=clock)
    k0, k1, _ = handles(pool)
    pool.cool_down(k0, 40, "429 rate limited")
    pool.disable(k1, "401 invalid key")
    clock.advance(15)
    views = pool.snapshot()
    assert views[0] == KeyView(key_id(K0), mask_key(K0), None, KeyState.COOLING, 25.0,
                               "429 rate limited", "", 1)
    assert views[1].state is KeyState.DISABLED and views[1].reason == "401 invalid key"
    assert views[2].state is KeyState.AVAILABLE and views[2].reason == ""
    assert pool.counts() == {"available": 1, "free_limited": 0, "cooling": 1, "disabled": 1}
    clock.advance(25)
    assert pool.snapshot()[0].state is KeyState.AVAILABLE
    assert pool.snapshot()[0].reason == ""  # a past rest's reason is not shown
    assert pool.counts() == {"available": 2, "free_limited": 0, "cooling": 0, "disabled": 1}


def test_the_secret_appears_in_no_view_repr_or_str() -> None:
    pool = make_pool(3, accounts=["alice", None, "bob"])
    keys = handles(pool)
    pool.cool_down(keys[0], 60, "429 rate limited")
    pool.disable(keys[1], "401 invalid key")
    snapshot = pool.snapshot()
    texts = [repr(snapshot), str(snapshot), repr(pool), str(pool)]
    texts += [repr(v) for v in snapshot] + [str(v) for v in snapshot]
    texts += [repr(dataclasses.asdict(v)) for v in snapshot]
    texts += [repr(k) for k in keys] + [str(k) for k in keys] + [f"{k}" for k in keys]
    for secret in SECRETS[:3]:
        body = secret[len("sk-or-v1-"):]
        for text in texts:
            assert secret not in text
            # not even a long run of the secret part
            assert not any(body[i:i + 8] in text for i in range(len(body) - 7))


def test_key_repr_shape() -> None:
    pool = make_pool(1)
    key = pool.acquire()
    assert key is not None
    assert repr(key) == f"<Key {key_id(K0)} {mask_key(K0)} ok>"
    pool.disable(key, "401 invalid key")
    assert repr(key) == f"<Key {key_id(K0)} {mask_key(K0)} 401 invalid key>"


# --- mask_key / key_id ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "masked"),
    [
        ("sk-or-v1-0123456789abcdef0123456789abcdefWXYZ", "sk-or-…WXYZ"),
        ("sk-or-0123456789", "sk-or-…6789"),  # exactly 16 chars
        ("sk-or-012345678", "…(15 chars)"),  # too short to show anything
        ("sk-or-", "…(6 chars)"),
        ("", "…(0 chars)"),
        ("sk-xx-0123456789abcdefQRST", "sk-…QRST"),  # another prefix: only 3 chars shown
        ("abcdefghijklmnopqrstuvwxyz", "abc…wxyz"),
    ],
)
def test_mask_key(key: str, masked: str) -> None:
    assert mask_key(key) == masked


def test_key_id_is_8_hex_of_sha256() -> None:
    assert key_id("abc") == "ba7816bf"
    assert key_id(K0) == hashlib.sha256(K0.encode()).hexdigest()[:8]
    assert key_id(K0) != key_id(K1)


# --- property: a model of the pool ---------------------------------------------------------------


@dataclass
class Model:
    """What the pool must do, kept independently of it."""

    accounts: list[str | None]
    strategy: str
    same: bool
    now: float = 1000.0
    until: list[float] = field(default_factory=list)
    disabled: list[bool] = field(default_factory=list)
    last: int | None = None
    cursor: int = 0

    def usable(self, i: int, exclude: set[int]) -> bool:
        return not self.disabled[i] and self.until[i] <= self.now and i not in exclude


ACCOUNTS = st.sampled_from([None, "a", "b"])
OPS = st.one_of(
    st.tuples(st.just("acquire"), st.sets(st.integers(0, 4), max_size=4)),
    st.tuples(st.just("cool"), st.integers(0, 4), st.floats(-10, 500, allow_nan=False),
              st.booleans()),
    st.tuples(st.just("disable"), st.integers(0, 4)),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.5, 1.0, 10.0, 100.0, 1000.0])),
)


@settings(max_examples=100, database=None, deadline=None)
@given(
    accounts=st.lists(ACCOUNTS, min_size=1, max_size=5),
    strategy=st.sampled_from(["round-robin", "first", "random"]),
    same=st.booleans(),
    seed=st.integers(0, 2**16),
    ops=st.lists(OPS, max_size=40),
)
def test_pool_follows_the_model(
    accounts: list[str | None], strategy: str, same: bool, seed: int,
    ops: list[tuple[object, ...]],
) -> None:
    """Never an excluded, disabled or cooling key; None only when nothing is usable; the
    exact key for the deterministic strategies; cooldowns and soonest_available exact."""
    n = len(accounts)
    clock = FakeClock()
    pool = make_pool(n, strategy=strategy, same=same, accounts=accounts, clock=clock, seed=seed)
    handed = acquire_all(pool)
    order = [view.id for view in pool.snapshot()]
    keys = sorted(handed, key=lambda k: order.index(k.id))
    index = {id(k): i for i, k in enumerate(keys)}
    m = Model(accounts, strategy, same, until=[0.0] * n, disabled=[False] * n)
    m.last = index[id(handed[-1])]
    for op in ops:
        kind = op[0]
        if kind == "acquire":
            exclude = {i for i in op[1] if i < n}  # type: ignore[attr-defined]
            got = pool.acquire(exclude=[keys[i] for i in exclude])
            usable = [i for i in range(n) if m.usable(i, exclude)]
            if not usable:
                assert got is None
                continue
            assert got is not None
            gi = index[id(got)]
            assert gi in usable
            if same and m.last is not None and m.usable(m.last, exclude):
                assert gi == m.last
            elif strategy != "random":
                start = m.cursor if strategy == "round-robin" else 0
                expected = next(j % n for j in range(start, start + n) if (j % n) in usable)
                assert gi == expected
                m.cursor = (expected + 1) % n
            m.last = gi
        elif kind == "cool":
            i = op[1] % n  # type: ignore[operator]
            seconds, wide = op[2], op[3]
            until = m.now + max(seconds, 0.0)  # type: ignore[call-overload]
            targets = [j for j in range(n) if accounts[j] == accounts[i]] if (
                wide and accounts[i] is not None) else [i]
            got_targets = pool.cool_down(keys[i], seconds, "429",  # type: ignore[arg-type]
                                         account_wide=bool(wide))
            # disabled keys of the account may or may not be listed; the others exactly
            assert [j for j in (index[id(k)] for k in got_targets) if not m.disabled[j]] == [
                j for j in targets if not m.disabled[j]]
            for j in targets:
                m.until[j] = max(m.until[j], until)
        elif kind == "disable":
            i = op[1] % n  # type: ignore[operator]
            pool.disable(keys[i], "401")
            m.disabled[i] = True
        else:
            clock.advance(op[1])  # type: ignore[arg-type]
            m.now += op[1]  # type: ignore[operator]
        waits = [m.until[j] - m.now for j in range(n) if not m.disabled[j]]
        assert pool.soonest_available() == (max(min(waits), 0.0) if waits else None)
        states = [KeyState.DISABLED if m.disabled[j] else
                  KeyState.COOLING if m.until[j] > m.now else KeyState.AVAILABLE
                  for j in range(n)]
        assert [v.state for v in pool.snapshot()] == states


def test_upstream_words_quoting_a_key_are_scrubbed_wherever_they_are_kept() -> None:
    pool = make_pool(2)
    k0, k1 = handles(pool)
    words = f"invalid key {K0} (also {K1.upper()})"
    pool.disable(k0, "401 invalid key", words)
    pool.cool_down(k1, 10, "429 x", message=words)
    pool.record_in_band_error(k1, 429, words)
    for view in pool.snapshot():
        for text in (view.message, view.stats.last_error):
            assert K0 not in text and K1 not in text and K1.upper() not in text
            assert K0[-12:] not in text
    assert pool.snapshot()[0].message.startswith(f"invalid key {mask_key(K0)} (also ")


# --- free-model rests, exported and restored ------------------------------------------------------


def test_free_rests_holds_strictly_before_the_latest_free_rest_ends() -> None:
    # protects: free_rests() is False on a fresh pool and compares the given `now`, strictly
    clock = FakeClock(now=0.0)
    pool = make_pool(2, clock=clock)
    assert not pool.free_rests() and not pool.free_rests(now=0.5)
    pool.cool_down(handles(pool)[0], 60, "429 free", free_only=True)
    assert pool.free_rests() and pool.free_rests(now=59.9)
    assert not pool.free_rests(now=60.0) and not pool.free_rests(now=500.0)


def test_a_free_only_rest_is_exported_as_free_only_however_near_its_end() -> None:
    # protects: export() marks every free-only rest still running as free-only
    pool = KeyPool([(K0, None)], clock=FakeClock(now=0.0), wall=lambda: 0.0)
    (key,) = pool
    pool.cool_down(key, 0.5, "429 free", free_only=True)
    (saved,) = pool.export()
    assert (saved.rest_until, saved.free_only) == (0.5, True)


def test_a_restored_free_only_rest_counts_in_free_rests_until_it_ends() -> None:
    # protects: restore() records where a free-only rest ends, for free_rests()
    pool = KeyPool([(K0, None)], clock=FakeClock(now=0.0), wall=lambda: 1e6)
    pool.cool_down(next(iter(pool)), 60, "429 free", free_only=True)
    again = KeyPool([(K0, None)], clock=FakeClock(now=5.0), wall=lambda: 1e6)
    assert again.restore(pool.export()) == 1
    assert again.free_rests() and again.free_rests(now=64.9)
    assert not again.free_rests(now=65.0)
