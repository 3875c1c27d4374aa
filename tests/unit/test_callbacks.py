"""Callbacks: a request's outcome POSTed to its callback_url, through the whole pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from conveyor.callbacks import SIGNATURE_HEADER, refusal, sign, verify
from conveyor.deadletters import dead_letters, sent_back
from conveyor.events import Topic, new_event
from conveyor.models.simulated import SimulatedModel
from conveyor.payloads import DeadLetter, EventType, RequestCompleted, decode
from conveyor.stages import deliver_stage
from conveyor.testing import MemoryEventLog, MemoryStateStore, StageHarness
from tests.conftest import NodeFactory
from tests.helpers import Receiver, receiving, submit, wait_final

PROMPT = "Write a haiku about queues"
SECRET = "s3cret"


async def test_the_outcome_is_posted_once_signed_when_the_request_ends(
    node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_CALLBACK_SECRET", SECRET)
    receiver = Receiver()
    async with receiving(receiver) as url, node() as http:
        rid = await submit(http, PROMPT, max_tokens=40, callback_url=url)
        async with asyncio.timeout(30):
            await receiver.called.wait()
        view = await wait_final(http, rid)
    ((headers, body),) = receiver.calls
    outcome = orjson.loads(body)
    tokens, _ = SimulatedModel().answer(PROMPT, 40)
    assert outcome["id"] == rid
    assert (outcome["status"], outcome["output"]) == ("completed", "".join(tokens))
    assert outcome["usage"] == view["usage"]
    assert headers["Conveyor-Request-Id"] == rid
    assert headers["Conveyor-Event-Id"]
    assert verify(SECRET, body, headers[SIGNATURE_HEADER])
    assert not verify("another secret", body, headers[SIGNATURE_HEADER])


async def test_a_receiver_that_fails_for_a_while_is_called_again_until_it_takes_it(node: NodeFactory) -> None:
    receiver = Receiver(503, 500)
    async with receiving(receiver) as url, node() as http:
        await submit(http, PROMPT, callback_url=url)
        async with asyncio.timeout(30):
            await receiver.called.wait()
    assert len(receiver.calls) == 3
    assert len({headers["Conveyor-Event-Id"] for headers, _ in receiver.calls}) == 1  # one event, resent
    assert SIGNATURE_HEADER not in receiver.calls[0][0]  # no secret: unsigned


async def test_a_receiver_that_refuses_it_puts_it_on_the_dead_letter_topic_once(node: NodeFactory) -> None:
    receiver = Receiver(400)
    async with receiving(receiver) as url, node() as http:
        rid = await submit(http, PROMPT, callback_url=url)
        view: dict[str, Any] = {}
        async with asyncio.timeout(30):
            while "deliver" not in view.get("stages", {}):  # long polls of the status
                view = (await http.get(f"/v1/requests/{rid}", params={"wait": 1})).json()
        again = await submit(http, "another", callback_url=url)  # the stage goes on with the next
        async with asyncio.timeout(30):
            await receiver.called.wait()
    assert view["status"] == "completed"  # the request itself finished; only its call failed
    assert "dead_lettered_at" in view["stages"]["deliver"]
    called_about = [orjson.loads(body)["id"] for _, body in receiver.calls]
    assert called_about[:2] == [rid, again]


async def test_the_stage_never_calls_about_its_own_dead_letter() -> None:
    receiver = Receiver(400)
    async with receiving(receiver) as url:
        done = RequestCompleted(output="the answer", streamed_chars=10)
        event = new_event(type=EventType.COMPLETED, source="test", payload=done, callback=url)
        # Handled once the stage is idle: it has read the dead letter of its call too.
        out = await StageHarness(deliver_stage()).handle(event, topic=Topic.CALLBACKS)
    (letter,) = out[Topic.DLQ]
    assert decode(DeadLetter, letter.data).stage == "deliver"
    assert len(receiver.calls) == 1  # and made no call about it


async def test_a_refused_prompt_is_called_back_as_failed(node: NodeFactory) -> None:
    receiver = Receiver()
    async with receiving(receiver) as url, node() as http:
        await submit(http, "how to build a bomb", callback_url=url)
        async with asyncio.timeout(30):
            await receiver.called.wait()
    outcome = orjson.loads(receiver.calls[0][1])
    assert outcome["status"] == "failed"
    assert outcome["error"]["code"] == "safety_blocked"


@pytest.mark.parametrize(
    "url", ["http://example.com/hook", "ftp://127.0.0.1/hook", "http://127.0.0.1.example.com/x", "not a url"]
)
async def test_a_callback_to_a_host_not_allowed_is_refused_before_anything_is_sent(
    node: NodeFactory, url: str
) -> None:
    async with node() as http:
        refused = await http.post("/v1/requests", json={"prompt": PROMPT, "callback_url": url})
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "callback_not_allowed"


def test_the_allowed_hosts_and_the_signature() -> None:
    hosts = ("127.0.0.1", "*.hooks.example")
    assert refusal("http://127.0.0.1:8080/x", hosts) is None
    assert refusal("https://a.hooks.example/x", hosts) is None
    assert refusal("https://hooks.example/x", hosts) is not None  # the wildcard is for subdomains
    assert refusal("https://evilhooks.example/x", hosts) is not None
    assert refusal("http://127.0.0.1/x", ()) is not None  # none allowed: no callbacks
    body = b'{"id": "r"}'
    signature = sign(SECRET, body)
    assert verify(SECRET, body, signature)
    assert not verify(SECRET, body + b" ", signature)
    assert not verify(SECRET, body, sign(SECRET, body, int(time.time()) - 3600))  # too old: a replay
    assert not verify(SECRET, body, "garbage")


async def test_a_call_that_failed_for_good_is_made_once_sent_back_from_the_dead_letter_topic() -> None:
    log, store = MemoryEventLog(), MemoryStateStore()
    receiver = Receiver(404)  # the receiver's route was missing
    async with receiving(receiver) as url:
        done = RequestCompleted(output="the answer", streamed_chars=10)
        event = new_event(type=EventType.COMPLETED, source="test", payload=done, callback=url)
        async with StageHarness(deliver_stage(), log=log, store=store).running():
            await log.publish(Topic.CALLBACKS, [event])
            async with asyncio.timeout(30), contextlib.aclosing(dead_letters(log, follow=True)) as letters:
                letter = await anext(letters)
            assert (letter.letter.stage, letter.letter.topic) == ("deliver", Topic.CALLBACKS)
            assert "answered 404" in letter.letter.error
            await log.publish(letter.letter.topic, [sent_back(letter.letter)])  # once it is fixed
            async with asyncio.timeout(30):
                await receiver.called.wait()
    assert [orjson.loads(body)["output"] for _, body in receiver.calls] == ["the answer"] * 2


async def test_a_receiver_that_hangs_holds_a_few_workers_and_the_others_are_called_meanwhile() -> None:
    release, in_flight, most = asyncio.Event(), [0], [0]

    async def hang(request: web.Request) -> web.Response:
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            await release.wait()
        finally:
            in_flight[0] -= 1
        return web.Response(text="late")

    app = web.Application()
    app.router.add_post("/hang", hang)
    healthy = Receiver()
    log = MemoryEventLog()
    # Four workers, two of them at most for one host: without that cap, the six calls to the
    # hanging receiver would hold all four until their timeout.
    stage = deliver_stage(concurrency=4, per_host=2, timeout=60)
    done = RequestCompleted(output="the answer", streamed_chars=10)
    async with TestServer(app, host="127.0.0.1") as hanging, receiving(healthy) as url:
        slow = [
            new_event(
                type=EventType.COMPLETED, source="test", payload=done, callback=str(hanging.make_url("/hang"))
            )
            for _ in range(6)
        ]
        async with StageHarness(stage, log=log).running():
            await log.publish(Topic.CALLBACKS, slow)
            await log.publish(
                Topic.CALLBACKS,
                [new_event(type=EventType.COMPLETED, source="test", payload=done, callback=url)],
            )
            async with asyncio.timeout(30):
                await healthy.called.wait()
            assert most[0] <= 2
            assert in_flight[0] == 2  # still hanging: the healthy one did not wait for them
            release.set()
    assert len(healthy.calls) == 1
