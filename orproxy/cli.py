"""``orproxy check``: what would run, where each setting came from, and, with ``--probe``,
what OpenRouter says about each key.

Prints for people; secrets only masked (keys as ``sk-or-…abcd`` with their id, the access
key by its length, outgoing-proxy credentials hidden).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import fields

from orproxy import __version__
from orproxy.assemble import USER_AGENT, make_upstream_pool
from orproxy.config import Config, Loaded
from orproxy.errors import UpstreamError
from orproxy.keys import key_id, mask_key
from orproxy.proxy.fetch import fetch_whole
from orproxy.upstream.keyinfo import KeyInfo, parse_key_info

SECRET_SETTINGS = frozenset({"server.access_key"})


def report(loaded: Loaded) -> list[str]:
    config = loaded.config
    where = loaded.path or "no file (environment only)"
    lines = [f"orproxy {__version__}: configuration OK ({where})", ""]
    rows = list(_settings(config))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        source = loaded.sources.get(name, "default")
        lines.append(f"  {name:<{width}}  {value:<28}  {source}")
    lines += ["", f"  {len(config.openrouter.keys)} key(s):"]
    for key in config.openrouter.keys:
        account = f"  account {key.account}" if key.account else ""
        lines.append(f"    {key_id(key.key)}  {mask_key(key.key)}{account}")
    return lines


def _settings(config: Config) -> Sequence[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for section in ("server", "openrouter", "limits", "timeouts", "retry", "metrics", "state"):
        values = getattr(config, section)
        for field in fields(values):
            name = f"{section}.{field.name}"
            if name == "openrouter.keys":
                continue
            value = getattr(values, field.name)
            if name in SECRET_SETTINGS:
                shown = f"(set, {len(value)} characters)"
            elif name == "openrouter.base_url":
                shown = f"{value.scheme}://{value.host_header}{value.path}"
            else:
                shown = ", ".join(value) if isinstance(value, tuple) else str(value)
            out.append((name, shown))
    proxy = config.request_proxy
    out.append(("requestProxy", f"{proxy.scheme}://{proxy.host}:{proxy.port}"
                + (" (with credentials)" if proxy.username else "") if proxy else "off"))
    return out


async def probe(config: Config) -> tuple[list[str], bool]:
    """Ask OpenRouter about each key (GET /api/v1/key: costs no quota). Returns the table
    and whether every key is usable."""
    pool = make_upstream_pool(config)
    origin = config.openrouter.base_url
    timeouts = config.timeouts
    rows: list[tuple[str, ...]] = [("id", "key", "label", "account", "limit left", "resets",
                                     "used today", "free tier", "free left today", "expires",
                                     "problem")]
    usable = True
    try:
        for key in config.openrouter.keys:
            headers = [(b"Host", origin.host_header.encode()),
                       (b"Authorization", b"Bearer " + key.key.encode()),
                       (b"Accept", b"application/json"), (b"User-Agent", USER_AGENT)]
            problem = ""
            info: KeyInfo | None = None
            try:
                answer = await fetch_whole(pool, origin.path.encode() + b"/key", headers,
                                           first_byte_timeout=timeouts.upstream_connect_seconds
                                           + 20, idle_timeout=20, max_bytes=1 << 20)
            except UpstreamError as exc:
                problem = exc.public_message
            else:
                info = parse_key_info(answer.body) if answer.status == 200 else None
                if info is None:
                    problem = f"HTTP {answer.status}" + (" (invalid key)"
                                                         if answer.status == 401 else "")
            problem = problem or _problem(info)
            usable = usable and not problem
            rows.append(_row(key.key, key.account, info, problem))
    finally:
        pool.close()
    return _table(rows), usable


def _problem(info: KeyInfo | None) -> str:
    if info is None:
        return "no answer"
    if info.expired(time.time()):
        return "expired"
    if info.exhausted():
        return "spending limit used up"
    if info.free_exhausted():
        return "no free-model requests left today"
    return ""


def _row(secret: str, account: str | None, info: KeyInfo | None,
         problem: str) -> tuple[str, ...]:
    def money(value: float | None) -> str:
        return "-" if value is None else f"${value:,.4f}"

    if info is None:
        return (key_id(secret), mask_key(secret), "-", account or "-", "-", "-", "-", "-", "-",
                "-", problem)
    left = "unlimited" if info.limit is None else money(info.limit_remaining)
    free_left = "-" if info.free_requests_remaining is None else (
        f"{info.free_requests_remaining}/{info.free_requests_limit or '?'}")
    expires = "-" if info.expires_at is None else time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime(info.expires_at))
    return (key_id(secret), mask_key(secret), info.label or "-",
            account or info.account or "-", left, info.limit_reset or "-",
            money(info.usage_daily), {True: "yes", False: "no", None: "-"}[info.is_free_tier],
            free_left, expires, problem or "ok")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            .rstrip() for row in rows]


def run_probe(config: Config) -> tuple[list[str], bool]:
    return asyncio.run(probe(config))
