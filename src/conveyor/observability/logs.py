"""The processes' own messages (not the event log): a level, and text for people or JSON lines for
a log pipeline (``--log-level``, ``--log-format``; the worker processes of ``conveyor up`` inherit
both).

A JSON line has ``time``, ``level``, ``logger`` and ``message``, the fields a message was given
(``extra=``: a dead letter's ``stage``, ``request_id``, ``event_id``, ``topic``), ``exception`` with
its traceback, and the ``trace_id`` and ``span_id`` of the span it was written in (with a tracer
provider: observability/tracing.py), so a log search and a trace find each other.
"""

from __future__ import annotations

import datetime
import logging
import sys
from typing import Any

import orjson
from opentelemetry import trace

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What every LogRecord has: the rest of its attributes are the fields it was given.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"], line["span_id"] = f"{context.trace_id:032x}", f"{context.span_id:016x}"
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure(level: str = "warning", fmt: str = "text") -> None:
    """Send every logger's messages at ``level`` or above to stderr, formatted as ``fmt``."""
    if level not in LEVELS or fmt not in FORMATS:
        raise ValueError(f"log level is one of {', '.join(LEVELS)} and format one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else logging.Formatter(_TEXT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
