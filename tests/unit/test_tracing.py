"""W3C trace context, from the client's call through every stage to the upstream model server
and the callback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence

import httpx
import orjson
import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from tests.conftest import NodeFactory
from tests.helpers import Receiver, receiving, scripted_upstream, upstream, wait_final

CLIENT_TRACE, CLIENT_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
CLIENT = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
STAGES = ("prepare", "generate", "finalize", "deliver")


class Upstream:
    """An OpenAI-compatible server answering ``status`` (200: a streamed "ok"); keeps the
    headers of each call."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.headers: list[dict[str, str]] = []

    async def answer(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        if self.status != 200:
            return web.json_response({"error": {"message": "no"}}, status=self.status)
        chunk = {"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]}
        body = b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n"
        return web.Response(body=body, content_type="text/event-stream")


@contextlib.asynccontextmanager
async def deployment(
    node: NodeFactory, model: Upstream, receiver: Receiver
) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    async with (
        scripted_upstream(model.answer) as url,
        receiving(receiver) as hook,
        node(settings=upstream(url)) as http,
    ):
        yield hook, http


class Spans(InMemorySpanExporter):
    """Keeps every span; ``delivered`` is set when a deliver span ends (after its callback)."""

    def __init__(self) -> None:
        super().__init__()
        self.delivered = asyncio.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if any(s.name == "deliver" for s in spans):
            self.delivered.set()
        return super().export(spans)


@pytest.fixture
def spans() -> Iterator[Spans]:
    """A tracer provider keeping every span, set up for this test alone (OpenTelemetry lets a
    process set its provider once: the test puts the one before back)."""
    exporter = Spans()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    before, once = trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE = before, once
        provider.shutdown()


def traceparent(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"


async def test_without_a_tracer_the_clients_trace_context_reaches_the_model_server_and_the_callback(
    node: NodeFactory,
) -> None:
    model, receiver = Upstream(), Receiver()
    async with deployment(node, model, receiver) as (hook, http):
        submitted = await http.post(
            "/v1/requests", json={"prompt": "hi", "callback_url": hook}, headers=CLIENT
        )
        async with asyncio.timeout(30):
            await receiver.called.wait()
        assert (await wait_final(http, submitted.json()["id"]))["output"] == "ok"
    assert model.headers[0]["traceparent"] == CLIENT["traceparent"]
    assert receiver.calls[0][0]["traceparent"] == CLIENT["traceparent"]


async def test_with_a_tracer_each_stage_is_a_span_of_the_clients_trace_one_after_another(
    node: NodeFactory, spans: Spans
) -> None:
    model, receiver = Upstream(), Receiver()
    async with deployment(node, model, receiver) as (hook, http):
        submitted = await http.post(
            "/v1/requests", json={"prompt": "hi", "callback_url": hook}, headers=CLIENT
        )
        rid = submitted.json()["id"]
        async with asyncio.timeout(30):
            await spans.delivered.wait()
    finished = spans.get_finished_spans()
    assert {s.context.trace_id for s in finished if s.context} == {int(CLIENT_TRACE, 16)}
    stage = {s.name: s for s in finished if s.attributes and s.attributes.get("conveyor.request.id") == rid}
    assert sorted(stage) == sorted(STAGES)  # and no span of the projector's
    assert all(s.kind == SpanKind.CONSUMER for s in stage.values())
    server = next(s for s in finished if s.kind == SpanKind.SERVER)
    assert server.parent is not None
    assert server.parent.span_id == int(CLIENT_SPAN, 16)
    gateway = {s.context.span_id for s in finished if s.name not in STAGES and s.context}
    # Each stage's span is the parent of the next: the chain the events made.
    parents = [stage[name].parent for name in STAGES]
    assert parents[0] is not None
    assert parents[0].span_id in gateway
    for before, parent in zip(STAGES, parents[1:], strict=False):
        context = stage[before].context
        assert parent is not None
        assert context is not None
        assert parent.span_id == context.span_id, before
    # The calls out carry the span of the stage that made them.
    assert model.headers[0]["traceparent"] == traceparent(stage["generate"])
    assert receiver.calls[0][0]["traceparent"] == traceparent(stage["deliver"])


async def test_with_a_tracer_a_stage_that_gives_up_marks_its_span_failed(
    node: NodeFactory, spans: Spans
) -> None:
    model, receiver = Upstream(status=400), Receiver()
    async with deployment(node, model, receiver) as (_, http):
        submitted = await http.post("/v1/requests", json={"prompt": "hi"}, headers=CLIENT)
        view = await wait_final(http, submitted.json()["id"])
    assert view["status"] == "failed"
    (generate,) = [s for s in spans.get_finished_spans() if s.name == "generate"]
    assert generate.status.status_code == StatusCode.ERROR
    assert [e.name for e in generate.events] == ["exception"]  # refused: one attempt, not retried
