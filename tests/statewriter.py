"""Saves key-state snapshots of changing size through FileStore in a tight loop until killed.

Run as ``python -m tests.statewriter PATH`` from the repository root. After each save it
prints ``saved <generation>``: from then on the file holds that generation or a later one.
A snapshot of generation g has ``saved_at == BASE + g`` and exactly ``records_in(g)``
records, so a reader can tell a whole snapshot from a torn or mixed one.
"""

from __future__ import annotations

import sys

from orproxy.state.filestore import FileStore
from orproxy.state.store import KeyRecord, Snapshot

BASE = 1_700_000_000.0
MAX_RECORDS = 1500


def records_in(generation: int) -> int:
    return 1 + (generation * 97) % MAX_RECORDS  # grows and wraps: writes of many sizes


def record(i: int) -> KeyRecord:
    return KeyRecord(id=f"{i:08x}", rest_until=BASE + i, rest_scope="free" if i % 2 else "all",
                     disabled=i % 7 == 0, reason="429 free-models-per-day",
                     message="Rate limit exceeded: free-models-per-day. " * 6,
                     counters={"requests": i, "cost": i / 8}, updated=BASE)


# Built once: the loop's time should go to saving, where the kills are meant to land.
RECORDS = [record(i) for i in range(MAX_RECORDS)]


def snapshot_of(generation: int) -> Snapshot:
    chosen = RECORDS[:records_in(generation)]
    return Snapshot({r.id: r for r in chosen}, saved_at=BASE + generation,
                    writer=f"statewriter:{generation}")


def main(path: str) -> None:
    store = FileStore(path)
    generation = 0
    while True:
        store.save(snapshot_of(generation))
        sys.stdout.write(f"saved {generation}\n")
        sys.stdout.flush()
        generation += 1


if __name__ == "__main__":
    main(sys.argv[1])
