"""Quota checked before it fails: each key's ``GET /api/v1/key`` polled in the background.

Every ``quota_check_seconds`` each key is asked once, the asks spread evenly over the
period, never on a request's path (asking costs no quota). What the answer says is acted
on before a request has to learn it the hard way:
- ``creator_user_id`` names the key's account when the config does not: keys of one
  account are grouped for account-wide limits without the user saying so;
- ``limit_remaining`` at 0: the key rests until its limit resets (daily/weekly/monthly at
  UTC midnight), else for the credit cooldown;
- ``free_model_daily_requests.remaining`` at 0: the key's account rests for free models
  until the next UTC midnight;
- ``expires_at`` passed, or the key refused (401): the key is disabled.
Failures are tolerated: logged at DEBUG, counted, tried again next round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from orproxy import __version__
from orproxy.errors import UpstreamError
from orproxy.keys import Key
from orproxy.proxy.fetch import fetch_whole
from orproxy.proxy.services import Services
from orproxy.upstream.keyinfo import KeyInfo, parse_key_info

log = logging.getLogger(__name__)

USER_AGENT = f"orproxy/{__version__}".encode()


@dataclass(frozen=True)
class Checked:
    info: KeyInfo
    at: float  # wall clock


def seconds_until_reset(period: str | None, wall_now: float) -> float | None:
    """Until a daily/weekly/monthly limit resets (UTC midnight; weeks start on Monday)."""
    now = datetime.fromtimestamp(wall_now, UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        end = midnight
    elif period == "weekly":
        end = midnight + timedelta(days=(7 - midnight.weekday()) % 7)
    elif period == "monthly":
        first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (first + timedelta(days=32)).replace(day=1)
    else:
        return None
    return max((end - now).total_seconds(), 1.0)


class QuotaPoller:
    def __init__(self, services: Services, *, wall: Callable[[], float] = time.time) -> None:
        self._services = services
        self.wall = wall
        self.checked: dict[str, Checked] = {}  # by key id
        self.results = {"ok": 0, "error": 0}

    async def run(self, interval: float) -> None:
        """Forever: every key once per ``interval``, spread out."""
        while True:
            keys = list(self._services.keys)
            current = {key.id for key in keys}
            for gone in set(self.checked) - current:  # removed by a reload
                del self.checked[gone]
            step = interval / max(len(keys), 1)
            for key in keys:
                await self.check(key)
                await asyncio.sleep(step)

    async def check(self, key: Key) -> None:
        services = self._services
        origin = services.config.openrouter.base_url
        timeouts = services.config.timeouts
        headers = [(b"Host", origin.host_header.encode()),
                   (b"Authorization", b"Bearer " + key.secret.encode()),
                   (b"Accept", b"application/json"), (b"Accept-Encoding", b"identity"),
                   (b"User-Agent", USER_AGENT)]
        try:
            answer = await fetch_whole(services.upstream, origin.path.encode() + b"/key",
                                       headers, first_byte_timeout=30.0,
                                       idle_timeout=timeouts.upstream_idle_seconds,
                                       max_bytes=1 << 20)
        except UpstreamError as exc:
            self.results["error"] += 1
            log.debug("quota check of key %s failed: %s", key.id, exc.message)
            return
        if answer.status == 401:
            self.results["ok"] += 1
            services.keys.disable(key, "401 invalid key (quota check)")
            return
        info = parse_key_info(answer.body) if answer.status == 200 else None
        if info is None:
            self.results["error"] += 1
            log.debug("quota check of key %s: HTTP %d", key.id, answer.status)
            return
        self.results["ok"] += 1
        self.checked[key.id] = Checked(info, self.wall())
        self.apply(key, info)

    def apply(self, key: Key, info: KeyInfo) -> None:
        services = self._services
        keys, now = services.keys, self.wall()
        if info.account:
            keys.learn_account(key, info.account)
        if info.expired(now):
            keys.disable(key, "key expired", f"expired at {_iso(info.expires_at)}")
            return
        if info.exhausted():
            rest = seconds_until_reset(info.limit_reset, now)
            keys.cool_down(key, rest if rest is not None else
                           services.config.openrouter.credit_cooldown_seconds,
                           "quota: spending limit used up",
                           message=f"limit ${info.limit:g} reached"
                           + (f"; resets {info.limit_reset}" if info.limit_reset else ""))
        if info.free_exhausted():
            rest = seconds_until_reset("daily", now)
            assert rest is not None
            keys.cool_down(key, rest, "quota: no free-model requests left today",
                           account_wide=True, free_only=True,
                           message=f"{info.free_requests_limit or '?'} free-model requests "
                                   "a day used up")


def _iso(when: float | None) -> str:
    return "-" if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


QuotaView = dict[str, dict[str, float | None]]


def view_of(poller: QuotaPoller, key_ids: set[str]) -> QuotaView:
    """What the last checks said about these keys, by id: for the dashboard and metrics."""
    return {kid: {"limit_remaining": c.info.limit_remaining, "limit": c.info.limit,
                  "free_requests_remaining": (None if c.info.free_requests_remaining is None
                                              else float(c.info.free_requests_remaining)),
                  "free_requests_limit": (None if c.info.free_requests_limit is None
                                          else float(c.info.free_requests_limit)),
                  "checked_at": c.at}
            for kid, c in poller.checked.items() if kid in key_ids}
