"""The ``GET /api/v1/models`` cache: answers from memory, one upstream fetch at a time.

Owns, per query string (the query changes the answer, so it is part of the key): the cached
document, its strong ETag and its gzip form (made once per stored body, on first demand),
freshness on an injected monotonic clock, single-flight fetches, stale-while-revalidate
with a bound on how stale, conditional requests (RFC 9110 §13.1.2), the ``free_only``
filter and the free/non-free view of every listed model.

Knows nothing of sockets, h11 or keys: the caller passes a ``fetch`` coroutine (query →
upstream answer, identity-encoded) and turns an :class:`Answer` into a response, adding the
framing (Content-Length / Date / Server). A :class:`Fetched` returned by :meth:`answer` is
the upstream's own answer, passed through uncached.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import functools
import gzip
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
PLAIN = b""  # the query of ``GET /api/v1/models`` itself: the list behind ``is_free``
GZIP_LEVEL = 6  # ~3x faster than 9 for a few % more bytes; paid once per stored body
MAX_DELTA_SECONDS = 2**31  # RFC 9111 §1.2.2: a larger delta-seconds is taken as this


@dataclass(frozen=True)
class Fetched:
    status: int
    headers: list[tuple[bytes, bytes]]  # as received (raw names)
    body: bytes


Fetch = Callable[[bytes], Awaitable[Fetched]]  # query (b"" or b"?x=1") → upstream answer


@dataclass(frozen=True)
class Answer:
    """A response made from the cache. ``headers`` carry no framing, Date or Server.

    ``content_length`` is the length of the body a GET gets, also for HEAD (whose ``body``
    is empty); None for a 304, which has no content.
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    content_length: int | None = None


class CacheStatus(enum.Enum):
    """What ``X-Orproxy-Cache`` says about one answer."""

    HIT = b"HIT"  # fresh copy
    MISS = b"MISS"  # this request waited for the upstream
    STALE = b"STALE"  # past its freshness, within the stale bound


class Freshness(enum.Enum):
    FRESH = "fresh"
    STALE = "stale"  # servable while a refresh runs or the upstream fails
    EXPIRED = "expired"  # beyond the stale bound: a miss


def freshness(elapsed: float, ttl: float, stale: float) -> Freshness:
    if elapsed < ttl:
        return Freshness.FRESH
    return Freshness.STALE if elapsed < ttl + stale else Freshness.EXPIRED


# --- pricing -----------------------------------------------------------------------------

def _is_zero_price(value: object) -> bool:
    if isinstance(value, bool):  # JSON false is not a price
        return False
    if isinstance(value, int | float):
        return value == 0
    if isinstance(value, str):
        try:
            price = Decimal(value)
        except InvalidOperation:
            return False
        return price.is_finite() and price == 0
    return False


def is_free_pricing(pricing: object) -> bool:
    """Every price of a model's ``pricing`` is zero ("0", "0.0", 0).

    A missing or empty pricing is not free (nothing says it costs nothing); a negative
    price ("-1", OpenRouter's "variable" for routers) is not free; neither is anything that
    is not a number.
    """
    if not isinstance(pricing, dict) or not pricing:
        return False
    return all(_is_zero_price(v) for v in pricing.values())


# --- request headers ---------------------------------------------------------------------

def _qvalue(params: bytes) -> float | None:
    """The q of ``;q=0.5;x=y`` (1.0 when absent); None when malformed (RFC 9110 §12.4.2)."""
    for param in params.split(b";"):
        name, eq, value = param.partition(b"=")
        if name.strip().lower() != b"q":
            continue
        value = value.strip()
        if not eq or not value or len(value) > 5 or value[:1] not in (b"0", b"1"):
            return None
        if len(value) > 1 and (value[1:2] != b"." or (value[2:] and not value[2:].isdigit())):
            return None
        q = float(value)
        return q if q <= 1.0 else None
    return 1.0


def accepts_gzip(accept_encoding: bytes) -> bool:
    """Whether an ``Accept-Encoding`` value allows gzip (RFC 9110 §12.5.3).

    ``gzip`` (or its alias ``x-gzip``) with q > 0, else ``*`` with q > 0. A coding listed
    twice counts with its lowest q, so any refusal refuses. q-values decide whether gzip is
    acceptable, not preference over identity (as nginx does). Members with a malformed q
    are ignored.
    """
    found: dict[bytes, float] = {}
    for member in accept_encoding.split(b","):
        coding, _, params = member.partition(b";")
        coding = coding.strip().lower()
        q = _qvalue(params)
        if coding and q is not None:
            found[coding] = min(q, found.get(coding, q))
    for coding in (b"gzip", b"x-gzip", b"*"):
        if coding in found:
            return found[coding] > 0
    return False


# Clients send a handful of distinct values; long ones (rare, maybe hostile) are not kept.
_accepts_gzip_cached = functools.lru_cache(maxsize=128)(accepts_gzip)


def _gzip_wanted(accept_encoding: bytes) -> bool:
    if len(accept_encoding) > 256:
        return accepts_gzip(accept_encoding)
    return _accepts_gzip_cached(accept_encoding)


def _opaque_tags(value: bytes) -> list[bytes] | None:
    """The opaque tags (quotes kept, ``W/`` dropped) of an entity-tag list, or None if the
    value is malformed. ``*`` comes back as ``[b"*"]``.

    A tag may contain commas (etagc, RFC 9110 §8.8.3), so the list is scanned, not split.
    """
    tags: list[bytes] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in b" \t,":
            i += 1
        if i == n:
            return tags
        if value[i] == 0x2A:  # "*"
            tags.append(b"*")
            i += 1
            continue
        if value.startswith(b"W/", i):
            i += 2
        if i == n or value[i] != 0x22:
            return None
        end = value.find(b'"', i + 1)
        if end < 0:
            return None
        tags.append(value[i:end + 1])
        i = end + 1
        if i < n and value[i] not in b" \t,":
            return None


def none_match(if_none_match: bytes, etag: bytes) -> bool:
    """Whether ``If-None-Match`` matches ``etag`` by weak comparison (RFC 9110 §13.1.2):
    the opaque tags are equal whatever ``W/`` says; ``*`` matches any current representation.
    A malformed field matches nothing (the full answer is always safe)."""
    tags = _opaque_tags(if_none_match)
    if tags is None:
        return False
    opaque = etag[2:] if etag.startswith(b"W/") else etag
    return any(tag == b"*" or tag == opaque for tag in tags)


class Conditions(NamedTuple):
    """What a request says about how it wants the answer."""

    gzip: bool
    if_none_match: bytes | None


def read_conditions(request_headers: Sequence[tuple[bytes, bytes]]) -> Conditions:
    accept: list[bytes] = []
    inm: list[bytes] = []
    for name, value in request_headers:
        lower = name.lower()
        if lower == b"accept-encoding":
            accept.append(value)
        elif lower == b"if-none-match":
            inm.append(value)
    # Repeated fields are one comma-joined list (RFC 9110 §5.3).
    return Conditions(_gzip_wanted(b",".join(accept)) if accept else False,
                      b",".join(inm) if inm else None)


# --- documents ---------------------------------------------------------------------------

class Unusable(Exception):
    """An upstream answer this cache cannot keep (not 200, too big, content-encoded, not a
    models list): passed through, never stored."""


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for raw, value in headers:
        if raw.lower() == name:
            return value
    return None


def _age(headers: Sequence[tuple[bytes, bytes]]) -> int:
    """The upstream's own ``Age`` (RFC 9111 §5.1); 0 when absent or invalid."""
    value = _header(headers, b"age")
    if value is None or not value.strip().isdigit():
        return 0
    return min(int(value), MAX_DELTA_SECONDS)


def _models(body: bytes) -> tuple[dict[str, Any], list[Any]]:
    try:
        doc = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise Unusable("not JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise Unusable("not a models list")
    return doc, doc["data"]


def _model_id(model: object) -> str | None:
    mid = model.get("id") if isinstance(model, dict) else None
    return mid if isinstance(mid, str) else None


def _compact(doc: dict[str, Any], data: list[Any]) -> bytes:
    """``doc`` with ``data`` replaced, every other field in its place, serialised compactly."""
    return json.dumps({**doc, "data": data}, separators=(",", ":"),
                      ensure_ascii=False).encode()


def _etag(body: bytes) -> bytes:
    digest = hashlib.sha256(body).digest()[:18]
    return b'"' + base64.urlsafe_b64encode(digest) + b'"'


class Entry:
    """One cached answer. The gzip form is made on first demand, once per body."""

    __slots__ = ("_gz", "body", "content_type", "etag", "fetched_at", "gz_etag", "ids",
                 "retry_at", "upstream_age")
    body: bytes
    ids: frozenset[str]
    etag: bytes
    gz_etag: bytes
    _gz: bytes | None

    def __init__(self, body: bytes, ids: frozenset[str], content_type: bytes,
                 fetched_at: float, upstream_age: int) -> None:
        self.content_type = content_type
        self.fetched_at = fetched_at
        self.upstream_age = upstream_age
        self.retry_at = 0.0  # no background refresh before this (after a failed one)
        self.replace_body(body, ids)

    def replace_body(self, body: bytes, ids: frozenset[str]) -> None:
        self.body = body
        self.ids = ids
        self.etag = _etag(body)
        # A strong ETag names one representation: the gzip form has its own (RFC 9110 §8.8.3).
        self.gz_etag = self.etag[:-1] + b'-gz"'
        self._gz = None

    def gzipped(self) -> bytes:
        if self._gz is None:
            self._gz = gzip.compress(self.body, compresslevel=GZIP_LEVEL, mtime=0)
        return self._gz

    def gzip_pays(self) -> bool:
        """A body too small to shrink is sent as it is."""
        return len(self.gzipped()) < len(self.body)

    def size(self) -> int:
        return len(self.body) + (len(self._gz) if self._gz is not None else 0)

    def __repr__(self) -> str:
        return f"<Entry {len(self.body)}B {len(self.ids)} models etag={self.etag.decode()}>"


# --- the cache ---------------------------------------------------------------------------

class ModelsCache:
    """Per-query cache of the models list (LRU-bounded), with single-flight fetches."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        ttl_seconds: float,
        free_only: bool,
        stale_seconds: float | None = None,
        max_entries: int = 32,
        max_body_bytes: int = 16 * 1024 * 1024,
        retry_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_seconds < 0 or (stale_seconds is not None and stale_seconds < 0):
            raise ValueError("ttl_seconds and stale_seconds must not be negative")
        if max_entries < 1 or max_body_bytes < 1:
            raise ValueError("max_entries and max_body_bytes must be positive")
        self._fetch = fetch
        self._ttl = ttl_seconds
        # With no freshness at all nothing is kept beyond its own flight.
        default_stale = max(ttl_seconds, 3600.0) if ttl_seconds > 0 else 0.0
        self._stale = default_stale if stale_seconds is None else stale_seconds
        self._free_only = free_only
        self._max_entries = max_entries
        self._max_body = max_body_bytes
        self._retry = retry_seconds
        self._clock = clock
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._flights: dict[bytes, asyncio.Task[Entry | Fetched]] = {}
        self._free: dict[str, bool] | None = None  # model id → free, from the plain list
        self._plain_retry_at = 0.0  # ensure_loaded fetches nothing before this
        self._stats = dict.fromkeys(
            ("hits", "misses", "stale_served", "not_modified", "passed_through", "fetches",
             "fetch_failures", "refreshes", "refresh_failures"), 0)

    def __repr__(self) -> str:
        return (f"<ModelsCache {len(self._entries)} entries, {len(self._flights)} in flight, "
                f"ttl={self._ttl}s free_only={self._free_only}>")

    # --- serving -----------------------------------------------------------------------

    async def answer(self, query: bytes, request_headers: Sequence[tuple[bytes, bytes]],
                     head_only: bool = False) -> Answer | Fetched:
        """The answer to ``GET/HEAD /api/v1/models<query>``.

        A Fetched is the upstream's answer to the GET, passed through as received (for HEAD
        the caller sends its head only). A fetch exception on a miss propagates, to every
        request waiting on that flight.
        """
        now = self._clock()
        entry = self._entries.get(query)
        if entry is not None:
            state = freshness(now - entry.fetched_at, self._ttl, self._stale)
            if state is not Freshness.EXPIRED:
                self._entries.move_to_end(query)
                if state is Freshness.STALE:
                    self._maybe_refresh(query, entry, now)
                return self._serve(entry, state, request_headers, head_only, now)
            del self._entries[query]  # too stale to serve, ever
        self._stats["misses"] += 1
        result = await asyncio.shield(self._flight(query, refresh=False))
        if isinstance(result, Fetched):
            self._stats["passed_through"] += 1
            return result
        return self._serve(result, None, request_headers, head_only, self._clock())

    def _serve(self, entry: Entry, state: Freshness | None,
               request_headers: Sequence[tuple[bytes, bytes]], head_only: bool,
               now: float) -> Answer:
        """Render ``entry`` for one request; ``state`` None means it was just fetched."""
        label = self._count(state)
        conditions = read_conditions(request_headers)
        gz = conditions.gzip and entry.gzip_pays()
        body, etag = (entry.gzipped(), entry.gz_etag) if gz else (entry.body, entry.etag)
        elapsed = max(now - entry.fetched_at, 0.0)
        age = min(int(elapsed) + entry.upstream_age, MAX_DELTA_SECONDS)
        left = int(self._ttl - elapsed) if self._ttl > elapsed else 0
        # Caches take a response as fresh while max-age > Age (RFC 9111 §4.2.1), so
        # max-age counts from the copy's birth: what is left is max-age minus Age.
        max_age = 0 if label is CacheStatus.STALE else age + left
        headers: Headers = [
            (b"ETag", etag),
            (b"Cache-Control", b"public, max-age=%d" % max_age),
            (b"Age", b"%d" % age),
            (b"Vary", b"Accept-Encoding"),
            (b"X-Orproxy-Cache", label.value),
        ]
        if conditions.if_none_match is not None and none_match(conditions.if_none_match, etag):
            self._stats["not_modified"] += 1
            return Answer(304, headers, b"")  # RFC 9110 §15.4.5: validators, no content
        headers.insert(0, (b"Content-Type", entry.content_type))
        if gz:
            headers.append((b"Content-Encoding", b"gzip"))
        return Answer(200, headers, b"" if head_only else body, len(body))

    def _count(self, state: Freshness | None) -> CacheStatus:
        if state is None:
            return CacheStatus.MISS  # counted when it missed
        if state is Freshness.FRESH:
            self._stats["hits"] += 1
            return CacheStatus.HIT
        self._stats["stale_served"] += 1
        return CacheStatus.STALE

    # --- fetching ----------------------------------------------------------------------

    def _flight(self, query: bytes, *, refresh: bool) -> asyncio.Task[Entry | Fetched]:
        """The one running fetch of ``query``, started if none runs."""
        task = self._flights.get(query)
        if task is None:
            name = f"models-fetch{query[:64]!r}"
            task = asyncio.create_task(self._fetch_and_store(query, refresh=refresh), name=name)
            self._flights[query] = task
            task.add_done_callback(functools.partial(self._landed, query))
        return task

    def _landed(self, query: bytes, task: asyncio.Task[Entry | Fetched]) -> None:
        # The flight leaves in its own ``finally``, unless cancelled before it ever ran.
        if self._flights.get(query) is task:
            del self._flights[query]
        # Nobody may await a background refresh: its failure was logged and counted.
        if not task.cancelled():
            task.exception()

    def _maybe_refresh(self, query: bytes, entry: Entry, now: float) -> None:
        if query not in self._flights and now >= entry.retry_at:
            self._stats["refreshes"] += 1
            self._flight(query, refresh=True)

    async def _fetch_and_store(self, query: bytes, *, refresh: bool) -> Entry | Fetched:
        try:
            self._stats["fetches"] += 1
            try:
                fetched = await self._fetch(query)
            except Exception as exc:
                self._failed(query, refresh, type(exc).__name__)
                raise
            try:
                return self._store(query, fetched)
            except Unusable as exc:
                self._failed(query, refresh, f"status {fetched.status}: {exc}")
                return fetched
        finally:
            if self._flights.get(query) is asyncio.current_task():
                del self._flights[query]

    def _failed(self, query: bytes, refresh: bool, why: str) -> None:
        now = self._clock()
        self._stats["refresh_failures" if refresh else "fetch_failures"] += 1
        entry = self._entries.get(query)
        if entry is not None:
            entry.retry_at = now + self._retry
        if query == PLAIN:
            self._plain_retry_at = now + self._retry
        # A failed refresh is ours to report; a failed miss reaches its client (and the
        # access log) as the upstream's answer or an error.
        log.log(logging.WARNING if refresh else logging.INFO,
                "models %r: upstream fetch failed (%s)%s", query[:200], why,
                "; the stale copy is served meanwhile" if entry is not None else "")

    def _store(self, query: bytes, fetched: Fetched) -> Entry:
        """Keep a 200 (Unusable if it cannot be kept) and learn which models are free."""
        if fetched.status != 200:
            raise Unusable("not 200")
        if len(fetched.body) > self._max_body:
            raise Unusable(f"body over {self._max_body} bytes")
        encoding = _header(fetched.headers, b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            raise Unusable("content-encoded body")
        doc, data = _models(fetched.body)
        if query == PLAIN:
            self._free = {mid: is_free_pricing(m.get("pricing")) for m in data
                          if (mid := _model_id(m)) is not None}
        body = fetched.body  # served byte for byte unless filtered
        if self._free_only:
            data = [m for m in data if isinstance(m, dict) and is_free_pricing(m.get("pricing"))]
            body = _compact(doc, data)
        ids = frozenset(mid for m in data if (mid := _model_id(m)) is not None)
        content_type = _header(fetched.headers, b"content-type") or b"application/json"
        entry = Entry(body, ids, content_type, self._clock(), _age(fetched.headers))
        self._entries[query] = entry
        self._entries.move_to_end(query)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return entry

    # --- free models -------------------------------------------------------------------

    def is_free(self, model_id: str) -> bool | None:
        """Whether the last plain list showed ``model_id`` with every price zero.

        None while no list has been fetched; False for a model the list does not show. A
        ``:free`` variant is judged by its own listing, like any other id.
        """
        if self._free is None:
            return None
        return self._free.get(model_id, False)

    async def ensure_loaded(self) -> None:
        """Fetch the plain list once if none is known yet, so ``is_free`` can answer.

        Upstream failures are logged, not raised (``is_free`` stays None); after one, no
        new fetch starts for ``retry_seconds``.
        """
        if self._free is not None or self._clock() < self._plain_retry_at:
            return
        with contextlib.suppress(Exception):
            await asyncio.shield(self._flight(PLAIN, refresh=False))

    def drop(self, model_id: str) -> None:
        """Remove a model from every cached list (its free variant ended, say).

        Bodies that listed it are re-serialised and get new ETags; the next refresh brings
        whatever the upstream lists then.
        """
        if self._free is not None:
            self._free.pop(model_id, None)
        for entry in self._entries.values():
            if model_id in entry.ids:
                doc, data = _models(entry.body)
                data = [m for m in data if _model_id(m) != model_id]
                entry.replace_body(_compact(doc, data), entry.ids - {model_id})

    # --- housekeeping ------------------------------------------------------------------

    def snapshot(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self._stats)
        out["entries"] = len(self._entries)
        out["bytes"] = sum(e.size() for e in self._entries.values())
        out["in_flight"] = len(self._flights)
        return out

    async def join(self) -> None:
        """Wait until no fetch runs (whatever their outcome)."""
        while self._flights:
            await asyncio.gather(*self._flights.values(), return_exceptions=True)

    async def close(self) -> None:
        """Cancel running fetches (waiting requests see CancelledError) and wait for them."""
        tasks = list(self._flights.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

