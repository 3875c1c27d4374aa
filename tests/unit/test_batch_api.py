"""OpenAI's Files and Batch APIs, with the official SDK: a file of requests answered in the background."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from conveyor.errors import UnavailableError
from conveyor.events import Topic
from conveyor.files import Files, dumps
from conveyor.gateway.batch_api import PRIORITY, BatchCreate, Batches
from conveyor.gateway.core import GatewayCore, GatewayLimits
from conveyor.models.simulated import SimulatedModel, embedding_of
from conveyor.store.base import Namespace
from conveyor.testing import MemoryEventLog, MemoryStateStore
from tests.conftest import NodeFactory
from tests.helpers import sdk, wait_final

BLOCKED = "how to build a bomb"  # in the default safety blocklist


def chat_line(custom_id: str, prompt: str, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "simulated", "messages": messages, "max_tokens": 12, **body},
    }


async def test_a_batch_is_answered_line_by_line_into_an_output_and_an_error_file(node: NodeFactory) -> None:
    prompts = {"first": "tell me about queues", "second": "and about logs", "third": "and streams"}
    lines = [chat_line(cid, prompt) for cid, prompt in prompts.items()] + [chat_line("refused", BLOCKED)]
    async with node() as http, sdk(str(http.base_url)) as client:
        uploaded = await client.files.create(file=("requests.jsonl", dumps(lines)), purpose="batch")
        assert (uploaded.bytes, uploaded.purpose) == (len(dumps(lines)), "batch")
        assert (await client.files.content(uploaded.id)).content == dumps(lines)
        created = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"job": "nightly"},
        )
        assert (created.status, created.request_counts.total) == ("in_progress", 4)  # type: ignore[union-attr]
        batch = await client.batches.retrieve(created.id, extra_query={"wait": 30})
        assert batch.status == "completed"
        assert batch.request_counts is not None
        counts = batch.request_counts
        assert (counts.total, counts.completed, counts.failed) == (4, 3, 1)
        assert batch.metadata == {"job": "nightly"}
        assert batch.output_file_id is not None
        assert batch.error_file_id is not None

        output = [
            orjson.loads(line)
            for line in (await client.files.content(batch.output_file_id)).content.splitlines()
        ]
        model = SimulatedModel()
        answered = {line["custom_id"]: line["response"] for line in output}
        assert set(answered) == set(prompts)
        for cid, response in answered.items():
            assert response["status_code"] == 200
            body = response["body"]
            assert body["object"] == "chat.completion"
            assert (
                body["choices"][0]["message"]["content"] == "".join(model.answer(prompts[cid], 12)[0]).strip()
            )
            # Each line was a request like any other: its view, its usage, at the batch's priority.
            view = await wait_final(http, response["request_id"])
            assert view["status"] == "completed"
            assert view["usage"]["completion_tokens"] == body["usage"]["completion_tokens"] > 0
        errors = [
            orjson.loads(line)
            for line in (await client.files.content(batch.error_file_id)).content.splitlines()
        ]
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("refused", "safety_blocked")]

        # Read again, it is the same batch, ended; and it is listed.
        again = await client.batches.retrieve(created.id)
        assert (again.status, again.output_file_id) == ("completed", batch.output_file_id)
        listed = [b.id async for b in client.batches.list()]
        assert listed == [created.id]


async def test_a_cancelled_batch_stops_its_requests_and_keeps_what_ended(node: NodeFactory) -> None:
    lines = [chat_line(f"n{i}", f"a long answer number {i}", max_tokens=400) for i in range(4)]
    async with node(token_delay=0.02) as http, sdk(str(http.base_url)) as client:
        uploaded = await client.files.create(file=("slow.jsonl", dumps(lines)), purpose="batch")
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        cancelling = await client.batches.cancel(created.id)
        assert cancelling.status == "cancelling"
        batch = await client.batches.retrieve(created.id, extra_query={"wait": 30})
        assert batch.status == "cancelled"
        assert batch.request_counts is not None
        assert (batch.request_counts.total, batch.request_counts.failed) == (4, 4)
        assert batch.error_file_id is not None
        errors = (await client.files.content(batch.error_file_id)).content.splitlines()
        assert sorted(orjson.loads(e)["custom_id"] for e in errors) == ["n0", "n1", "n2", "n3"]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ({**chat_line("a", "hi"), "url": "/v1/embeddings"}, "line 2: each line must be a POST"),
        (chat_line("first", "hi"), "line 2: custom_id 'first' is used twice"),
        (chat_line("a", "hi", model="nobody"), "line 2: the model 'nobody' does not exist"),
        (chat_line("a", "hi", stream=True), "line 2: stream and n are not for a batch"),
        ({"custom_id": "a"}, "line 2: each line must be a POST"),
    ],
)
async def test_a_wrong_line_refuses_the_batch_saying_which(
    node: NodeFactory, line: dict[str, Any], why: str
) -> None:
    async with node() as http, sdk(str(http.base_url)) as client:
        uploaded = await client.files.create(
            file=("in.jsonl", dumps([chat_line("first", "hello"), line])), purpose="batch"
        )
        with pytest.raises(openai.BadRequestError, match=why):
            await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert [b async for b in client.batches.list()] == []  # nothing was started
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(
                input_file_id="file-nothere", endpoint="/v1/chat/completions", completion_window="24h"
            )


class FailingLog(MemoryEventLog):
    """A log that loses its broker after ``good`` publishes."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    async def publish(self, topic: str, events: Any) -> None:
        if self.good <= 0:
            raise UnavailableError("the broker went away")
        self.good -= 1
        await super().publish(topic, events)


async def test_a_batch_whose_gateway_died_while_submitting_it_is_finished_by_the_next_reader() -> None:
    log, store = FailingLog(good=1), MemoryStateStore()
    core = GatewayCore(log, store, models=["simulated"])
    files = Files(store)
    lines = [chat_line(f"n{i}", f"prompt {i}") for i in range(300)]  # more than one publish's worth
    uploaded = await files.save("default", "in.jsonl", "batch", dumps(lines))
    asked = BatchCreate(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    batches = Batches(core, files, ["simulated"], GatewayLimits())
    with pytest.raises(UnavailableError):
        await batches.create(asked, "default")
    published = {e.id for e in log.events(Topic.REQUESTS)}
    assert 0 < len(published) < 300  # halfway
    (batch_id,) = await store.keys(Namespace.BATCHES)

    log.good = 10  # the broker is back; another gateway reads the batch
    found = await Batches(core, files, ["simulated"], GatewayLimits()).get(batch_id, "default")
    assert found is not None
    assert found[0].status == "validating"
    current = await Batches(core, files, ["simulated"], GatewayLimits()).current(*found)
    assert current["status"] == "in_progress"
    events = log.events(Topic.REQUESTS)
    # Every line once more, with the same ids: the log keeps those it had once.
    assert published < {e.id for e in events} == {found[0].request_id(i) for i in range(300)}
    assert len(events) == 300
    assert {(e.priority, e.tenant) for e in events} == {(PRIORITY, "default")}


async def test_a_batch_of_embeddings_answers_one_text_per_line(node: NodeFactory) -> None:
    texts = {"q1": "the queue is long", "q2": "bananas are yellow"}
    lines = [
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "simulated", "input": text},
        }
        for cid, text in texts.items()
    ]
    async with node() as http, sdk(str(http.base_url)) as client:
        uploaded = await client.files.create(file=("embed.jsonl", dumps(lines)), purpose="batch")
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        batch = await client.batches.retrieve(created.id, extra_query={"wait": 30})
        assert batch.status == "completed"
        assert batch.output_file_id is not None
        output = (await client.files.content(batch.output_file_id)).content.splitlines()
        two = [{**lines[0], "body": {"model": "simulated", "input": ["one", "two"]}}]
        wrong = await client.files.create(file=("two.jsonl", dumps(two)), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="line 1: one text per line"):
            await client.batches.create(
                input_file_id=wrong.id, endpoint="/v1/embeddings", completion_window="24h"
            )
    bodies = {line["custom_id"]: line["response"]["body"] for line in map(orjson.loads, output)}
    for cid, text in texts.items():
        assert bodies[cid]["object"] == "list"
        assert bodies[cid]["data"][0]["embedding"] == embedding_of(text)
        assert bodies[cid]["usage"]["prompt_tokens"] == len(text.split())
