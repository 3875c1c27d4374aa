"""Usage per tenant and model over a window, read from the log: it must add up to the ledger."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime

import orjson
import pytest

from conveyor.cli import command_line, settings_from
from conveyor.config import ModelSettings, Settings
from conveyor.events import Envelope, Topic, new_event
from conveyor.history import Window
from conveyor.node import prices
from conveyor.payloads import (
    EventType,
    FinishReason,
    GenerationCompleted,
    RequestCompleted,
    RequestFailed,
    Usage,
)
from conveyor.stages import finalize_stage
from conveyor.store.base import Namespace
from conveyor.testing import MemoryEventLog, MemoryStateStore, StageHarness
from conveyor.usage import Price, Tally, usage
from tests.conftest import NodeFactory
from tests.helpers import read_sse


def generated(
    tenant: str,
    model: str,
    prompt: int,
    completion: int,
    finish: FinishReason = "stop",
    *,
    cached: bool = False,
) -> Envelope:
    counts = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=prompt // 2)
    payload = GenerationCompleted(text="x" * completion, finish_reason=finish, usage=counts, cached=cached)
    return new_event(type=EventType.GENERATED, source="test", payload=payload, tenant=tenant, model=model)


async def ledger(store: MemoryStateStore) -> list[Tally]:
    """The usage ledger summed per tenant and model, straight from its records."""
    sums: dict[tuple[str, str], Tally] = {}
    for rid in await store.keys(Namespace.USAGE):
        entry = await store.get(Namespace.USAGE, rid)
        assert entry is not None
        record = orjson.loads(entry.value)
        key = (record["tenant"], record["model"])
        tally = sums.setdefault(key, Tally(*key))
        tally.requests += 1
        tally.from_cache += record["cached"]
        tally.prompt_tokens += record["prompt_tokens"]
        tally.cached_tokens += record["cached_tokens"]
        tally.completion_tokens += record["completion_tokens"]
        tally.cost_usd += record["cost_usd"] or 0.0
    return [sums[key] for key in sorted(sums)]


async def test_usage_counts_each_completed_request_once_per_tenant_and_model_as_the_ledger_does() -> None:
    log, store = MemoryEventLog(), MemoryStateStore()
    # USD per million tokens: prompt, completion, and prompt tokens the model found cached.
    prices = {"small": Price(prompt=1.0, completion=2.0, cached=0.5), "large": Price(10.0, 20.0)}
    finalize = StageHarness(finalize_stage(prices), log=log, store=store)
    events = [
        generated("acme", "small", 10, 20),
        generated("acme", "small", 7, 3, "length"),
        generated("acme", "large", 12, 30, cached=True),  # answered from the answer cache
        generated("globex", "small", 5, 4, "cancelled"),  # its tokens were made: billed
    ]
    for event in events:
        await finalize.handle(event)
    await finalize.handle(events[0])  # redelivered: the ledger bills it once
    # A completion stored again past the log's duplicate window counts once too.
    copy = log.events(Topic.COMPLETED)[0]
    log.append_raw(Topic.COMPLETED, copy.key, copy.to_headers(), copy.data)
    refused = new_event(
        type=EventType.FAILED,
        source="test",
        payload=RequestFailed(code="policy", message="blocked", stage="prepare"),
        tenant="acme",
    )
    await log.publish(Topic.COMPLETED, [refused])  # no tokens made, no ledger record

    tallies = await usage(log, Window())
    assert [t.to_json() for t in tallies] == [t.to_json() for t in await ledger(store)]
    assert [t.to_json() for t in tallies] == [
        {
            "tenant": "acme",
            "model": "large",
            "requests": 1,
            "from_cache": 1,
            "prompt_tokens": 12,
            "cached_tokens": 6,
            "completion_tokens": 30,
            "total_tokens": 42,
            "cost_usd": 0.0,  # the model did not run
        },
        {
            "tenant": "acme",
            "model": "small",
            "requests": 2,
            "from_cache": 0,
            "prompt_tokens": 17,
            "cached_tokens": 8,
            "completion_tokens": 23,
            "total_tokens": 40,
            # (5 cached x 0.5 + 5 x 1 + 20 x 2) + (3 cached x 0.5 + 4 x 1 + 3 x 2), per million
            "cost_usd": 0.000059,
        },
        {
            "tenant": "globex",
            "model": "small",
            "requests": 1,
            "from_cache": 0,
            "prompt_tokens": 5,
            "cached_tokens": 2,
            "completion_tokens": 4,
            "total_tokens": 9,
            "cost_usd": 0.000012,  # cancelled: the tokens it made
        },
    ]
    assert [t.tenant for t in await usage(log, Window(tenant="globex"))] == ["globex"]


async def test_usage_of_a_window_counts_the_requests_that_completed_in_it() -> None:
    clock = [datetime(2026, 1, 5, tzinfo=UTC).timestamp()]  # when the log stores what follows
    log = MemoryEventLog(clock=lambda: clock[0])
    counts = Usage(prompt_tokens=10, completion_tokens=20)
    payload = RequestCompleted(output="x" * 20, streamed_chars=20, usage=counts)
    old = new_event(type=EventType.COMPLETED, source="test", payload=payload, tenant="acme", model="small")
    await log.publish(Topic.COMPLETED, [dataclasses.replace(old, time="2026-01-05T00:00:00.000000Z")])
    clock[0] = time.time()
    await StageHarness(finalize_stage(), log=log).handle(generated("acme", "small", 10, 20))

    january = Window(since=datetime(2026, 1, 1, tzinfo=UTC), until=datetime(2026, 2, 1, tzinfo=UTC))
    assert [(t.requests, t.total_tokens) for t in await usage(log, january)] == [(1, 30)]
    since_february = Window(since=datetime(2026, 2, 1, tzinfo=UTC))
    assert [(t.requests, t.total_tokens) for t in await usage(log, since_february)] == [(1, 30)]
    assert [(t.requests, t.total_tokens) for t in await usage(log, Window())] == [(2, 60)]
    assert await usage(log, Window(until=datetime(2026, 1, 1, tzinfo=UTC))) == []


async def test_a_priced_model_records_each_requests_cost_in_its_view(node: NodeFactory) -> None:
    model = ModelSettings(backend="simulated", price_prompt=0.5, price_completion=1.5)
    async with node(settings={"model": model}) as http:
        done = await http.post("/v1/requests", params={"wait": 30}, json={"prompt": "what does it cost?"})
        view = done.json()
        *_, (_, kind, final) = await read_sse(http, view["id"])
    counts = Usage(**view["usage"])
    assert counts.completion_tokens > 0
    assert view["cost_usd"] == pytest.approx(Price(0.5, 1.5).cost(counts))
    assert view["cost_usd"] == pytest.approx(
        (counts.prompt_tokens * 0.5 + counts.completion_tokens * 1.5) / 1e6
    )
    # The stream's final event (and a callback, which says the same) carries it too.
    assert (kind, final["cost_usd"]) == ("completed", view["cost_usd"])


def test_prices_come_from_flags_and_from_each_added_model() -> None:
    args = command_line().parse_args(
        [
            *(
                "up",
                "--model",
                "simulated",
                "--model-price-prompt",
                "0.15",
                "--model-price-completion",
                "0.6",
            ),
            *("--add-model", "big=simulated,price_prompt=3,price_completion=15,price_cached=0.3"),
        ]
    )
    settings = settings_from(args)
    assert prices(settings) == {"simulated": Price(0.15, 0.6), "big": Price(3.0, 15.0, 0.3)}
    assert Settings.from_env(settings.to_env()) == settings  # and on to the worker processes
    with pytest.raises(ValueError, match="prices must be 0 or more"):
        ModelSettings(price_prompt=-1)
