"""The gateway over real HTTP, in-process, with the pipeline on in-memory backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import httpx
import orjson
import pytest
import websockets

from conveyor.errors import UnavailableError
from conveyor.events import Envelope, Topic
from conveyor.gateway.app import create_app
from conveyor.gateway.core import GatewayCore
from conveyor.models.simulated import SimulatedModel
from conveyor.payloads import RequestAccepted, decode
from conveyor.store.base import Entry, Namespace
from conveyor.testing import MemoryEventLog, MemoryStateStore
from conveyor.view import RequestView
from tests.conftest import NodeFactory
from tests.helpers import read_sse, sse_events, streamed_text, submit, wait_final


async def test_a_request_completes_with_the_models_answer(node: NodeFactory) -> None:
    async with node() as client:
        rid = await submit(client, "Write a haiku about queues", max_tokens=64, metadata={"user": "u1"})
        view = await wait_final(client, rid)
    tokens, reason = SimulatedModel().answer("Write a haiku about queues", 64)
    assert view["status"] == "completed"
    assert view["output"] == "".join(tokens).strip()
    assert view["finish_reason"] == reason
    assert view["usage"] == {"prompt_tokens": 5, "completion_tokens": len(tokens), "cached_tokens": 0}
    assert view["model"] == "simulated"
    assert set(view["stages"]) == {"gateway", "prepare", "generate", "finalize"}


async def test_sse_streams_the_output_and_resumes_after_last_event_id(node: NodeFactory) -> None:
    async with node(token_delay=0.002) as client:
        rid = await submit(client, "stream me", max_tokens=40)
        events = await read_sse(client, rid)
        view = await wait_final(client, rid)
        assert [kind for _, kind, _ in events[:3]] == ["accepted", "prepared", "generating"]
        assert events[-1][1] == "completed"
        assert streamed_text(events) == "".join(SimulatedModel().answer("stream me", 40)[0])
        assert streamed_text(events).strip() == view["output"]
        ids = [i for i, _, _ in events]
        assert ids == sorted(set(ids))
        # Reconnect after the 4th event: the rest, no gaps, no repeats.
        resumed = await read_sse(client, rid, last_event_id=str(ids[3]))
        assert resumed == events[4:]


async def test_a_submit_with_stream_answers_with_the_requests_event_stream(node: NodeFactory) -> None:
    async with node(token_delay=0.002) as client:
        prompt = "submit and stream"
        body = {"prompt": prompt, "max_tokens": 30}
        async with client.stream("POST", "/v1/requests", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            events = await sse_events(response)
        (_, first, accepted), *_ = events
        assert (first, accepted["status"]) == ("accepted", "accepted")  # the id, before anything else
        rid = accepted["id"]
        assert events == await read_sse(client, rid)  # the stream GET /events gives
        assert events[-1][1] == "completed"
        assert streamed_text(events) == "".join(SimulatedModel().answer(prompt, 30)[0])
        # A retry with the same Idempotency-Key streams the same request, however the first asked.
        key = {"Idempotency-Key": "stream-once"}
        first_try = await client.post("/v1/requests", json=body, headers=key)
        async with client.stream("POST", "/v1/requests", json={**body, "stream": True}, headers=key) as retry:
            assert retry.status_code == 200
            again = await sse_events(retry)
        assert again[0][2]["id"] == first_try.json()["id"]
        assert again[-1][1] == "completed"
        both = await client.post("/v1/requests", params={"wait": "5"}, json={**body, "stream": True})
        assert (both.status_code, both.json()["error"]["code"]) == (422, "invalid_request")


async def test_a_client_can_follow_a_request_from_the_middle_of_its_stream(node: NodeFactory) -> None:
    async with node(token_delay=0.01) as client:
        rid = await submit(client, "slow stream", max_tokens=30)
        first = await read_sse(client, rid, stop_after=5)
        rest = await read_sse(client, rid, last_event_id=str(first[-1][0]))
        whole = await read_sse(client, rid)
    assert first + rest == whole


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"prompt": "unterminated', 400, "invalid_json"),
        (b'{"prompt": 42}', 422, "invalid_request"),
        (b'{"prompt": ""}', 422, "invalid_request"),
        (b'{"prompt": "x", "max_tokens": "10"}', 422, "invalid_request"),
        (b'{"prompt": "x", "max_tokens": 0}', 422, "invalid_request"),
        (b'{"prompt": "x", "max_tokens": 100000}', 422, "max_tokens_too_large"),
        (b'{"prompt": "x", "tenant_id": 1}', 422, "invalid_request"),
        (b'["prompt"]', 422, "invalid_request"),
        (b'{"prompt": "' + b"a" * 300_000 + b'"}', 413, "body_too_large"),
    ],
)
async def test_bad_submissions_get_a_4xx_that_says_what_is_wrong(
    node: NodeFactory, body: bytes, status: int, code: str
) -> None:
    async with node() as client:
        answers = []
        # Plain, a submit takes the gateway's fast path; with an Idempotency-Key, FastAPI's
        # route: both must refuse it the same way.
        for extra in ({}, {"idempotency-key": f"routed-{code}"}):
            response = await client.post(
                "/v1/requests", content=body, headers={"content-type": "application/json", **extra}
            )
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert error["code"] == code
            assert error["message"]
            answers.append((response.status_code, response.json()))
        assert answers[0] == answers[1]
        # Nothing was lost: the gateway keeps serving.
        assert (await wait_final(client, await submit(client, "still fine")))["status"] == "completed"


async def test_a_chunked_oversize_body_is_refused_too(node: NodeFactory) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 10_000
        yield b'"}'

    async with node() as client:
        response = await client.post(
            "/v1/requests", content=chunks(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 413


async def test_unknown_ids_are_404_everywhere(node: NodeFactory) -> None:
    async with node() as client:
        for method, path in [
            ("GET", "/v1/requests/nope"),
            ("GET", "/v1/requests/nope/events"),
            ("DELETE", "/v1/requests/nope"),
        ]:
            response = await client.request(method, path)
            assert response.status_code == 404
            assert response.json()["error"]["message"] == "no request with id 'nope'"


async def test_idempotency_key_returns_the_same_request(node: NodeFactory) -> None:
    async with node() as client:
        headers = {"Idempotency-Key": "order-17"}
        first = await client.post("/v1/requests", json={"prompt": "once"}, headers=headers)
        again = await client.post("/v1/requests", json={"prompt": "once"}, headers=headers)
        other = await client.post("/v1/requests", json={"prompt": "different"}, headers=headers)
        assert first.status_code == 202
        assert again.status_code == 200
        assert again.json()["id"] == first.json()["id"]
        assert other.status_code == 422
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        # Every field counts, the sampling too (the token ids of logit_bias are JSON keys).
        sampled = {"prompt": "once", "temperature": 0.5, "seed": 3, "logit_bias": {"42": -5}, "priority": -2}
        headers = {"Idempotency-Key": "order-18"}
        first = await client.post("/v1/requests", json=sampled, headers=headers)
        again = await client.post("/v1/requests", json=sampled, headers=headers)
        other = await client.post("/v1/requests", json={**sampled, "seed": 4}, headers=headers)
        assert (first.status_code, again.status_code, other.status_code) == (202, 200, 422)
        assert again.json()["id"] == first.json()["id"]


async def test_a_submit_can_wait_for_its_answer_in_the_same_call(node: NodeFactory) -> None:
    async with node(token_delay=0.01) as client:
        done = await client.post("/v1/requests", params={"wait": "30"}, json={"prompt": "one call"})
        assert done.status_code == 200, done.text
        body = done.json()
        rid = body["id"]
        urls = {"status_url": f"/v1/requests/{rid}", "stream_url": f"/v1/requests/{rid}/events"}
        # The final view, as the status endpoint gives it, and the URLs a 202 would have given.
        assert body == {**(await wait_final(client, rid)), **urls}
        assert body["status"] == "completed"
        assert body["output"]
        # The routed endpoint (an Idempotency-Key goes there), first time and retried, says the same.
        headers = {"Idempotency-Key": "wait-17"}
        routed = [
            await client.post("/v1/requests", params={"wait": "30"}, json={"prompt": "once"}, headers=headers)
            for _ in range(2)
        ]
        assert [r.status_code for r in routed] == [200, 200]
        assert routed[0].json() == routed[1].json()
        assert routed[0].json()["status"] == "completed"
        assert routed[0].json()["output"]
        # Not ended within the wait: 202 with the view as it is, and the request goes on.
        slow = await client.post(
            "/v1/requests", params={"wait": "0.05"}, json={"prompt": "a long answer", "max_tokens": 2000}
        )
        assert slow.status_code == 202, slow.text
        assert slow.json()["status"] not in ("completed", "failed", "cancelled")
        assert slow.json()["stream_url"] == f"/v1/requests/{slow.json()['id']}/events"
        assert (await client.delete(f"/v1/requests/{slow.json()['id']}")).status_code == 202
        assert (await wait_final(client, slow.json()["id"]))["status"] == "cancelled"
        # A malformed wait is refused before anything is accepted, in the API's error shape.
        before = (await client.get("/metrics")).text
        for bad in ("-1", "soon", "nan"):
            refused = await client.post("/v1/requests", params={"wait": bad}, json={"prompt": "never"})
            assert refused.status_code == 422, bad
            assert refused.json()["error"]["code"] == "invalid_request"
        accepted = [
            line for line in (await client.get("/metrics")).text.splitlines() if "requests_accepted" in line
        ]
        assert all(line in before.splitlines() for line in accepted)
        # /docs tells of both answers.
        post = (await client.get("/openapi.json")).json()["paths"]["/v1/requests"]["post"]
        assert "wait" in [parameter["name"] for parameter in post["parameters"]]
        answers = post["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"]
        assert {a["$ref"].rsplit("/", 1)[1] for a in answers} == {"Waited", "Submitted"}


async def test_the_safety_policy_fails_a_request_with_its_reason(node: NodeFactory) -> None:
    async with node() as client:
        view = await wait_final(client, await submit(client, "Tell me how to build a bomb"))
    assert view["status"] == "failed"
    assert view["error"]["code"] == "safety_blocked"
    assert "build a bomb" in view["error"]["message"]
    assert view["usage"] is None


async def test_cancel_stops_generation_and_records_the_tokens_made(node: NodeFactory) -> None:
    async with node(token_delay=0.02) as client:
        rid = await submit(client, "a long answer", max_tokens=2000)
        async with asyncio.timeout(10):
            await read_sse(client, rid, stop_after=4)  # the first token has been produced
        response = await client.delete(f"/v1/requests/{rid}")
        assert response.status_code == 202
        view = await wait_final(client, rid)
        assert view["status"] == "cancelled"
        assert view["finish_reason"] == "cancelled"
        full = len(SimulatedModel().answer("a long answer", 2000)[0])
        assert 1 <= view["usage"]["completion_tokens"] < full
        again = await client.delete(f"/v1/requests/{rid}")
        assert (again.status_code, again.json()["status"]) == (200, "cancelled")


async def test_a_completed_request_stays_completed_when_cancelled(node: NodeFactory) -> None:
    async with node() as client:
        rid = await submit(client, "quick")
        await wait_final(client, rid)
        response = await client.delete(f"/v1/requests/{rid}")
        assert response.status_code == 409
        assert response.json()["error"]["status"] == "completed"
        assert (await wait_final(client, rid))["status"] == "completed"


async def test_an_expired_deadline_stops_generation(node: NodeFactory) -> None:
    async with node(token_delay=0.05) as client:
        view = await wait_final(client, await submit(client, "too slow", max_tokens=2000, timeout=0.2))
    assert view["status"] == "cancelled"
    assert view["finish_reason"] == "deadline"


async def test_health_readiness_metrics_and_docs(node: NodeFactory) -> None:
    async with node() as client:
        await wait_final(client, await submit(client, "count me"))
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()["checks"]) == (200, {"log": "ok", "store": "ok"})
        metrics = (await client.get("/metrics")).text
        assert 'conveyor_events_total{outcome="ok",stage="finalize"}' in metrics
        assert 'conveyor_consumer_pending{topic="requests",group="prepare"} 0' in metrics
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert {"/v1/requests", "/v1/requests/{rid}", "/v1/requests/{rid}/events"} <= set(paths)
        # The model APIs document their request bodies.
        for api in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"):
            body = paths[api]["post"]["requestBody"]["content"]["application/json"]["schema"]
            assert "model" in body["properties"], api


async def test_a_websocket_streams_the_same_events_and_can_cancel(node: NodeFactory) -> None:
    async with node(token_delay=0.02) as client:
        rid = await submit(client, "stream me", max_tokens=40)
        ws_url = str(client.base_url).replace("http://", "ws://") + f"/v1/requests/{rid}/ws"
        async with websockets.connect(ws_url) as ws:
            messages = [orjson.loads(m) async for m in ws]
        sse = await read_sse(client, rid)
        assert [(m["id"], m["event"], m["data"]) for m in messages] == sse

        slow = await submit(client, "a long answer", max_tokens=2000)
        async with websockets.connect(
            str(client.base_url).replace("http://", "ws://") + f"/v1/requests/{slow}/ws"
        ) as ws:
            async for raw in ws:
                if orjson.loads(raw)["event"] == "token":
                    await ws.send(orjson.dumps({"action": "cancel"}).decode())
                    break
            events = [orjson.loads(m)["event"] async for m in ws]
        assert events[-1] == "cancelled"


class _LostAck(MemoryEventLog):
    """The first publish fails: before storing the event, or after (its ack was lost)."""

    def __init__(self, *, stored: bool) -> None:
        super().__init__()
        self.stored, self.failed = stored, False

    async def publish(self, topic: str, events: Sequence[Envelope]) -> None:
        if not self.failed:
            self.failed = True
            if self.stored:
                await super().publish(topic, events)
            raise UnavailableError("publish ack timed out")
        await super().publish(topic, events)


@pytest.mark.parametrize("stored", [False, True], ids=["not-stored", "stored-ack-lost"])
async def test_a_submit_retried_with_its_idempotency_key_after_a_failed_publish_is_accepted_once(
    stored: bool,
) -> None:
    log = _LostAck(stored=stored)
    core = GatewayCore(log, MemoryStateStore())
    payload = RequestAccepted(prompt="bill me once")
    with pytest.raises(UnavailableError):  # what the client sees as a 503
        await core.accept(payload, idempotency_key="order-18", fingerprint={"prompt": "bill me once"})
    retried = await core.accept(payload, idempotency_key="order-18", fingerprint={"prompt": "bill me once"})
    assert retried.replayed
    assert [e.request_id for e in log.events(Topic.REQUESTS)] == [retried.id]  # once, either way


async def test_the_status_fast_path_answers_exactly_as_the_routed_endpoint(node: NodeFactory) -> None:
    # A plain GET takes the fast path; one with any other query parameter goes through FastAPI's
    # route (which ignores it): both must say the same, and refuse the same.
    async with node() as client:
        rid = await submit(client, "same answer both ways")
        fast = await client.get(f"/v1/requests/{rid}", params={"wait": "30"})
        routed = await client.get(f"/v1/requests/{rid}", params={"wait": "30", "via": "route"})
        assert fast.json()["status"] == "completed"
        assert (fast.status_code, fast.headers["content-type"], fast.content) == (
            routed.status_code,
            routed.headers["content-type"],
            routed.content,
        )
        for bad in ({"wait": "-1"}, {"wait": "soon"}, {"wait": "nan"}):
            refused = await client.get(f"/v1/requests/{rid}", params=bad)
            assert refused.status_code == 422, bad  # the route's validation, in the API's error shape
            assert refused.json()["error"]["code"] == "invalid_request"


async def test_the_event_stream_fast_path_answers_exactly_as_the_routed_endpoint(node: NodeFactory) -> None:
    # A plain GET of the stream takes the fast path; with a query it goes through FastAPI's route.
    async with node() as client:
        rid = await submit(client, "same stream both ways")
        await wait_final(client, rid)
        fast = await client.get(f"/v1/requests/{rid}/events", headers={"Last-Event-ID": "2"})
        routed = await client.get(f"/v1/requests/{rid}/events", params={"last_event_id": "2"})
        assert b"event: completed" in fast.content
        assert b"event: prepared" not in fast.content  # resumed after it
        for answer in (fast, routed):
            assert answer.headers["content-type"].startswith("text/event-stream")
            assert answer.headers["cache-control"] == "no-cache"
        assert fast.content == routed.content
        refused = await client.get(f"/v1/requests/{rid}/events", headers={"Last-Event-ID": "soon"})
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_last_event_id")
        unknown = await client.get("/v1/requests/no-such-request/events")
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")


async def test_an_accepted_request_is_known_before_the_projector_has_written_its_view() -> None:
    log, store = MemoryEventLog(), MemoryStateStore()  # no projector runs: no view is ever written
    here, elsewhere = GatewayCore(log, store), GatewayCore(log, store)
    accepted = await here.accept(RequestAccepted(prompt="early"), tenant="acme")
    # The gateway that took it knows it at once; another one (or this one after a restart)
    # finds it on the log.
    for core in (here, elsewhere):
        view = await core.view(accepted.id, tenant="acme")
        assert view is not None
        assert (view.id, view.status, view.tenant) == (accepted.id, "accepted", "acme")
        assert view.stages["gateway"]["accepted_at"]
        assert await core.view(accepted.id, tenant="globex") is None  # another tenant's is unknown
    assert await here.view("never-accepted", tenant="acme") is None


class _EndsAtOnce(MemoryEventLog):
    """Stores a submitted request and, before the publish returns, its final view (a pipeline
    faster than the gateway's reply) in ``store``, which counts its reads."""

    def __init__(self, store: MemoryStateStore) -> None:
        super().__init__()
        self.store = store

    async def publish(self, topic: str, events: Sequence[Envelope]) -> None:
        await super().publish(topic, events)
        for event in events:
            view = RequestView(id=event.request_id, tenant=event.tenant, status="completed", output="done")
            await self.store.put(Namespace.STATUS, event.request_id, view.model_dump_json().encode())


class _CountingStore(MemoryStateStore):
    """Counts reads. Its status watch keeps every change from the moment the store exists, so
    none written before the watch task first runs is lost."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self._changes: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def get(self, ns: Namespace, key: str) -> Entry | None:
        self.reads += 1
        return await super().get(ns, key)

    async def put(self, ns: Namespace, key: str, value: bytes) -> int:
        revision = await super().put(ns, key, value)
        if ns == Namespace.STATUS:
            self._changes.put_nowait((key, value))
        return revision

    async def watch(self, ns: Namespace) -> AsyncIterator[tuple[str, bytes]]:
        assert ns == Namespace.STATUS
        while True:
            yield await self._changes.get()


async def test_a_submit_that_waits_learns_the_end_from_the_watch_without_reading_the_store() -> None:
    store = _CountingStore()
    core = GatewayCore(_EndsAtOnce(store), store)
    watching = asyncio.create_task(core.watch.run())
    try:
        async with asyncio.timeout(5):
            accepted = await core.accept(RequestAccepted(prompt="quick"), tenant="acme", wait=30)
    finally:
        watching.cancel()
    assert accepted.view is not None
    assert (accepted.view.id, accepted.view.status, accepted.view.output) == (
        accepted.id,
        "completed",
        "done",
    )
    assert store.reads == 0  # watched before the publish: the end could not slip by unseen


async def test_a_submit_may_carry_the_conversation_before_its_prompt() -> None:
    log, store = MemoryEventLog(), MemoryStateStore()
    app = create_app(log, store)
    history = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
        accepted = await http.post("/v1/requests", json={"prompt": "How are you?", "history": history})
        refused = await http.post(
            "/v1/requests", json={"prompt": "hi", "history": [{"role": "tool", "content": "x"}]}
        )
    assert accepted.status_code == 202
    (event,) = log.events(Topic.REQUESTS)
    payload = decode(RequestAccepted, event.data)
    assert payload.prompt == "How are you?"
    assert [(m.role, m.content) for m in payload.messages] == [
        *((turn["role"], turn["content"]) for turn in history),
        ("user", "How are you?"),  # the prompt is the next user turn
    ]
    assert refused.status_code == 422
    assert "history" in refused.json()["error"]["message"]
