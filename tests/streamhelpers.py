"""Building blocks for fake-upstream scripts and for waiting on them: hold a connection
open, wait for the test to open a gate, close cleanly; and ``eventually``, which polls a
state that has no event to wait on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from tests.fakeor import Responder

SSE_HEADERS = [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache"),
               (b"X-Generation-Id", b"gen-stream-1")]


async def hold(resp: Responder, timeout: float = 10.0) -> None:
    """Keep the upstream connection open and silent until the proxy closes it."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await resp.writer.wait_closed()


async def gate(event: asyncio.Event, timeout: float = 10.0) -> bool:
    """Wait for the test to open the gate; False if it never does."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0,
                     what: str = "the condition", step: float = 0.01) -> None:
    """Wait until ``predicate()`` is true, polling; fails naming ``what`` otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(step)


async def close_gracefully(resp: Responder, timeout: float = 5.0) -> None:
    """Close the upstream side cleanly (TLS close_notify after every byte written)."""
    resp.writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await resp.writer.wait_closed()
