"""W3C trace context across the log: one trace shows a request from its HTTP call to its callback.

Every event carries a ``traceparent``. The gateway stamps a request it accepts with the trace
context current there: FastAPI's server span when a tracer provider is set up, else the
client's own ``traceparent`` header (``TraceHeader``). With a tracer provider (the OpenTelemetry
SDK, e.g. under ``opentelemetry-instrument``), each stage handles an event inside a span that
is a child of the event's context, and the events it publishes, the callback it makes and the
call to an upstream model server carry that span's: prepare, generate, finalize and deliver
follow one another in the request's trace. Without one, no span is made and the context passes
through unchanged, so a traced service on either side still sees a single trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Receive, Scope, Send

from conveyor.events import Envelope

TRACEPARENT = "traceparent"
_TRACEPARENT_HEADER = TRACEPARENT.encode()
_W3C = TraceContextTextMapPropagator()


def tracer() -> trace.Tracer | None:
    """Conveyor's tracer, or None while no tracer provider is set up (nothing would record)."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    return trace.get_tracer("conveyor")


def current_traceparent(span: Span | None = None) -> str:
    """The ``traceparent`` of ``span`` (default: the current one); "" without one."""
    context = (span or trace.get_current_span()).get_span_context()
    if not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def _parent(traceparent: str) -> otel_context.Context | None:
    # W3C's format whatever propagators the application set up: it is what events carry.
    return _W3C.extract({TRACEPARENT: traceparent}) if traceparent else None


@contextlib.contextmanager
def stage_spans(tracer: trace.Tracer, stage: str, events: Sequence[Envelope]) -> Iterator[list[Envelope]]:
    """A consumer span per event, each a child of its event's context, and the events as the
    stage's handler sees them: carrying their span's context, which ``derive`` passes on. The
    span of a lone event is the current one (so a failure can be recorded on it)."""
    spans = [
        tracer.start_span(
            stage,
            context=_parent(event.traceparent),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.operation.type": "process",
                "messaging.message.id": event.id,
                "conveyor.event.type": event.type,
                "conveyor.request.id": event.request_id,
                "conveyor.tenant": event.tenant,
            },
        )
        for event in events
    ]
    stamped = [
        dataclasses.replace(event, traceparent=current_traceparent(span))
        for event, span in zip(events, spans, strict=True)
    ]
    try:
        if len(spans) == 1:
            with trace.use_span(spans[0], end_on_exit=False, record_exception=False):
                yield stamped
        else:
            yield stamped
    finally:
        for span in spans:
            span.end()


def attempt_failed(exc: Exception) -> None:
    """Record a failed attempt on the current span (a stage's, handling one event)."""
    trace.get_current_span().record_exception(exc)


def failed(reason: str) -> None:
    """Mark the current span (a stage's, handling one event) as failed for good."""
    trace.get_current_span().set_status(Status(StatusCode.ERROR, reason))


class TraceHeader:
    """Without a tracer provider, the client's ``traceparent`` header is made the current context
    of its request, so what the gateway accepts carries it on. (With a provider, FastAPI's server
    span is the current one, itself a child of that header.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.active = tracer() is None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        value = None
        if self.active and scope["type"] == "http":
            value = next((v for k, v in scope["headers"] if k == _TRACEPARENT_HEADER), None)
        parent = _parent(value.decode("latin-1")) if value else None
        if parent is None or not trace.get_current_span(parent).get_span_context().is_valid:
            await self.app(scope, receive, send)
            return
        token = otel_context.attach(parent)
        try:
            await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)
