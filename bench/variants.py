"""orproxy variants: ``NAME:section.key=value[,section.key=value…]`` as config overrides.

A variant is one more subject, ``orproxy-NAME``, started with the bench's orproxy config
plus these overrides, so that two configurations are measured in the same interleaved run.
Values are YAML (``yaml.safe_load``): ``true``, ``0.5``, ``[a, b]``. Pure: no I/O. It knows
the syntax and which settings the bench itself owns, not what the settings mean: orproxy
validates them (``python -m orproxy --check``) before the run starts.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import yaml

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
# A comma starts a new override only when ``section.key=`` follows it, so that a value may
# itself hold commas (a YAML list such as ``[a, b]``).
_SPLIT = re.compile(r",(?=\s*[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+\s*=)")
# Set by the bench for every orproxy subject: where it listens, where the fake upstream
# is, and the credentials the checks and the upstream's key count rely on.
_OWNED = (
    "server.host",
    "server.port",
    "server.access_key",
    "openrouter.base_url",
    "openrouter.keys",
)


@dataclass(frozen=True)
class Variant:
    """A subject ``orproxy-NAME`` and its overrides, in the order given."""

    subject: str
    overrides: tuple[tuple[str, Any], ...]  # (dotted path, parsed value)

    def apply(self, config: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``config`` with the overrides set (nested mappings created as needed)."""
        out = copy.deepcopy(config)
        for path, value in self.overrides:
            *parents, leaf = path.split(".")
            node = out
            for part in parents:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise ValueError(f"{self.subject}: {path}: {part} is not a mapping")
                node = child
            node[leaf] = copy.deepcopy(value)
        return out

    def describe(self) -> str:
        """The overrides as ``path=value`` with values in YAML flow style."""
        return ", ".join(f"{path}={_flow(value)}" for path, value in self.overrides)


def _flow(value: Any) -> str:
    text: str = yaml.safe_dump(value, default_flow_style=True, width=1 << 16)
    return text.removesuffix("\n...\n").strip()


def parse_variant(text: str) -> Variant:
    """Parse one ``--variant`` argument; ValueError says what is wrong with it."""
    name, colon, spec = text.partition(":")
    name = name.strip()
    if not colon or not _NAME.fullmatch(name):
        raise ValueError(
            f"--variant {text!r}: expected NAME:section.key=value[,section.key=value…] "
            "with NAME of lower-case letters, digits, '-' or '_'"
        )
    overrides: list[tuple[str, Any]] = []
    for item in _SPLIT.split(spec):
        path, eq, raw = item.partition("=")
        path = path.strip()
        if not eq or not _PATH.fullmatch(path):
            raise ValueError(f"--variant {name}: {item.strip()!r} is not section.key=value")
        if any(path == p or path.startswith(p + ".") for p in _OWNED):
            raise ValueError(f"--variant {name}: {path} is set by the bench for every subject")
        if any(path == p for p, _ in overrides):
            raise ValueError(f"--variant {name}: {path} given twice")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"--variant {name}: {path}: not a YAML value ({exc})") from exc
        overrides.append((path, value))
    return Variant(f"orproxy-{name}", tuple(overrides))
