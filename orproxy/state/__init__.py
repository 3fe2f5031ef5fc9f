"""Durable key state: rests, disablements and lifetime counters that survive a restart.

``store`` holds the records and the backend interface, ``filestore`` the local-file backend,
``saver`` the schedule that writes off the request path. The key pool exports and imports
the records; nothing here knows the key pool or HTTP.
"""

from orproxy.state.filestore import FileStore
from orproxy.state.saver import SaverStats, StateSaver
from orproxy.state.store import (
    KeyRecord,
    MemoryStore,
    Snapshot,
    StateFormatError,
    StateStore,
    clean_text,
    decode,
    encode,
)

__all__ = [
    "FileStore",
    "KeyRecord",
    "MemoryStore",
    "SaverStats",
    "Snapshot",
    "StateFormatError",
    "StateSaver",
    "StateStore",
    "clean_text",
    "decode",
    "encode",
]
