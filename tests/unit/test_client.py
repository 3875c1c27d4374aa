"""conveyor.client against a real gateway, through a network that drops what it is told to."""

from __future__ import annotations

import httpx
import orjson
import pytest

from conveyor.client import Client
from conveyor.errors import NotFoundError, RejectedError, UnavailableError
from conveyor.models.simulated import SimulatedModel
from tests.conftest import NodeFactory

PROMPT = "Write a haiku about queues"


class Flaky(httpx.AsyncBaseTransport):
    """The network between client and gateway: loses the answer to the first ``lost_answers``
    POSTs (after the gateway took them) and cuts the first ``cut_streams`` event streams after
    ``cut_after`` bytes: a reset, or (``clean``) an end as if the gateway had closed the stream."""

    def __init__(
        self, *, lost_answers: int = 0, cut_streams: int = 0, cut_after: int = 0, clean: bool = False
    ) -> None:
        self._real = httpx.AsyncHTTPTransport()
        self.lost_answers, self.cut_streams, self.cut_after = lost_answers, cut_streams, cut_after
        self.clean = clean
        self.seen: list[tuple[str, str, str | None]] = []  # method, path, Last-Event-ID
        self.submitted: list[tuple[str, str]] = []  # each POST's Idempotency-Key and the id answered

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path, request.headers.get("Last-Event-ID")))
        response = await self._real.handle_async_request(request)
        if request.method == "POST":
            body = await response.aread()
            self.submitted.append((request.headers["Idempotency-Key"], orjson.loads(body)["id"]))
            if self.lost_answers:  # the gateway answered; the answer is lost on the way
                self.lost_answers -= 1
                raise httpx.ReadError("connection reset", request=request)
            return httpx.Response(response.status_code, headers=response.headers, content=body)
        if request.url.path.endswith("/events") and self.cut_streams:
            self.cut_streams -= 1
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_Cut(response, self.cut_after, clean=self.clean),
            )
        return response

    async def aclose(self) -> None:
        await self._real.aclose()


class _Cut(httpx.AsyncByteStream):
    """The body of ``response`` up to ``limit`` bytes, then a reset, or (``clean``) its end."""

    def __init__(self, response: httpx.Response, limit: int, *, clean: bool) -> None:
        self._response, self._limit, self._clean = response, limit, clean

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        sent = 0
        async for chunk in self._response.aiter_raw():
            piece = chunk[: self._limit - sent]
            sent += len(piece)
            yield piece
            if sent >= self._limit:
                await self._response.aclose()
                if self._clean:
                    return
                raise httpx.RemoteProtocolError("peer closed connection mid-stream")

    async def aclose(self) -> None:
        await self._response.aclose()


def client(http: httpx.AsyncClient, transport: httpx.AsyncBaseTransport | None = None) -> Client:
    return Client(str(http.base_url), transport=transport, backoff=0.01)


async def test_a_submit_whose_answer_is_lost_is_sent_again_and_is_the_same_request(node: NodeFactory) -> None:
    flaky = Flaky(lost_answers=2)
    async with node() as http, client(http, flaky) as conveyor:
        rid = await conveyor.submit(PROMPT, max_tokens=40)
        view = await conveyor.result(rid)
    # Sent three times (two answers lost), with one key: the gateway answered one request each time.
    assert len(flaky.submitted) == 3
    assert len({key for key, _ in flaky.submitted}) == 1
    assert {answered for _, answered in flaky.submitted} == {rid}
    assert view.status == "completed"
    tokens, _ = SimulatedModel().answer(PROMPT, 40)
    assert view.output == "".join(tokens)


async def test_a_dropped_event_stream_is_read_again_from_where_it_stopped(node: NodeFactory) -> None:
    flaky = Flaky(cut_streams=2, cut_after=120)
    async with node(token_delay=0.005) as http, client(http, flaky) as conveyor:
        events = [event async for event in conveyor.stream(PROMPT, max_tokens=40)]
        view = await conveyor.status(events[0].data["id"])
    reads = [last for method, path, last in flaky.seen if path.endswith("/events")]
    assert len(reads) == 3  # cut twice, read to the end the third time
    assert reads[0] is None
    assert reads[1] is not None
    ids = [event.id for event in events]
    assert ids == sorted(set(ids))  # no repeat, in order
    assert [e.kind for e in events[:3]] == ["accepted", "prepared", "generating"]
    assert events[-1].final
    assert events[-1].kind == "completed"
    assert "".join(e.text for e in events) == view.output  # no gap


async def test_a_stream_that_keeps_ending_before_its_end_is_given_up_on_after_the_retries(
    node: NodeFactory,
) -> None:
    flaky = Flaky(cut_streams=1000, cut_after=1, clean=True)  # not one whole event gets through
    async with (
        node() as http,
        Client(str(http.base_url), transport=flaky, retries=3, backoff=0.01) as conveyor,
    ):
        rid = await conveyor.submit(PROMPT)
        with pytest.raises(UnavailableError, match="keeps failing"):
            async for _ in conveyor.events(rid):
                pass
    assert len([path for _, path, _ in flaky.seen if path.endswith("/events")]) == 4  # the first and 3 more


async def test_refusals_raise_what_they_mean(node: NodeFactory) -> None:
    async with node() as http, client(http) as conveyor:
        with pytest.raises(RejectedError) as refused:
            await conveyor.submit(PROMPT, max_tokens=-1)
        with pytest.raises(NotFoundError):
            await conveyor.status("no-such-request")
        rid = await conveyor.submit(PROMPT)
        done = await conveyor.result(rid)
        after = await conveyor.cancel(rid)  # too late: it stays completed
    assert refused.value.code == "invalid_request"
    assert done.status == after.status == "completed"
    async with Client("http://127.0.0.1:9", retries=2, backoff=0.01) as nowhere:
        with pytest.raises(UnavailableError):
            await nowhere.submit(PROMPT)


async def test_a_cancel_stops_the_generation(node: NodeFactory) -> None:
    async with node(token_delay=0.02) as http, client(http) as conveyor:
        rid = await conveyor.submit("a long answer", max_tokens=2000)
        async for event in conveyor.events(rid):
            if event.kind == "token":
                break
        await conveyor.cancel(rid)
        view = await conveyor.result(rid, timeout=30)
    assert view.status == "cancelled"
    assert view.usage is not None
    assert 1 <= view.usage.completion_tokens < 2000
