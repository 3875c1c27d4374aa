"""Dead letters: reading them, and sending one back to the stage that gave up on it.

Once the cause is fixed (a model server that was down, a bug in a stage), a dead-lettered
event can be sent back ("redriven"). It is published again to its topic with an id derived
from the original and the stage, so sending the same letter back twice publishes it once,
and it is marked for that stage alone: the topic's other consumers (the projector, another
stage) handled their copy already and skip this one. Its deadline is dropped: whoever sends
it back has decided it should run now. A request that then completes shows as completed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Iterable

from conveyor.events import Envelope, Topic
from conveyor.ids import derive_id
from conveyor.log.base import EventLog
from conveyor.payloads import DeadLetter, decode


@dataclasses.dataclass(frozen=True, slots=True)
class Letter:
    """One event of the dead-letter topic: when and for which request (``event``), and why."""

    event: Envelope
    letter: DeadLetter


async def dead_letters(log: EventLog, *, follow: bool = False) -> AsyncGenerator[Letter, None]:
    """Every dead letter on the log so far, oldest first (with ``follow``, then new ones too)."""
    async with contextlib.aclosing(log.tail(Topic.DLQ, None, follow=follow)) as tailed:
        async for each in tailed:
            yield Letter(each.envelope, decode(DeadLetter, each.envelope.data))


def latest(letters: Iterable[Letter]) -> list[Letter]:
    """The last letter of each request and stage, in log order. The earlier ones hold events that
    were sent back already (the later letter holds the copy that failed again): sending them back
    too would, once the log's duplicate window has passed, run the stage twice for one request."""
    last: dict[tuple[str, str], Letter] = {}
    for item in letters:
        key = (item.event.request_id, item.letter.stage)
        last.pop(key, None)  # so the result keeps the order of the latest ones
        last[key] = item
    return list(last.values())


def sent_back(letter: DeadLetter) -> Envelope:
    """The event to publish again to ``letter.topic``; raises InvalidEventError when what was
    dead-lettered was not an event at all (there is nothing to send back)."""
    original = Envelope.from_headers(letter.original_headers, letter.original_body.encode())
    return dataclasses.replace(
        original,
        id=derive_id(original.id, f"redrive:{letter.stage}"),
        causation_id=original.id,
        attempt=0,
        deadline=None,
        redrive=letter.stage,
    )
