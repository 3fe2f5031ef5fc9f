"""Opening a connection to the upstream origin: directly, or through a SOCKS5 or HTTP proxy.

Owns the tunnel handshakes (RFC 1928/1929 for SOCKS5, RFC 9110 §9.3.6 CONNECT for HTTP
proxies) and the TLS upgrade after them. Everything fails as UpstreamConnectError.
"""

from __future__ import annotations

import base64
import ipaddress
import ssl
import struct

from orproxy.config import Origin, OutgoingProxy
from orproxy.errors import StreamClosed, StreamTimeout, UpstreamConnectError
from orproxy.stream import Stream, connect


async def dial(
    origin: Origin, tls: ssl.SSLContext | None, proxy: OutgoingProxy | None, timeout: float
) -> Stream:
    try:
        if proxy is None:
            return await connect(origin.host, origin.port, timeout=timeout, tls=tls,
                                 server_hostname=origin.host)
        stream = await connect(proxy.host, proxy.port, timeout=timeout)
        try:
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
    except (StreamClosed, StreamTimeout) as exc:
        raise UpstreamConnectError(str(exc)) from exc


async def _read_exactly(stream: Stream, n: int, buf: bytearray, timeout: float) -> bytes:
    while len(buf) < n:
        data = await stream.read(timeout)
        if not data:
            raise UpstreamConnectError("proxy closed the connection during the handshake")
        buf += data
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def _socks5_connect(
    stream: Stream, origin: Origin, proxy: OutgoingProxy, timeout: float
) -> None:
    buf = bytearray()
    methods = b"\x00\x02" if proxy.username is not None else b"\x00"
    stream.write(b"\x05" + bytes([len(methods)]) + methods)
    version, method = await _read_exactly(stream, 2, buf, timeout)
    if version != 5 or method == 0xFF:
        raise UpstreamConnectError("SOCKS5 proxy accepts none of our auth methods")
    if method == 2:
        user = (proxy.username or "").encode()
        password = (proxy.password or "").encode()
        stream.write(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        _, status = await _read_exactly(stream, 2, buf, timeout)
        if status != 0:
            raise UpstreamConnectError("SOCKS5 proxy refused the credentials")
    elif method != 0:
        raise UpstreamConnectError(f"SOCKS5 proxy chose unsupported method {method}")
    stream.write(b"\x05\x01\x00" + _socks_address(origin.host) + struct.pack("!H", origin.port))
    _, reply, _, atyp = await _read_exactly(stream, 4, buf, timeout)
    if reply != 0:
        raise UpstreamConnectError(f"SOCKS5 proxy could not connect (reply {reply})")
    if atyp == 1:
        await _read_exactly(stream, 4 + 2, buf, timeout)
    elif atyp == 4:
        await _read_exactly(stream, 16 + 2, buf, timeout)
    elif atyp == 3:
        (length,) = await _read_exactly(stream, 1, buf, timeout)
        await _read_exactly(stream, length + 2, buf, timeout)
    else:
        raise UpstreamConnectError("SOCKS5 proxy sent a bad address type")
    if buf:
        raise UpstreamConnectError("SOCKS5 proxy sent bytes past its reply")


def _socks_address(host: str) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        return b"\x03" + bytes([len(name)]) + name
    return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed


async def _http_connect(
    stream: Stream, origin: Origin, proxy: OutgoingProxy, timeout: float
) -> None:
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    authority = f"{host}:{origin.port}"
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if proxy.username is not None:
        token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode()).decode()
        head += f"Proxy-Authorization: Basic {token}\r\n"
    stream.write((head + "\r\n").encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        if len(buf) > 16384:
            raise UpstreamConnectError("HTTP proxy sent an oversized CONNECT response")
        data = await stream.read(timeout)
        if not data:
            raise UpstreamConnectError("HTTP proxy closed the connection during CONNECT")
        buf += data
    status_line = bytes(buf).split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].startswith(b"2"):
        raise UpstreamConnectError(
            f"HTTP proxy refused CONNECT: {status_line[:80].decode('latin-1')}")
    if not buf.endswith(b"\r\n\r\n"):
        raise UpstreamConnectError("HTTP proxy sent bytes past its CONNECT response")
