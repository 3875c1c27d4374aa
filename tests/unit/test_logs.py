"""The processes' own messages: a level, and text or JSON lines."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from conveyor.cli import command_line, settings_from
from conveyor.observability import logs


@pytest.fixture
def restored() -> Iterator[None]:
    """The root logger's handlers and level as they were before the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_json_line_has_the_message_its_fields_its_trace_and_its_exception(
    restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("info", "json")
    logger = logging.getLogger("conveyor.test")
    logger.debug("not at info")
    span = NonRecordingSpan(SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1)))
    with trace.use_span(span):
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("stage %s gave up", "prepare", extra={"stage": "prepare", "request_id": "r1"})
    (line,) = capsys.readouterr().err.splitlines()
    said = orjson.loads(line)
    assert said["time"].endswith("+00:00")
    assert (said["level"], said["logger"], said["message"]) == (
        "error",
        "conveyor.test",
        "stage prepare gave up",
    )
    assert (said["stage"], said["request_id"]) == ("prepare", "r1")
    assert (said["trace_id"], said["span_id"]) == (f"{0xABC:032x}", f"{0xDEF:016x}")
    assert said["exception"].startswith("Traceback")
    assert "ValueError: bad" in said["exception"]


def test_text_is_the_default_and_a_wrong_choice_is_a_clear_error(
    restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure()
    logging.getLogger("conveyor.test").info("not at warning")
    logging.getLogger("conveyor.test").warning("said %d", 1)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(" WARNING conveyor.test: said 1")
    with pytest.raises(ValueError, match="log level is one of debug, info, warning, error"):
        logs.configure("loud")


def test_the_flags_reach_the_settings_that_worker_processes_inherit() -> None:
    args = command_line().parse_args(["up", "--log-level", "info", "--log-format", "json"])
    settings = settings_from(args)
    assert (settings.log_level, settings.log_format) == ("info", "json")
    env = settings.to_env()
    assert (env["CONVEYOR_LOG_LEVEL"], env["CONVEYOR_LOG_FORMAT"]) == ("info", "json")
