"""Drive headless Chromium over the DevTools protocol (CDP), for tests that look at a page.

    async with Browser() as browser:
        page = await browser.new_page(url, credentials=("admin", "secret"))
        await page.wait_for("document.querySelector('#status').dataset.refreshes > 0")
        value = await page.eval("document.title")
        await page.screenshot("/tmp/page.png")

Standard library only: the DevTools WebSocket is spoken by the small RFC 6455 client below
(client frames masked, fragments joined, pings answered), so tests need no extra package.
Chromium runs in its own process group with a throwaway profile; leaving the ``async with``
kills that group and removes the profile, whatever happened inside. A missing Chromium is
an error that says how to install it, never a skip.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

CHROMIUM = "/usr/bin/chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
# Run in a page before its own scripts: alert() calls (an injected script would make
# them) and Content-Security-Policy violations are collected for the test to read.
TRAPS = """
window.__alerts = [];
window.alert = (m) => { window.__alerts.push(String(m)); };
window.__violations = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
"""
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


class BrowserError(Exception):
    """Chromium could not be started, or the DevTools connection failed."""


class CDPError(BrowserError):
    """A DevTools command answered with an error."""


class JSError(BrowserError):
    """The page's JavaScript threw while a test evaluated an expression."""


# --- WebSocket (RFC 6455), client side, just enough for DevTools ----------------------------


class WebSocket:
    """Text messages over one TCP connection. Not safe for concurrent ``recv`` calls."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.closed = False

    @classmethod
    async def connect(cls, host: str, port: int, path: str) -> WebSocket:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        key = base64.b64encode(os.urandom(16))
        writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + f"{host}:{port}".encode()
                     + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)}
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest()).decode()
        if lines[0].split(" ")[1:2] != ["101"] or headers.get("sec-websocket-accept") != accept:
            writer.close()
            raise BrowserError(f"DevTools refused the WebSocket upgrade: {lines[0]!r}")
        return cls(reader, writer)

    async def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())
        await self._writer.drain()

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 1 << 16:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        mask = os.urandom(4)  # clients must mask every frame (§5.3)
        keystream = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(
            n, "big") if n else b""
        self._writer.write(head + mask + masked)

    async def recv(self) -> str:
        """The next text message, fragments joined; answers pings on the way."""
        parts: list[bytes] = []
        while True:
            fin, opcode, payload = await self._read_frame()
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0xA:  # pong
                continue
            if opcode == 0x8:  # close
                self.closed = True
                with contextlib.suppress(OSError):
                    self._send_frame(0x8, payload[:2])
                raise BrowserError("DevTools closed the WebSocket")
            parts.append(payload)
            if fin:
                return b"".join(parts).decode()

    async def _read_frame(self) -> tuple[bool, int, bytes]:
        try:
            b0, b1 = await self._reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self._reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self._reader.readexactly(8), "big")
            if b1 & 0x80:
                raise BrowserError("the DevTools server sent a masked frame")
            return bool(b0 & 0x80), b0 & 0x0F, await self._reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.closed = True
            raise BrowserError("the DevTools WebSocket was cut") from exc

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self._send_frame(0x8, (1000).to_bytes(2, "big"))
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


# --- CDP: commands by id, events by session ------------------------------------------------

EventHandler = Callable[[str, dict[str, Any]], None]


class CDP:
    """One browser-level DevTools connection; pages are flat sessions on it."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._handlers: dict[str | None, EventHandler] = {}
        self._reader = asyncio.create_task(self._read())

    def subscribe(self, session: str | None, handler: EventHandler) -> None:
        self._handlers[session] = handler

    async def send(self, method: str, params: dict[str, Any] | None = None, *,
                   session: str | None = None, timeout: float = 15.0) -> dict[str, Any]:
        if self._reader.done():
            raise BrowserError(f"{method}: the DevTools connection is gone")
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = (method, future)
        try:
            await self._ws.send(json.dumps(message))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise BrowserError(f"{method}: no answer from Chromium in {timeout} s") from None
        finally:
            self._pending.pop(ident, None)

    async def _read(self) -> None:
        try:
            while True:
                message = json.loads(await self._ws.recv())
                if "id" in message:
                    method, future = self._pending.get(message["id"], ("", None))
                    if future is None or future.done():
                        continue
                    if "error" in message:
                        future.set_exception(CDPError(f"{method}: {message['error']}"))
                    else:
                        future.set_result(message.get("result", {}))
                elif (handler := self._handlers.get(message.get("sessionId"))) is not None:
                    handler(message["method"], message.get("params", {}))
        except Exception as exc:  # cut, closed, or a handler bug: no answer will come now
            for _, future in self._pending.values():
                if not future.done():
                    future.set_exception(BrowserError(f"DevTools reader stopped: {exc!r}"))

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, BrowserError):
            await self._reader
        await self._ws.close()


# --- a page ----------------------------------------------------------------------------


class Page:
    """One tab. ``requests`` lists every URL it asked for (CDP Network events), ``errors``
    every uncaught exception and console.error, ``console`` every console message."""

    def __init__(self, cdp: CDP, target: str, session: str,
                 credentials: tuple[str, str] | None) -> None:
        self._cdp, self._target, self._session = cdp, target, session
        self._credentials = credentials
        self._challenged: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._viewport = (800, 600)  # headless Chromium's default window
        self.requests: list[str] = []
        self.console: list[str] = []
        self.errors: list[str] = []
        cdp.subscribe(session, self._on_event)

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   timeout: float = 15.0) -> dict[str, Any]:
        """Any CDP command on this page's session."""
        return await self._cdp.send(method, params, session=self._session, timeout=timeout)

    async def _setup(self) -> None:
        for domain in ("Page", "Runtime", "Network"):
            await self.send(f"{domain}.enable")
        if self._credentials is not None:
            # every request pauses until we continue it; a 401 challenge asks us to answer
            await self.send("Fetch.enable", {"handleAuthRequests": True,
                                             "patterns": [{"urlPattern": "*"}]})

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        for future in self._waiters.pop(method, []):
            if not future.done():
                future.set_result(params)
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append(f"{params['type']}: {text}")
            if params["type"] == "error":
                self.errors.append(text)
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description", details["text"]))
        elif method == "Fetch.requestPaused":
            self._spawn("Fetch.continueRequest", {"requestId": params["requestId"]})
        elif method == "Fetch.authRequired":
            self._spawn("Fetch.continueWithAuth", {"requestId": params["requestId"],
                                                   "authChallengeResponse": self._answer(params)})

    def _answer(self, params: dict[str, Any]) -> dict[str, str]:
        # a second challenge for the same request means the credentials were refused
        request = params["requestId"]
        if self._credentials is None or request in self._challenged:
            return {"response": "CancelAuth"}
        self._challenged.add(request)
        user, password = self._credentials
        return {"response": "ProvideCredentials", "username": user, "password": password}

    def _spawn(self, method: str, params: dict[str, Any]) -> None:
        # handlers run inside the CDP reader, which must not wait for its own answers
        if not self._closed:
            task = asyncio.create_task(self._send_quietly(method, params))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_quietly(self, method: str, params: dict[str, Any]) -> None:
        try:
            await self.send(method, params)
        except BrowserError as exc:
            if not self._closed:  # once the tab is closing its requests just go away
                self.errors.append(f"DevTools: {exc}")

    def _expect(self, method: str) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(method, []).append(future)
        return future

    async def goto(self, url: str, timeout: float = 15.0) -> None:
        """Navigate and wait for the load event."""
        loaded = self._expect("Page.loadEventFired")
        answer = await self.send("Page.navigate", {"url": url}, timeout)
        if answer.get("errorText"):
            loaded.cancel()
            raise BrowserError(f"navigation to {url} failed: {answer['errorText']}")
        try:
            await asyncio.wait_for(loaded, timeout)
        except TimeoutError:
            raise BrowserError(f"{url} did not finish loading in {timeout} s") from None

    async def add_init_script(self, source: str) -> None:
        """JavaScript that runs in every document of this page before its own scripts."""
        await self.send("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    async def eval(self, expression: str, timeout: float = 15.0) -> Any:
        """The JSON value of ``expression`` (promises awaited); JSError if it throws."""
        answer = await self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True}, timeout)
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            what = details.get("exception", {}).get("description", details.get("text"))
            raise JSError(f"{expression!r} threw: {what}")
        return answer["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0,
                       interval: float = 0.05) -> Any:
        """Poll until ``expression`` is truthy; return its value. Fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"waited {timeout} s for {expression!r}; last: {value!r}")
            await asyncio.sleep(interval)

    async def set_viewport(self, width: int, height: int, *, dark: bool | None = None) -> None:
        """Window size in CSS pixels; ``dark`` forces prefers-color-scheme either way."""
        self._viewport = (width, height)
        await self._set_metrics(width, height)
        if dark is not None:
            await self.send("Emulation.setEmulatedMedia", {"features": [
                {"name": "prefers-color-scheme", "value": "dark" if dark else "light"}]})

    async def _set_metrics(self, width: int, height: int) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    async def screenshot(self, path: str | Path, *, full_page: bool = True) -> None:
        """A PNG of the viewport, or of the whole page: the window is made as tall as the
        page, scrollbars hidden, for the shot, then restored (a clip beyond the viewport
        instead would drop the scrollbar and shift the layout by its width)."""
        width, height = self._viewport
        if full_page:
            await self.send("Emulation.setScrollbarsHidden", {"hidden": True})
            size = (await self.send("Page.getLayoutMetrics"))["cssContentSize"]
            await self._set_metrics(width, max(height, math.ceil(size["height"])))
        try:
            answer = await self.send("Page.captureScreenshot", {"format": "png"}, timeout=30.0)
        finally:
            if full_page:
                await self._set_metrics(width, height)
                await self.send("Emulation.setScrollbarsHidden", {"hidden": False})
        _write(path, base64.b64decode(answer["data"]))

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(BrowserError):
            await self._cdp.send("Target.closeTarget", {"targetId": self._target})


# --- the browser process ----------------------------------------------------------------


class Browser:
    """Headless Chromium with a throwaway profile; ``async with`` owns its whole life."""

    def __init__(self, executable: str = CHROMIUM, *, start_seconds: float = 30.0) -> None:
        self.executable = executable
        self._start_seconds = start_seconds
        self._dir: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._cdp: CDP | None = None

    async def __aenter__(self) -> Self:
        if not _executable(self.executable):
            raise BrowserError(f"Chromium is not installed at {self.executable}: these tests "
                               "need it (apt-get install chromium; CI installs it)")
        self._dir = tempfile.mkdtemp(prefix="orproxy-chromium-")
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    async def _start(self) -> None:
        assert self._dir is not None
        log = os.open(os.path.join(self._dir, "chromium.log"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.executable, *FLAGS, f"--user-data-dir={self._dir}",
                "--remote-debugging-port=0", "about:blank",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)  # its own process group: one kill ends every child
        finally:
            os.close(log)
        port, path = await self._endpoint()
        self._cdp = CDP(await WebSocket.connect("127.0.0.1", port, path))

    async def _endpoint(self) -> tuple[int, str]:
        """Port and browser path from DevToolsActivePort, which Chromium writes once it
        listens."""
        assert self._dir is not None and self._proc is not None
        deadline = time.monotonic() + self._start_seconds
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise BrowserError(f"Chromium exited with {self._proc.returncode} at start:\n"
                                   + self._log_tail())
            if (endpoint := _read_endpoint(self._dir)) is not None:
                return endpoint
            await asyncio.sleep(0.05)
        raise BrowserError(f"Chromium did not open DevTools in {self._start_seconds} s:\n"
                           + self._log_tail())

    def _log_tail(self) -> str:
        assert self._dir is not None
        try:
            return Path(self._dir, "chromium.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int | None:
        """Chromium's process id, which is also its process group's id; None when stopped."""
        return None if self._proc is None else self._proc.pid

    @property
    def profile(self) -> str | None:
        """The throwaway --user-data-dir; None when stopped."""
        return self._dir

    @property
    def cdp(self) -> CDP:
        if self._cdp is None:
            raise BrowserError("the browser is not running")
        return self._cdp

    async def new_page(self, url: str | None = None, *,
                       credentials: tuple[str, str] | None = None,
                       init_script: str | None = None) -> Page:
        """A new tab, answering HTTP Basic challenges with ``credentials`` if given, with
        ``init_script`` run before every document's own scripts; loads ``url`` if given."""
        target = (await self.cdp.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = (await self.cdp.send("Target.attachToTarget",
                                       {"targetId": target, "flatten": True}))["sessionId"]
        page = Page(self.cdp, target, session, credentials)
        await page._setup()
        if init_script is not None:
            await page.add_init_script(init_script)
        if url is not None:
            await page.goto(url)
        return page

    async def _stop(self) -> None:
        """Close politely, then kill the process group and remove the profile; never
        raises, so it can run on any failure path."""
        closing = False
        if self._cdp is not None:
            with contextlib.suppress(BrowserError, OSError):
                closing = True  # answered or cut: either way Chromium is on its way out
                await self._cdp.send("Browser.close", timeout=3.0)
            await self._cdp.close()
            self._cdp = None
        if self._proc is not None:
            if closing:  # let Chromium end and reap its own children first
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), 5.0)
            with contextlib.suppress(ProcessLookupError):  # then whatever is left of the group
                os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 10.0)
            self._proc = None
        if self._dir is not None:
            for _ in range(20):  # a dying child may still be writing into the profile
                if _remove(self._dir):
                    break
                await asyncio.sleep(0.1)
            self._dir = None


# Small blocking file operations on local files, kept out of the async functions.


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _read_endpoint(profile: str) -> tuple[int, str] | None:
    """Port and browser path from DevToolsActivePort, once both lines are written."""
    try:
        lines = Path(profile, "DevToolsActivePort").read_text().split("\n")
    except FileNotFoundError:
        return None
    if len(lines) >= 2 and lines[0].isdigit() and lines[1].startswith("/"):
        return int(lines[0]), lines[1].strip()
    return None


def _write(path: str | Path, data: bytes) -> None:
    Path(path).write_bytes(data)


def _remove(directory: str) -> bool:
    shutil.rmtree(directory, ignore_errors=True)
    return not os.path.exists(directory)
