"""A StateStore in one local JSON file, safe against crashes at any instant.

Owns the file's lifecycle: atomic replacement (temp file in the same directory, fsync,
rename, fsync of the directory), private modes, moving an unusable file aside so the proxy
always starts, removing temp files left by a crash, and noticing a file replaced by another
writer. It must not know the key pool, the event loop or the proxy's config; its calls block
and are meant for a worker thread (``save``) or start-up (``load``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from orproxy.state.store import (
    MAX_FILE_BYTES,
    Decoded,
    Snapshot,
    StateFormatError,
    decode,
    encode,
)

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
# A save takes milliseconds; a temp file this old belongs to no save in progress.
STALE_TEMP_SECONDS = 60.0

# What identifies one version of the file: a replacement is a new inode.
Signature = tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size


def _signature(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class _Unusable(Exception):
    """The file is there but cannot be used; the message says why (no content)."""


class FileStore:
    def __init__(self, path: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock  # wall clock, only to name a moved-aside file
        self._lock = threading.Lock()  # save (worker thread) vs poll/load
        self._seen: Signature | None = None  # the version we last loaded or saved
        self._warned: Signature | None = None  # a bad version poll already warned about

    def __repr__(self) -> str:
        return f"<FileStore {self.path}>"

    # --- load ------------------------------------------------------------------------------

    def load(self) -> Snapshot:
        """The saved snapshot, or an empty one. Never raises: an unusable file is moved
        aside with a warning."""
        self._remove_stray_temps()
        with self._lock:
            self._seen = None
            try:
                decoded, sig = self._read()
            except FileNotFoundError:
                return Snapshot()
            except _Unusable as exc:
                self._set_aside(str(exc), "starting clean")
                return Snapshot()
            if decoded.dropped:
                # Keep the good records, but keep the evidence of what was lost too.
                reasons = "; ".join(str(d) for d in decoded.dropped[:3])
                more = len(decoded.dropped) - 3
                self._set_aside(f"{len(decoded.dropped)} bad record(s): {reasons}"
                                f"{f'; {more} more' if more > 0 else ''}",
                                f"kept {len(decoded.snapshot.keys)} good record(s)")
            else:
                self._seen = sig
            return decoded.snapshot

    def _read(self) -> tuple[Decoded, Signature]:
        """Decode the file; FileNotFoundError if there is none, _Unusable if it is bad."""
        try:
            # O_NONBLOCK: a FIFO in the file's place must not hang start-up.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _Unusable(f"cannot open: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Unusable("not a regular file")
            data = _read_all(fd, MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise _Unusable(f"cannot read: {exc.strerror}") from None
        finally:
            os.close(fd)
        try:
            return decode(data), _signature(st)
        except StateFormatError as exc:
            raise _Unusable(str(exc)) from None

    def _set_aside(self, reason: str, outcome: str) -> None:
        stamp = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 0
        while aside.exists() or aside.is_symlink():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            os.rename(self.path, aside)
        except OSError as exc:
            log.warning("state file %s is unusable (%s) and could not be moved to %s (%s); %s",
                        self.path, reason, aside, exc.strerror, outcome)
            return
        log.warning("state file %s is unusable (%s); moved it to %s; %s",
                    self.path, reason, aside, outcome)

    def _remove_stray_temps(self) -> None:
        """Temp files of saves that died (kill -9, power loss) never became the file."""
        try:
            names = os.listdir(self.path.parent)
        except OSError:
            return
        prefix = f"{self.path.name}.tmp-"
        for name in names:
            if name.startswith(prefix) and self._is_stray(name[len(prefix):], name):
                with contextlib.suppress(OSError):
                    os.unlink(self.path.parent / name)
                    log.info("removed %s, left by an interrupted save", name)

    def _is_stray(self, suffix: str, name: str) -> bool:
        """Dead writer, or too old to be a save in progress (another live writer's temp
        file must stay: removing it would fail that writer's rename)."""
        try:
            age = self._clock() - os.lstat(self.path.parent / name).st_mtime
            pid = int(suffix.split("-", 1)[0])
        except (OSError, ValueError):
            return True
        return age > STALE_TEMP_SECONDS or pid <= 0 or not _alive(pid)

    # --- save ------------------------------------------------------------------------------

    def save(self, snapshot: Snapshot) -> None:
        """Replace the file atomically: after a crash at any instant the file is the old
        version or the new one, whole."""
        data = encode(snapshot)
        directory = self.path.parent
        _make_private_dirs(directory)
        temp = directory / f"{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            try:
                os.fchmod(fd, FILE_MODE)  # the umask may have taken bits; be exact
                _write_all(fd, data)
                os.fsync(fd)  # the bytes are on disk before the name points at them
                sig = _signature(os.fstat(fd))  # rename keeps inode, mtime and size
            finally:
                os.close(fd)
            with self._lock:
                os.replace(temp, self.path)
                self._seen = sig
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        _fsync_dir(directory)  # the rename itself survives a power loss

    # --- poll ------------------------------------------------------------------------------

    def poll(self) -> Snapshot | None:
        """The file's snapshot if another writer replaced it since our last load/save."""
        with self._lock:
            try:
                sig = _signature(os.stat(self.path))
            except OSError:
                return None
            if sig in (self._seen, self._warned):
                return None
            try:
                decoded, sig = self._read()
            except FileNotFoundError:
                return None
            except _Unusable as exc:
                log.warning("state file %s, written elsewhere, is unusable (%s); ignored",
                            self.path, exc)
                self._warned = sig
                return None
            if decoded.dropped:
                log.warning("state file %s, written elsewhere, has %d bad record(s) (%s); "
                            "kept %d", self.path, len(decoded.dropped), decoded.dropped[0],
                            len(decoded.snapshot.keys))
            self._seen = sig
            return decoded.snapshot


def _read_all(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents as 0o700; leave existing ones alone."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another writer made it meanwhile
            os.mkdir(path, DIR_MODE)
            os.chmod(path, DIR_MODE)  # exact, whatever the umask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    except (OSError, OverflowError, ValueError):
        return False
    return True
