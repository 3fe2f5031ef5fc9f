"""Logging set-up: text or JSON lines, and the request id on every line of a request.

The connection loop sets ``request_id`` (a context variable) while it serves a request, so
every line logged on that request's behalf carries it without being passed around. Lines
may carry structured fields (``extra={"fields": {...}}``): the text format appends them as
``k=v``, the JSON format as keys. Nothing here ever sees a key: callers log key ids.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

from orproxy.keys import Change, KeyEvent

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
LOG_FORMATS = ("text", "json")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", "")
        if rid and f"rid={rid}" not in line:
            line += f" rid={rid}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, request_id, fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            doc["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                doc.setdefault(key, value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def _iso(created: float) -> str:
    whole = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + \
        f".{int((created - whole) * 1000):03d}Z"


def setup_logging(level: str, http_level: str, fmt: str = "text") -> None:
    """Root logging to stderr at ``level``; the access log at ``http_level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("orproxy.access").setLevel(http_level)


def key_event_line(event: KeyEvent) -> tuple[int, str, dict[str, Any]]:
    """How a key's change of state reads in the log: level, message, fields."""
    who = f"key {event.key_id} ({event.masked})"
    fields: dict[str, Any] = {"event": f"key_{event.change.value}", "key": event.key_id,
                              "reason": event.reason}
    words = f" — OpenRouter: {event.message!r}" if event.message else ""
    if event.change is Change.RESTED:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.until))
        scope = []
        if event.account_wide and event.account:
            scope.append(f"with every key of account {event.account!r}")
        if event.free_only:
            scope.append("for free models only")
        extra = f" ({', '.join(scope)})" if scope else ""
        fields.update(until=until, seconds=round(event.seconds), free_only=event.free_only)
        return (logging.WARNING, f"{who} rests {event.seconds:.0f}s until {until}{extra}: "
                f"{event.reason}{words}", fields)
    if event.change is Change.DISABLED:
        return logging.WARNING, f"{who} disabled: {event.reason}{words}", fields
    return logging.INFO, f"{who} is back in rotation (rested for {event.reason})", fields
