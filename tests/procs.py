"""Helpers for tests that run servers as processes: a free port, waiting for a listener."""

from __future__ import annotations

import asyncio
import socket
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_listening(port: int, proc: asyncio.subprocess.Process,
                         seconds: float = 20.0) -> None:
    """Until something accepts on ``port``; fails if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.returncode is None, f"server exited early with {proc.returncode}"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError(f"nothing listens on {port}")
