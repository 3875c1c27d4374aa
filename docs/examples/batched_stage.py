"""A stage whose work is cheaper in batches (an embedding model, a batch API): the runtime groups
events of different partition keys, and hands each event its own result as soon as it is ready.

Run it: ``.venv/bin/python docs/examples/batched_stage.py`` (tests/unit/test_examples.py runs it too).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from conveyor import BatchPolicy, Envelope, Output, Stage, StageContext, Topic, new_event
from conveyor.payloads import EventType, RequestAccepted, RequestPrepared, decode
from conveyor.testing import StageHarness

calls: list[int] = []  # the size of every batch the "model" saw


def normalize(texts: Sequence[str]) -> list[str]:
    """Stands in for a model that takes many inputs per call."""
    calls.append(len(texts))
    return [" ".join(text.split()).lower() for text in texts]


def prepared(ctx: StageContext, event: Envelope, text: str) -> Sequence[Output]:
    payload = RequestPrepared(prompt=text)
    return [Output(Topic.PREPARED, ctx.derive(event, type=EventType.PREPARED, payload=payload))]


async def handle_batch(
    ctx: StageContext, events: Sequence[Envelope]
) -> AsyncGenerator[tuple[int, Sequence[Output] | Exception], None]:
    """One model call for the batch; yields (index, outputs) — or an event's own error."""
    texts = [decode(RequestAccepted, event.data).prompt for event in events]
    for index, text in enumerate(normalize(texts)):
        yield index, prepared(ctx, events[index], text)


async def handle(ctx: StageContext, event: Envelope) -> Sequence[Output]:
    """One event alone: used for retries, so a poison event fails by itself."""
    (text,) = normalize([decode(RequestAccepted, event.data).prompt])
    return prepared(ctx, event, text)


NORMALIZE = Stage(
    name="normalize",
    consumes=(Topic.REQUESTS,),
    handler=handle,
    handle_batch=handle_batch,
    # Up to 8 per call, waiting at most 5 ms for a batch to fill.
    batching=BatchPolicy(max_size=8, max_wait=0.005),
    accepts=frozenset({EventType.ACCEPTED}),
)


async def main() -> tuple[list[str], list[int]]:
    harness = StageHarness(NORMALIZE)
    events = [
        new_event(
            type=EventType.ACCEPTED,
            source="example",
            payload=RequestAccepted(prompt=f"  Hello   WORLD {i} "),
            key=f"user-{i}",  # different keys: they may share a batch (one key is one at a time)
        )
        for i in range(12)
    ]
    async with harness.running() as worker:
        await harness.log.publish(Topic.REQUESTS, events)
        await worker.idle()
    texts = sorted(decode(RequestPrepared, e.data).prompt for e in harness.published(Topic.PREPARED))
    return texts, calls


if __name__ == "__main__":
    print(asyncio.run(main()))
