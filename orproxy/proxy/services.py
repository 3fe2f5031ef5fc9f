"""The running proxy's shared parts, built once by the app and handed to every connection.

Plain wiring: no behaviour of its own beyond values derived once from the config.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from orproxy.config import Config
from orproxy.keys import KeyPool
from orproxy.observe.accounting import ModelTally
from orproxy.observe.dashboard import ProcessProbe
from orproxy.observe.metrics import Metrics
from orproxy.proxy.attempts import AttemptLoop
from orproxy.proxy.models_cache import ModelsCache
from orproxy.upstream.pool import UpstreamPool


class Closable(Protocol):
    def close_if_idle(self) -> None: ...


@dataclass
class Services:
    config: Config
    keys: KeyPool
    upstream: UpstreamPool
    attempts: AttemptLoop
    metrics: Metrics
    models: ModelTally
    models_cache: ModelsCache
    # something worth saving changed: True for a key's state, False for counters
    mark_state: Callable[[bool], None] = lambda urgent: None
    # what the background quota checks last said, by key id (empty when they are off)
    quota_view: Callable[[], dict[str, dict[str, float | None]]] = dict
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    draining: bool = False
    listen_port: int = 0
    connections: set[Closable] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.configure(self.config)
        self._probe: ProcessProbe | None = None

    def configure(self, config: Config) -> None:
        """Take a (reloaded) config and the values derived from it."""
        self.config = config
        self.access_key = config.server.access_key.encode()
        self.public = frozenset(p.encode() for p in config.openrouter.public_endpoints)
        self.base_path = config.openrouter.base_url.path.encode()

    @property
    def probe(self) -> ProcessProbe:
        """psutil is loaded on the first dashboard view, not at start."""
        if self._probe is None:
            self._probe = ProcessProbe(self.config.metrics.enable_system_metrics)
        return self._probe
