"""Durable key state: records and their JSON form, the file store, the background saver.

The file store is tested on real files (modes, atomic replacement, corrupt files moved
aside, a writer killed with SIGKILL mid-save); the saver on a real event loop with a real
store that records what it was asked to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orproxy.state import (
    FileStore,
    KeyRecord,
    MemoryStore,
    Snapshot,
    StateFormatError,
    StateSaver,
    clean_text,
    decode,
    encode,
)
from orproxy.state.store import FORMAT, MAX_MESSAGE_CHARS, MAX_REASON_CHARS, VERSION
from tests import statewriter

ROOT = Path(__file__).resolve().parent.parent


def key_id(secret: str) -> str:
    """A key's short id, as the key pool makes it (8 hex of sha256)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


SECRETS = ["sk-or-v1-" + hashlib.sha256(f"state {i}".encode()).hexdigest() for i in range(4)]
NOW = 1_700_000_000.5  # 2023-11-14T22:13:20.5Z
STAMP = "20231114T221320.500000Z"


def record(id_: str, **changes: Any) -> KeyRecord:
    fields: dict[str, Any] = {
        "id": id_, "rest_until": NOW + 60, "rest_scope": "free", "disabled": False,
        "reason": "429 free-models-per-day", "message": "Rate limit exceeded: free-models-per-day",
        "counters": {"requests": 12, "successes": 10, "rate_limited": 2, "cost": 0.25},
        "updated": NOW,
    }
    fields.update(changes)
    return KeyRecord(**fields)


def snapshot(*records: KeyRecord, saved_at: float = NOW, writer: str = "host:1") -> Snapshot:
    return Snapshot({r.id: r for r in records}, saved_at=saved_at, writer=writer)


def sample() -> Snapshot:
    ids = [key_id(s) for s in SECRETS]
    return snapshot(
        record(ids[0]), record(ids[1], rest_until=0.0, rest_scope="all"),
        record(ids[2], disabled=True, reason="401 invalid key", message="User not found."),
        record(ids[3], counters={}))


def document(*records: object, **header: Any) -> dict[str, Any]:
    """A file's JSON as a dict, for writing hand-made (possibly bad) files."""
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "saved_at": NOW,
                           "writer": "host:1", "keys": list(records)}
    doc.update(header)
    return doc


def record_json(id_: str = "0123abcd", **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(encode(snapshot(record("0123abcd"))))["keys"][0]
    doc["id"] = id_
    doc.update(changes)
    return doc


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "keys.json"


def store_at(path: Path) -> FileStore:
    return FileStore(path, clock=lambda: NOW)


# --- records --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["0123ABCD", "0123abc", "0123abcde", "0123abcg", "",
                                     SECRETS[0], 12345678])
def test_a_record_id_is_8_lowercase_hex_and_the_error_never_quotes_it(bad_id: Any) -> None:
    with pytest.raises(ValueError, match="id is not 8 lowercase hex") as info:
        record(bad_id)
    assert bad_id == "" or str(bad_id) not in str(info.value)


@pytest.mark.parametrize(("field_name", "value", "why"), [
    ("rest_until", math.nan, "finite"), ("rest_until", math.inf, "finite"),
    ("rest_until", -1.0, "range"), ("rest_until", 1e300, "range"), ("rest_until", True, "number"),
    ("rest_until", "5", "number"), ("updated", -math.inf, "finite"), ("updated", 10**400, "range"),
    ("rest_scope", "paid", "rest_scope"), ("disabled", 1, "disabled"),
    ("reason", "x" * (MAX_REASON_CHARS + 1), "longer"), ("reason", 5, "string"),
    ("message", "x" * (MAX_MESSAGE_CHARS + 1), "longer"), ("message", "a\nb", "printable"),
    ("message", "a\u202eb", "printable"), ("message", "bad key " + SECRETS[1], "key"),
    ("message", "SK-OR-V1-x", "key"), ("counters", {"requests": math.nan}, "finite"),
    ("counters", {"requests": -1}, "range"), ("counters", {"Requests": 1}, "counter name"),
    ("counters", {"re-quests": 1}, "counter name"), ("counters", {"x": True}, "number"),
    ("counters", [1, 2], "object"), ("counters", {f"c{i}": 1 for i in range(65)}, "entries"),
])
def test_every_field_is_validated(field_name: str, value: Any, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        record("0123abcd", **{field_name: value})


def test_records_are_immutable_and_normalised() -> None:
    counters = {"requests": 3}
    r = record("0123abcd", counters=counters, rest_until=5)
    counters["requests"] = 4  # the caller's dict is copied, not shared
    assert r.counters == {"requests": 3.0} and isinstance(r.counters["requests"], float)
    assert isinstance(r.rest_until, float)
    with pytest.raises(TypeError):
        r.counters["requests"] = 9  # type: ignore[index]


def test_a_snapshot_maps_each_id_to_its_record() -> None:
    with pytest.raises(ValueError, match="id"):
        Snapshot({"00000000": record("11111111")})
    with pytest.raises(ValueError, match="writer"):
        Snapshot(writer="x\ny")


def test_clean_text_makes_any_upstream_text_acceptable() -> None:
    text = f"Key {SECRETS[0]} is\nlimited\u202e; key={SECRETS[1]}. " + "pad " * 100
    cleaned = clean_text(text, MAX_MESSAGE_CHARS)
    assert "sk-or-" not in cleaned.lower() and "[key]" in cleaned
    assert cleaned.isprintable() and len(cleaned) == MAX_MESSAGE_CHARS
    assert record("0123abcd", message=cleaned).message == cleaned


# --- JSON -----------------------------------------------------------------------------------


def test_round_trip_through_json() -> None:
    snap = sample()
    decoded = decode(encode(snap))
    assert decoded.dropped == ()
    assert decoded.snapshot == snap


def test_the_encoding_is_one_record_per_line() -> None:
    lines = encode(sample()).decode().splitlines()
    assert len(lines) == 1 + 4 + 1
    assert all(json.loads(line.rstrip(","))["id"] for line in lines[1:-1])


def test_unknown_fields_are_ignored() -> None:
    doc = document(record_json("0123abcd", future="x"), future={"a": 1})
    decoded = decode(json.dumps(doc).encode())
    assert decoded.dropped == () and list(decoded.snapshot.keys) == ["0123abcd"]


@pytest.mark.parametrize(("header", "why"), [
    ({"version": VERSION + 1}, "newer"), ({"version": 0}, "version"), ({"version": "1"}, "version"),
    ({"version": True}, "version"), ({"version": None}, "version"), ({"format": "other"}, "format"),
    ({"keys": {"0123abcd": {}}}, "keys is not a list"), ({"saved_at": math.nan}, "saved_at"),
    ({"writer": 5}, "writer"),
])
def test_a_bad_header_makes_the_whole_file_unreadable(header: dict[str, Any], why: str) -> None:
    with pytest.raises(StateFormatError, match=why):
        decode(json.dumps(document(record_json(), **header)).encode())


def test_a_missing_header_field_makes_the_whole_file_unreadable() -> None:
    doc = document()
    del doc["saved_at"]
    with pytest.raises(StateFormatError, match="missing saved_at"):
        decode(json.dumps(doc).encode())


@pytest.mark.parametrize(("raw", "why"), [
    (b"", "not JSON"), (b"{", "not JSON"), (b"\xff\xfe", "UTF-8"), (b"[]", "list"),
    (b"null", "null"), (b"[" * 100_000, "not JSON"), (b"1" * 5000, "not JSON"),
])
def test_hostile_bytes_are_a_format_error(raw: bytes, why: str) -> None:
    with pytest.raises(StateFormatError, match=why):
        decode(raw)


def test_bad_records_are_dropped_with_a_reason_and_the_rest_kept() -> None:
    good = record_json("0000000a")
    doc = document(good, record_json("NOT-HEX!"), record_json("0000000b", rest_until=None),
                   record_json("0000000c", counters={"requests": "1"}), ["not", "a", "record"],
                   {k: v for k, v in record_json("0000000d").items() if k != "updated"},
                   record_json("0000000a"))
    decoded = decode(json.dumps(doc).encode())
    assert list(decoded.snapshot.keys) == ["0000000a"]
    reasons = [str(d) for d in decoded.dropped]
    assert reasons == [
        "record 1: id is not 8 lowercase hex digits",
        "record 2 (0000000b): rest_until must be a number",
        "record 3 (0000000c): counter requests must be a number",
        "record 4: a JSON list, not an object",
        "record 5 (0000000d): missing updated",
        "record 6 (0000000a): duplicate id",
    ]


def test_non_finite_numbers_in_a_file_drop_the_record() -> None:
    for raw in ("NaN", "Infinity", "-Infinity", "1e999"):
        text = json.dumps(document(record_json())).replace(f'"updated": {NOW}', f'"updated": {raw}')
        assert raw in text
        decoded = decode(text.encode())
        assert decoded.snapshot.keys == {} and "finite" in decoded.dropped[0].reason, raw


ids = st.text(alphabet="0123456789abcdef", min_size=8, max_size=8)
epochs = st.floats(min_value=0.0, max_value=1e10, allow_nan=False)
free_text = st.text(max_size=400)
counter_names = st.builds(lambda first, rest: first + rest,
                          st.sampled_from("abcxyz"), st.text("az09_", max_size=39))
counters = st.dictionaries(
    counter_names,
    st.integers(min_value=0, max_value=2**64) | st.floats(min_value=0.0, max_value=1e300),
    max_size=8)
records = st.builds(
    KeyRecord, id=ids, rest_until=epochs, rest_scope=st.sampled_from(["all", "free"]),
    disabled=st.booleans(), reason=free_text.map(lambda t: clean_text(t, MAX_REASON_CHARS)),
    message=free_text.map(lambda t: clean_text(t, MAX_MESSAGE_CHARS)), counters=counters,
    updated=epochs)
snapshots = st.builds(lambda rs, at: Snapshot({r.id: r for r in rs}, saved_at=at, writer="w:1"),
                      st.lists(records, max_size=6), epochs)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)


@given(snapshots)
def test_any_valid_snapshot_round_trips(snap: Snapshot) -> None:
    data = encode(snap)
    assert b"sk-or-" not in data.lower()
    assert decode(data) == decode(encode(decode(data).snapshot))
    assert decode(data).snapshot == snap and decode(data).dropped == ()


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_a_format_error(raw: bytes) -> None:
    with contextlib.suppress(StateFormatError):
        decode(raw)


@given(st.sampled_from(["id", "rest_until", "rest_scope", "disabled", "reason", "message",
                        "counters", "updated"]), json_values)
def test_any_value_in_any_field_is_kept_valid_or_dropped(name: str, value: Any) -> None:
    doc = document(record_json("0000000a"), record_json("0000000b", **{name: value}))
    decoded = decode(json.dumps(doc).encode())
    assert "0000000a" in decoded.snapshot.keys
    assert len(decoded.snapshot.keys) + len(decoded.dropped) == 2
    for kept in decoded.snapshot.keys.values():
        assert decode(encode(snapshot(kept))).snapshot.keys == {kept.id: kept}


@given(json_values)
def test_any_json_document_decodes_or_raises_a_format_error(value: Any) -> None:
    for doc in (value, document(value), document(keys=value)):
        with contextlib.suppress(StateFormatError):
            decode(json.dumps(doc).encode())


# --- the file store -------------------------------------------------------------------------


def test_file_round_trip(path: Path) -> None:
    store = store_at(path)
    snap = sample()
    store.save(snap)
    assert store_at(path).load() == snap
    assert store.load() == snap


def test_a_missing_file_is_an_empty_snapshot_and_load_creates_nothing(path: Path,
                                                                      caplog: Any) -> None:
    assert store_at(path).load() == Snapshot()
    assert not path.parent.exists()
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_save_creates_private_directories_and_a_private_file(tmp_path: Path,
                                                             umask: int) -> None:
    path = tmp_path / "a" / "b" / "keys.json"
    old = os.umask(umask)  # the modes must not depend on the umask
    try:
        store_at(path).save(sample())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700


def test_save_leaves_an_existing_directory_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    store_at(tmp_path / "keys.json").save(sample())
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_save_replaces_the_file_whole(path: Path) -> None:
    store = store_at(path)
    first = snapshot(record("0000000a"))
    store.save(first)
    with path.open("rb") as old:  # a reader of the old version keeps a whole old version
        before = path.stat().st_ino
        store.save(sample())
        assert decode(old.read()).snapshot == first
    assert path.stat().st_ino != before  # a new file was renamed over, not rewritten in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.json"]
    assert store.load() == sample()


def test_a_failed_save_leaves_the_old_file_and_no_temp_file(path: Path) -> None:
    store = store_at(path)
    store.save(sample())
    blocker = path.with_name("blocked")
    blocker.mkdir()
    (blocker / "x").write_text("x")
    with pytest.raises(OSError):
        FileStore(blocker).save(sample())  # os.replace onto a non-empty directory fails
    assert sorted(p.name for p in path.parent.iterdir()) == ["blocked", "keys.json"]
    assert store.load() == sample()


def directory_with_a_file(p: Path) -> None:
    p.mkdir()
    (p / "inside").write_text("x")


CORRUPT: dict[str, tuple[Callable[[Path], object], str]] = {
    "bad JSON": (lambda p: p.write_bytes(b'{"format": nope}'), "not JSON"),
    "truncated JSON": (lambda p: p.write_bytes(encode(sample())[:300]), "not JSON"),
    "empty": (lambda p: p.write_bytes(b""), "not JSON"),
    "a JSON list": (lambda p: p.write_text("[1, 2]"), "JSON list, not an object"),
    "wrong version": (lambda p: p.write_text(json.dumps(document(version=VERSION + 1))),
                      "newer"),
    "not ours": (lambda p: p.write_text('{"keys": []}'), "format"),
    "non-hex id": (lambda p: p.write_text(json.dumps(document(record_json("0123ABCD")))),
                   "id is not 8 lowercase hex"),
    "NaN": (lambda p: p.write_text(json.dumps(document(record_json(rest_until=math.nan)))),
            "finite"),
    "inf": (lambda p: p.write_text(json.dumps(document(record_json(updated=math.inf)))),
            "finite"),
    "not UTF-8": (lambda p: p.write_bytes(b"\xff" * 10), "UTF-8"),
    "a directory": (directory_with_a_file, "not a regular file"),
    "a FIFO": (lambda p: os.mkfifo(p), "not a regular file"),
}


@pytest.mark.parametrize("variant", CORRUPT)
def test_an_unusable_file_is_moved_aside_with_one_warning_and_start_is_clean(
        variant: str, path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make, why = CORRUPT[variant]
    path.parent.mkdir(mode=0o700)
    make(path)
    original = path.read_bytes() if path.is_file() else None
    store = store_at(path)
    assert store.load().keys == {}
    aside = path.with_name(f"keys.json.corrupt-{STAMP}")
    assert not path.exists() and (aside.exists() or aside.is_fifo())
    if original is not None:
        assert aside.read_bytes() == original  # kept for the operator, unchanged
    [warning] = warnings_of(caplog)
    assert str(path) in warning and str(aside) in warning and why in warning
    store.save(sample())  # and the proxy carries on
    assert store_at(path).load() == sample()


def test_a_file_with_some_bad_records_keeps_the_good_ones_and_is_moved_aside(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.parent.mkdir()
    path.write_text(json.dumps(document(record_json("0000000a"), record_json("0000000b",
                                                                             updated=-5))))
    loaded = store_at(path).load()
    assert list(loaded.keys) == ["0000000a"]
    [warning] = warnings_of(caplog)
    assert "1 bad record(s)" in warning and "0000000b" in warning and "kept 1" in warning
    assert path.with_name(f"keys.json.corrupt-{STAMP}").exists() and not path.exists()


def test_moving_aside_never_overwrites_an_earlier_corrupt_file(path: Path) -> None:
    path.parent.mkdir()
    for content in ("first", "second", "third"):
        path.write_text(content)
        assert store_at(path).load() == Snapshot()  # same clock: the same timestamp
    kept = sorted(p.read_text() for p in path.parent.glob("keys.json.corrupt-*"))
    assert kept == ["first", "second", "third"]


def test_when_the_file_cannot_be_moved_aside_the_start_is_still_clean(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parent = tmp_path / "file"
    parent.write_text("not a directory")
    assert FileStore(parent / "keys.json").load() == Snapshot()  # ENOTDIR: unusable
    [warning] = warnings_of(caplog)
    assert "could not be moved" in warning


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_load_removes_temp_files_of_dead_or_stale_saves_only(path: Path) -> None:
    store = store_at(path)
    store.save(sample())
    dead = path.with_name(f"keys.json.tmp-{dead_pid()}-0badc0de")
    garbled = path.with_name("keys.json.tmp-garbled")
    live = path.with_name(f"keys.json.tmp-{os.getpid()}-11111111")
    stale = path.with_name(f"keys.json.tmp-{os.getpid()}-22222222")
    other = path.with_name("keys.json.bak")
    for p in (dead, garbled, live, stale, other):
        p.write_bytes(encode(sample())[:100])
    os.utime(stale, (NOW - 3600, NOW - 3600))
    os.utime(live, (NOW - 1, NOW - 1))
    assert store.load() == sample()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["keys.json", live.name, other.name])


def test_poll_sees_another_writers_save_and_not_our_own(path: Path) -> None:
    ours, theirs = store_at(path), store_at(path)
    assert ours.poll() is None  # no file yet
    ours.save(snapshot(record("0000000a")))
    assert ours.poll() is None
    theirs.save(sample())
    assert ours.poll() == sample()
    assert ours.poll() is None  # told once
    assert theirs.poll() is None
    ours.save(snapshot(record("0000000c")))
    assert theirs.poll() == snapshot(record("0000000c"))
    assert ours.load() == snapshot(record("0000000c")) and ours.poll() is None


def test_poll_ignores_a_bad_file_written_elsewhere_with_one_warning(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = store_at(path)
    store.save(sample())
    other = path.with_name("other")
    other.write_text("{broken")
    os.replace(other, path)
    assert store.poll() is None and store.poll() is None
    assert len(warnings_of(caplog)) == 1
    assert path.read_text() == "{broken"  # poll moves nothing; the next load or save will


def test_no_secret_is_ever_written(path: Path) -> None:
    records = [record(key_id(s), reason=clean_text(f"401 for {s}", MAX_REASON_CHARS),
                      message=clean_text(f"Invalid key {s}\nUser not found", MAX_MESSAGE_CHARS))
               for s in SECRETS]
    store_at(path).save(snapshot(*records))
    data = path.read_bytes()
    assert b"sk-or-" not in data.lower()
    assert all(s[-12:].encode() not in data for s in SECRETS)
    assert key_id(SECRETS[0]).encode() in data
    with pytest.raises(ValueError) as info:  # a key passed as an id is refused, unquoted
        record(SECRETS[0])
    assert SECRETS[0] not in str(info.value)


# --- crashes --------------------------------------------------------------------------------

KILL_ROUNDS = 32


def last_saved(lines: bytes) -> int:
    found = re.findall(rb"^saved (\d+)$", lines, re.MULTILINE)
    assert found, lines
    return int(found[-1])


def wait_for_temp_file(path: Path, seconds: float = 1.0) -> None:
    """Until a save is under way (a temp file exists), or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(n.startswith("keys.json.tmp-") for n in os.listdir(path.parent)):
            return


def test_kill_9_during_writes_never_leaves_a_file_that_fails_to_load(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    mid_write = 0
    for round_ in range(KILL_ROUNDS):
        where = f"seed {seed}, round {round_}"
        writer = subprocess.Popen([sys.executable, "-m", "tests.statewriter", str(path)],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert writer.stdout is not None
        first = writer.stdout.readline()  # its first save is done: kill from here on
        time.sleep(rng.uniform(0.0, 0.06))
        if round_ % 2:  # every other round aims at the moment a temp file exists
            wait_for_temp_file(path)
        writer.send_signal(signal.SIGKILL)
        rest, err = writer.communicate()
        assert writer.returncode == -signal.SIGKILL, (where, err)
        saved = last_saved(first + rest)
        mid_write += any(path.parent.glob("keys.json.tmp-*"))
        loaded = FileStore(path).load()
        generation = round(loaded.saved_at - statewriter.BASE)
        assert generation in (saved, saved + 1), where  # the old file or the new, whole
        assert loaded == statewriter.snapshot_of(generation), where
        assert sorted(p.name for p in path.parent.iterdir()) == ["keys.json"], where
    assert warnings_of(caplog) == []
    # Otherwise the test proved nothing: at least some kills must land inside a save.
    assert mid_write >= KILL_ROUNDS // 4, (seed, mid_write)


# --- the saver ------------------------------------------------------------------------------


@dataclass
class Save:
    snapshot: Snapshot
    thread: int


@dataclass
class RecordingStore(MemoryStore):
    """A real MemoryStore that also records each save; it can fail or be held on purpose."""

    failures: list[BaseException] = field(default_factory=list)  # raised by the next saves
    hold: threading.Event | None = None  # a save waits for it
    saves: list[Save] = field(default_factory=list)
    writing: int = 0
    most_at_once: int = 0

    def __post_init__(self) -> None:
        super().__init__()
        self._count = threading.Lock()

    def save(self, snapshot: Snapshot) -> None:
        with self._count:
            self.writing += 1
            self.most_at_once = max(self.most_at_once, self.writing)
        try:
            self.saves.append(Save(snapshot, threading.get_ident()))
            if self.hold is not None:
                assert self.hold.wait(10)
            if self.failures:
                raise self.failures.pop(0)
            super().save(snapshot)
        finally:
            with self._count:
                self.writing -= 1


class Pool:
    """Stands in for the key pool's export: a counter the test bumps; records when and on
    which thread it was called."""

    def __init__(self) -> None:
        self.requests = 0
        self.threads: list[int] = []
        self.times: list[float] = []  # time.monotonic() of each export: when a write begins

    def export(self) -> Snapshot:
        self.threads.append(threading.get_ident())
        self.times.append(time.monotonic())
        return snapshot(record("0000000a", counters={"requests": self.requests}))


def make_saver(store: RecordingStore, pool: Pool, **kwargs: Any) -> StateSaver:
    kwargs.setdefault("counters_interval", 60.0)
    kwargs.setdefault("urgent_delay", 0.02)
    return StateSaver(store, pool.export, clock=lambda: NOW, writer="test:1", **kwargs)


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> float:
    """Seconds until ``condition`` holds (fails after ``seconds``)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, "condition never held"
        await asyncio.sleep(0.002)
    return time.monotonic() - start


def saved_requests(store: RecordingStore) -> list[float]:
    return [s.snapshot.keys["0000000a"].counters["requests"] for s in store.saves]


@pytest.mark.anyio
async def test_urgent_marks_are_saved_within_the_delay_and_coalesced() -> None:
    store, pool = RecordingStore(), Pool()
    saver = make_saver(store, pool, urgent_delay=0.05)
    for _ in range(100):
        saver.mark(urgent=True)
    elapsed = await until(lambda: len(store.saves) == 1)
    assert 0.04 <= elapsed < 1.0  # the counters interval is a minute
    await asyncio.sleep(0.15)
    assert len(store.saves) == 1
    assert store.saves[0].snapshot.saved_at == NOW and store.saves[0].snapshot.writer == "test:1"
    await saver.close()


@pytest.mark.anyio
async def test_an_urgent_mark_does_not_wait_for_the_counters_interval() -> None:
    store, pool = RecordingStore(), Pool()
    saver = make_saver(store, pool, counters_interval=60.0)
    saver.mark()  # the first counter change is written at once ...
    await until(lambda: len(store.saves) == 1)
    saver.mark()  # ... the next waits a minute ...
    await asyncio.sleep(0.05)
    assert len(store.saves) == 1
    saver.mark(urgent=True)  # ... unless a key's state changes meanwhile
    assert await until(lambda: len(store.saves) == 2) < 1.0
    await saver.close()
    assert len(store.saves) == 2  # nothing left to flush


@pytest.mark.anyio
async def test_counter_marks_are_written_at_most_once_per_interval() -> None:
    store, pool = RecordingStore(), Pool()
    interval = 0.15
    saver = make_saver(store, pool, counters_interval=interval)
    start = time.monotonic()
    while time.monotonic() - start < 0.8:
        pool.requests += 1
        saver.mark()
        await asyncio.sleep(0.001)
    await saver.close()
    starts = pool.times
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert 4 <= len(starts) <= 8, starts
    assert min(gaps[:-1]) >= interval * 0.95, gaps  # the last one is close()'s flush
    assert saved_requests(store)[-1] == pool.requests  # close() wrote the final count


@pytest.mark.anyio
async def test_writes_run_in_a_worker_thread_and_exports_on_the_loop() -> None:
    store, pool = RecordingStore(), Pool()
    saver = make_saver(store, pool)
    saver.mark(urgent=True)
    await until(lambda: len(store.saves) == 1)
    loop_thread = threading.get_ident()
    assert store.saves[0].thread != loop_thread
    assert pool.threads == [loop_thread]  # the key pool is only touched on the loop
    await saver.close()


@pytest.mark.anyio
async def test_one_write_at_a_time_and_marks_during_it_cause_one_more() -> None:
    store, pool = RecordingStore(hold=threading.Event()), Pool()
    saver = make_saver(store, pool)
    saver.mark(urgent=True)
    await until(lambda: len(store.saves) == 1)  # the first write is now held
    for _ in range(50):
        pool.requests += 1
        saver.mark(urgent=True)
        saver.mark()
    await asyncio.sleep(0.1)
    assert len(store.saves) == 1 and "writing" in repr(saver)
    assert store.hold is not None
    store.hold.set()
    await until(lambda: len(store.saves) == 2)
    await asyncio.sleep(0.1)
    assert len(store.saves) == 2 and store.most_at_once == 1
    assert saved_requests(store) == [0, 50]
    await saver.close()


@pytest.mark.anyio
async def test_close_flushes_what_is_pending_and_waits_for_a_write_in_flight() -> None:
    store, pool = RecordingStore(hold=threading.Event()), Pool()
    saver = make_saver(store, pool)
    saver.mark()
    await until(lambda: len(store.saves) == 1)  # held in flight
    pool.requests = 7
    saver.mark()  # pending behind it
    closing = asyncio.ensure_future(saver.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    assert store.hold is not None
    store.hold.set()
    await closing
    assert saved_requests(store) == [0, 7] and store.load().keys["0000000a"].counters == {
        "requests": 7.0}
    assert saver.stats().saves == 2 and not saver.stats().pending
    await saver.close()  # twice is harmless
    saver.mark(urgent=True)  # after close: nothing more is written
    await asyncio.sleep(0.05)
    assert len(store.saves) == 2


@pytest.mark.anyio
async def test_close_with_nothing_pending_writes_nothing() -> None:
    store, pool = RecordingStore(), Pool()
    saver = make_saver(store, pool)
    await saver.close()
    assert store.saves == []


@pytest.mark.anyio
async def test_a_failing_store_is_logged_once_per_kind_retried_and_survived(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orproxy.state")
    full = OSError(errno.ENOSPC, "No space left on device", "/var/lib/orproxy/keys.json")
    denied = OSError(errno.EACCES, "Permission denied", "/var/lib/orproxy/keys.json")
    store, pool = RecordingStore(failures=[full, full, full, denied, denied]), Pool()
    saver = make_saver(store, pool, counters_interval=0.05)
    saver.mark(urgent=True)  # never raises, though the store does
    await until(lambda: saver.stats().saves == 1)
    stats = saver.stats()
    assert stats.failures == 5 and stats.last_saved_at == NOW and not stats.pending
    warnings = warnings_of(caplog)
    assert len(warnings) == 2, warnings
    assert "OSError/28" in warnings[0] and "No space left" in warnings[0]
    assert "PermissionError/13" in warnings[1] and "Permission denied" in warnings[1]
    gaps = [b - a for a, b in itertools.pairwise(pool.times)]
    assert min(gaps) >= 0.045  # retried at the interval, not in a tight loop
    assert any("saved again" in r.getMessage() for r in caplog.records)
    await saver.close()


@pytest.mark.anyio
async def test_a_failing_export_is_logged_without_secrets_and_survived(
        caplog: pytest.LogCaptureFixture) -> None:
    store, pool = RecordingStore(), Pool()
    calls = 0

    def export() -> Snapshot:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError(f"pool broke near {SECRETS[0]}")
        return pool.export()

    saver = StateSaver(store, export, counters_interval=0.05, urgent_delay=0.01)
    saver.mark(urgent=True)
    await until(lambda: saver.stats().saves == 1)
    [warning] = warnings_of(caplog)
    assert "RuntimeError" in warning and "sk-or-" not in warning
    await saver.close()


@pytest.mark.anyio
async def test_the_saver_writes_a_file_that_loads(path: Path) -> None:
    pool = Pool()
    saver = StateSaver(FileStore(path), pool.export, urgent_delay=0.01)
    pool.requests = 3
    saver.mark(urgent=True)
    await until(lambda: saver.stats().saves == 1)
    pool.requests = 4
    saver.mark()
    await saver.close()
    loaded = FileStore(path).load()
    assert loaded.keys["0000000a"].counters == {"requests": 4.0}
    assert re.fullmatch(r".+:\d+", loaded.writer) and loaded.saved_at > NOW


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3)), min_size=1, max_size=25))
def test_any_sequence_of_marks_ends_with_the_last_state_saved(
        marks: list[tuple[bool, int]]) -> None:
    """Whatever the order of marks and pauses, after close() the store holds the state as
    of the last mark, and writes never overlap."""

    async def scenario() -> None:
        store, pool = RecordingStore(), Pool()
        saver = make_saver(store, pool, counters_interval=0.004, urgent_delay=0.001)
        for urgent, pause in marks:
            pool.requests += 1
            saver.mark(urgent)
            for _ in range(pause):
                await asyncio.sleep(0.001)
        await saver.close()
        assert store.most_at_once == 1
        assert saved_requests(store)[-1] == pool.requests

    asyncio.run(scenario())
