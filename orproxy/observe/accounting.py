"""Tokens and cost by model, bounded: the per-model view of the dashboard and the metrics.

Pure. Model names come from responses, so they are not a bounded set: only the models of
the configured allow-list, or else the first ``top_n`` distinct models seen, get a row (and
a metric label) of their own; everything else is counted as ``other``. Labels never
disappear once given, as Prometheus counters must not.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

from orproxy.observe.usage import Usage

OTHER = "other"
UNKNOWN = "unknown"  # an answer that named no model
MAX_MODEL_CHARS = 120


@dataclass
class Tally:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0

    def add(self, usage: Usage | None) -> None:
        self.requests += 1
        if usage is not None:
            self.prompt_tokens += usage.prompt_tokens
            self.completion_tokens += usage.completion_tokens
            self.cached_tokens += usage.cached_tokens
            self.cache_write_tokens += usage.cache_write_tokens
            self.reasoning_tokens += usage.reasoning_tokens
            self.cost += usage.cost


class ModelTally:
    def __init__(self, *, allow: Collection[str] = (), top_n: int = 20) -> None:
        self._allow = frozenset(allow)
        self._top_n = top_n
        self._by_model: dict[str, Tally] = {}
        self._named = 0  # labels given to models (not other / unknown)
        self.total = Tally()

    def label(self, model: str | None) -> str:
        """The bounded name this model is counted under."""
        if not model:
            return UNKNOWN
        model = model[:MAX_MODEL_CHARS]
        if self._allow:
            return model if model in self._allow else OTHER
        if model in self._by_model or self._named < self._top_n:
            return model
        return OTHER

    def add(self, model: str | None, usage: Usage | None) -> str:
        """Count one answered request; returns the label it was counted under."""
        label = self.label(model)
        tally = self._by_model.get(label)
        if tally is None:
            tally = self._by_model[label] = Tally()
            self._named += label not in (OTHER, UNKNOWN)
        tally.add(usage)
        self.total.add(usage)
        return label

    def snapshot(self) -> dict[str, Tally]:
        """A copy, busiest first."""
        ordered = sorted(self._by_model.items(), key=lambda item: -item[1].requests)
        return {label: replace(tally) for label, tally in ordered}
