"""What the proxy reads from a client's request body (and never changes): the model asked
for and the conversation it belongs to.

Bodies are read only for POSTs that say they are JSON. The first ``READ_BYTES`` are enough:
``model`` and the opening messages come first in every client we know, and reading a
32 MiB upload whole would cost a second copy of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orproxy.proxy.sticky import conversation_of, request_fields

READ_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class RequestInfo:
    model: str | None  # the model asked for (the first of `models` when only those are given)
    conversation: str | None  # see sticky.conversation_id


NOTHING = RequestInfo(None, None)


def request_info(method: bytes, headers: Sequence[tuple[bytes, bytes]],
                 body: Sequence[bytes], *, conversation: bool = True) -> RequestInfo:
    """The model and, if asked, the conversation (naming it costs a hash)."""
    if method != b"POST" or not body or not _is_json(headers):
        return NOTHING
    whole = sum(map(len, body)) <= READ_BYTES
    head = _first_bytes(body, READ_BYTES)
    # a whole body is parsed; the head of a larger one is scanned (it is cut mid-JSON)
    fields = request_fields(head, full_parse_bytes=READ_BYTES if whole else 0)
    model = fields.get("model")
    if not isinstance(model, str):
        models = fields.get("models")
        model = models[0] if isinstance(models, list) and models and isinstance(
            models[0], str) else None
    return RequestInfo(model, conversation_of(headers, fields) if conversation else None)


def _is_json(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


def _first_bytes(parts: Sequence[bytes], limit: int) -> bytes:
    if len(parts) == 1:
        return bytes(parts[0][:limit])
    out = bytearray()
    for part in parts:
        out += part[:limit - len(out)]
        if len(out) >= limit:
            break
    return bytes(out)
