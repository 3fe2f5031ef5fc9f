"""Opening a connection to the upstream origin: directly, or through a SOCKS5 or HTTP proxy.

The tunnel handshakes go through made-for-purpose code: h11 frames the CONNECT exchange of
an HTTP proxy (RFC 9110 §9.3.6), socksio encodes and checks the SOCKS5 messages (RFC 1928 /
1929); this module only moves their bytes and frames the SOCKS5 replies by length.
``socks5://`` resolves the origin's name here and sends an address; ``socks5h://`` sends
the name for the proxy to resolve. TLS to the origin runs end to end through the tunnel.
Everything fails as UpstreamConnectError.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl

import h11
from socksio import socks5
from socksio.exceptions import ProtocolError as SocksProtocolError

from orproxy.config import Origin, OutgoingProxy
from orproxy.errors import StreamClosed, StreamTimeout, UpstreamConnectError
from orproxy.stream import Stream, connect

MAX_CONNECT_RESPONSE_BYTES = 16 * 1024


async def dial(
    origin: Origin, tls: ssl.SSLContext | None, proxy: OutgoingProxy | None, timeout: float
) -> Stream:
    try:
        if proxy is None:
            return await connect(origin.host, origin.port, timeout=timeout, tls=tls,
                                 server_hostname=origin.host)
        stream = await connect(proxy.host, proxy.port, timeout=timeout)
        try:
            async with asyncio.timeout(timeout):
                if proxy.scheme == "http":
                    await _http_connect(stream, origin, proxy, timeout)
                else:
                    await _socks5_connect(stream, origin, proxy, timeout)
            if tls is not None:
                await stream.start_tls(tls, origin.host, timeout)
        except BaseException:
            stream.abort()
            raise
        return stream
    except TimeoutError as exc:
        raise UpstreamConnectError("outgoing proxy handshake timed out") from exc
    except (StreamClosed, StreamTimeout) as exc:
        where = f"{proxy.host}:{proxy.port}" if proxy else f"{origin.host}:{origin.port}"
        raise UpstreamConnectError(f"connect to {where}: {exc}") from exc


async def _http_connect(
    stream: Stream, origin: Origin, proxy: OutgoingProxy, timeout: float
) -> None:
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    authority = f"{host}:{origin.port}".encode()
    headers = [(b"Host", authority)]
    if proxy.username is not None:
        token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode())
        headers.append((b"Proxy-Authorization", b"Basic " + token))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_CONNECT_RESPONSE_BYTES)
    stream.write(conn.send(h11.Request(method=b"CONNECT", target=authority, headers=headers))
                 + (conn.send(h11.EndOfMessage()) or b""))
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamConnectError("HTTP proxy sent an invalid CONNECT response") from exc
        if event is h11.NEED_DATA:
            data = await stream.read(timeout)
            if not data:
                raise UpstreamConnectError("HTTP proxy closed the connection during CONNECT")
            conn.receive_data(data)
        elif type(event) is h11.Response:
            if not 200 <= event.status_code < 300:
                raise UpstreamConnectError(f"HTTP proxy refused CONNECT ({event.status_code})")
        elif event is h11.PAUSED:  # 2xx to CONNECT: the connection is now the tunnel
            if conn.trailing_data[0]:
                raise UpstreamConnectError("HTTP proxy sent bytes past its CONNECT response")
            return
        elif type(event) is not h11.InformationalResponse:
            raise UpstreamConnectError("HTTP proxy sent an unexpected CONNECT response")


async def _socks5_connect(
    stream: Stream, origin: Origin, proxy: OutgoingProxy, timeout: float
) -> None:
    conn = socks5.SOCKS5Connection()
    reader = _Reader(stream, timeout)
    methods = [socks5.SOCKS5AuthMethod.NO_AUTH_REQUIRED]
    if proxy.username is not None:
        methods.append(socks5.SOCKS5AuthMethod.USERNAME_PASSWORD)
    address = origin.host if proxy.scheme == "socks5h" else await _resolve(origin)
    try:
        conn.send(socks5.SOCKS5AuthMethodsRequest(methods))
        stream.write(conn.data_to_send())
        auth = conn.receive_data(await reader.exactly(2))
        assert isinstance(auth, socks5.SOCKS5AuthReply)
        if auth.method == socks5.SOCKS5AuthMethod.USERNAME_PASSWORD:
            conn.send(socks5.SOCKS5UsernamePasswordRequest(
                (proxy.username or "").encode(), (proxy.password or "").encode()))
            stream.write(conn.data_to_send())
            reply = conn.receive_data(await reader.exactly(2))
            if not isinstance(reply, socks5.SOCKS5UsernamePasswordReply) or not reply.success:
                raise UpstreamConnectError("SOCKS5 proxy refused the credentials")
        elif auth.method != socks5.SOCKS5AuthMethod.NO_AUTH_REQUIRED:
            raise UpstreamConnectError("SOCKS5 proxy accepts none of our auth methods")
        conn.send(socks5.SOCKS5CommandRequest.from_address(
            socks5.SOCKS5Command.CONNECT, (address, origin.port)))
        stream.write(conn.data_to_send())
        result = conn.receive_data(await _socks5_reply(reader))
    except SocksProtocolError as exc:
        raise UpstreamConnectError("SOCKS5 proxy sent an invalid reply") from exc
    assert isinstance(result, socks5.SOCKS5Reply)
    if result.reply_code != socks5.SOCKS5ReplyCode.SUCCEEDED:
        raise UpstreamConnectError(f"SOCKS5 proxy could not connect ({result.reply_code.name})")
    if reader.buffer:
        raise UpstreamConnectError("SOCKS5 proxy sent bytes past its reply")


async def _socks5_reply(reader: _Reader) -> bytes:
    """A whole SOCKS5 reply: its length depends on the address type (RFC 1928 §6)."""
    head = await reader.exactly(4)
    atype = head[3]
    if atype == 1:
        rest = await reader.exactly(4 + 2)
    elif atype == 4:
        rest = await reader.exactly(16 + 2)
    elif atype == 3:
        length = await reader.exactly(1)
        rest = length + await reader.exactly(length[0] + 2)
    else:
        raise UpstreamConnectError("SOCKS5 proxy sent a bad address type")
    return head + rest


async def _resolve(origin: Origin) -> str:
    """The origin's first address, for ``socks5://`` (we resolve, the proxy does not)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            origin.host, origin.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UpstreamConnectError(f"cannot resolve {origin.host}: {exc}") from exc
    if not infos:
        raise UpstreamConnectError(f"cannot resolve {origin.host}")
    return str(infos[0][4][0])


class _Reader:
    """Exact-length reads over a Stream, for the SOCKS5 replies."""

    def __init__(self, stream: Stream, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout
        self.buffer = bytearray()

    async def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = await self._stream.read(self._timeout)
            if not data:
                raise UpstreamConnectError("proxy closed the connection during the handshake")
            self.buffer += data
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out
