"""A stage of your own, tested in isolation with the real runtime on in-memory backends.

Run it: ``.venv/bin/python docs/examples/custom_stage.py`` (tests/unit/test_examples.py runs it too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from conveyor import Envelope, Output, RejectedError, Stage, StageContext, Topic, new_event
from conveyor.payloads import EventType, RequestAccepted, RequestPrepared, decode
from conveyor.testing import StageHarness


async def shout(ctx: StageContext, event: Envelope) -> Sequence[Output]:
    """Upper-cases prompts; refuses empty ones for good (they go to the dead-letter topic)."""
    request = decode(RequestAccepted, event.data)
    if not request.prompt.strip():
        raise RejectedError("empty_prompt", "the prompt is blank")
    prepared = RequestPrepared(prompt=request.prompt.upper(), max_tokens=request.max_tokens)
    return [Output(Topic.PREPARED, ctx.derive(event, type=EventType.PREPARED, payload=prepared))]


SHOUT = Stage(
    name="shout", consumes=(Topic.REQUESTS,), handler=shout, accepts=frozenset({EventType.ACCEPTED})
)


async def main() -> list[str]:
    harness = StageHarness(SHOUT)
    event = new_event(type=EventType.ACCEPTED, source="example", payload=RequestAccepted(prompt="hello"))
    out = await harness.handle(event)
    (prepared,) = out[Topic.PREPARED]
    blank = new_event(type=EventType.ACCEPTED, source="example", payload=RequestAccepted(prompt=" "))
    (dead,) = (await harness.handle(blank))[Topic.DLQ]
    return [decode(RequestPrepared, prepared.data).prompt, dead.type]


if __name__ == "__main__":
    print(asyncio.run(main()))
