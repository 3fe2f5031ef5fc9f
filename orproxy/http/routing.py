"""Which local handler or upstream path a request target goes to.

Pure: (method, target) → Route. Accepts origin-form and absolute-form targets (RFC 9112
§3.2); rejects dot segments — however they and the slashes around them are written
(``%2e``, ``%2f``, ``\\``, ``%5c``, double encoding) — so that nothing outside ``/api/v1/``
is reachable upstream, whichever way the upstream decodes the path.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

API_PREFIX = b"/api/v1/"
_DOT_SEGMENT = re.compile(rb"(?:^|/)\.{1,2}(?:/|$)")


class RouteKind(enum.Enum):
    FORWARD = "forward"
    HEALTH = "health"
    METRICS = "metrics"
    METRICS_RAW = "metrics_raw"
    METRICS_JSON = "metrics_json"
    NOT_FOUND = "not_found"
    BAD_TARGET = "bad_target"


LOCAL_ROUTES = {
    b"/health": RouteKind.HEALTH,
    b"/metrics": RouteKind.METRICS,
    b"/metrics/raw": RouteKind.METRICS_RAW,
    b"/metrics/json": RouteKind.METRICS_JSON,
}


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    path: bytes = b""  # for FORWARD: the part after /api/v1, query included ("/chat/…?x=1")
    public: bool = False

    @property
    def label(self) -> str:
        """A bounded name for metrics and logs."""
        return self.kind.value


def route(target: bytes, public_endpoints: frozenset[bytes]) -> Route:
    if target.startswith((b"http://", b"https://")):
        # absolute-form: the authority is ours whatever it says; keep path and query
        slash = target.find(b"/", target.index(b"//") + 2)
        target = target[slash:] if slash >= 0 else b"/"
    if not target.startswith(b"/") or b"#" in target:
        return Route(RouteKind.BAD_TARGET)
    path, _, _query = target.partition(b"?")
    if has_dot_segment(path):
        return Route(RouteKind.BAD_TARGET)
    if path.startswith(API_PREFIX) and len(path) > len(API_PREFIX):
        public = path.rstrip(b"/") in public_endpoints
        return Route(RouteKind.FORWARD, target[len(API_PREFIX) - 1:], public)
    kind = LOCAL_ROUTES.get(path.rstrip(b"/") or path)
    return Route(kind) if kind else Route(RouteKind.NOT_FOUND)


def has_dot_segment(path: bytes) -> bool:
    """A ``.`` or ``..`` segment in the path as written, or once or twice percent-decoded,
    with backslashes read as slashes (some servers do)."""
    if b"." not in path and b"%" not in path:
        return False  # nothing to decode, no dot: the common case, decided at once
    for _ in range(3):
        if _DOT_SEGMENT.search(path.replace(b"\\", b"/")):
            return True
        decoded = unquote_to_bytes(path)
        if decoded == path:
            return False
        path = decoded
    return False
