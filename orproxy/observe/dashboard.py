"""The dashboard: its page (``dashboard.html``, served as it is) and the JSON document the
page polls (``/metrics/json``), built from snapshots.

The page inserts every value as text, so nothing here escapes HTML; the document carries
key ids and masked keys only. Process and machine figures come from psutil, loaded on the
first view rather than at start.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from orproxy.keys import KeyView
from orproxy.observe.accounting import Tally
from orproxy.observe.timeseries import Series
from orproxy.upstream.pool import PoolSnapshot


@functools.cache
def page() -> bytes:
    """The page, read once."""
    return resources.files("orproxy.observe").joinpath("dashboard.html").read_bytes()


class ProcessProbe:
    """CPU (percent of one core since the previous look) and memory of this process, and
    of the machine when asked."""

    def __init__(self, system: bool) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process()
        self._system = system
        self._process.cpu_percent(None)
        if system:
            psutil.cpu_percent(None)

    def process(self) -> dict[str, float]:
        with self._process.oneshot():
            return {"cpu_percent": round(self._process.cpu_percent(None), 1),
                    "rss_bytes": float(self._process.memory_info().rss)}

    def machine(self) -> dict[str, float] | None:
        if not self._system:
            return None
        return {"cpu_percent": round(self._psutil.cpu_percent(None), 1),
                "memory_percent": round(self._psutil.virtual_memory().percent, 1)}


@dataclass(frozen=True)
class Facts:
    """What the document says about the proxy itself."""

    version: str
    started: float  # wall clock
    upstream: str
    strategy: str


def document(facts: Facts, keys: Sequence[KeyView], models: dict[str, Tally], total: Tally,
             pool: PoolSnapshot, open_connections: int, probe: ProcessProbe,
             series: Series, quota: dict[str, dict[str, float | None]] | None = None,
             ) -> dict[str, Any]:
    now = time.time()
    return {
        "version": facts.version,
        "now": now,
        "started": facts.started,
        "uptime_seconds": round(now - facts.started, 1),
        "upstream": facts.upstream,
        "strategy": facts.strategy,
        "process": probe.process(),
        "system": probe.machine(),
        "connections": {"client_open": open_connections, "upstream_idle": pool.idle,
                        "upstream_active": pool.active},
        "totals": {"requests": total.requests, **_tokens(total), "cost": total.cost},
        "keys": [_key(view, (quota or {}).get(view.id)) for view in keys],
        "models": [{"model": label, "requests": tally.requests,
                    "prompt_tokens": tally.prompt_tokens,
                    "completion_tokens": tally.completion_tokens, "cost": tally.cost}
                   for label, tally in models.items()],
        "series": series,
    }


def _tokens(tally: Tally) -> dict[str, int]:
    return {"prompt_tokens": tally.prompt_tokens, "completion_tokens": tally.completion_tokens,
            "cached_tokens": tally.cached_tokens, "reasoning_tokens": tally.reasoning_tokens}


def _key(view: KeyView, quota: dict[str, float | None] | None) -> dict[str, Any]:
    stats = view.stats
    return {
        "quota": quota,
        "id": view.id, "masked": view.masked, "account": view.account,
        "state": view.state.value, "rest_until": view.rest_until or None,
        "reason": view.reason, "message": view.message,
        "requests": stats.requests, "successes": stats.successes,
        "rate_limited": stats.rate_limited, "errors": stats.errors,
        "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
        "cost": stats.cost, "last_error": stats.last_error or None,
        "last_error_at": stats.last_error_at or None,
    }
