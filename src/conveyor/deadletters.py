"""Dead letters: reading them, and sending one back to the stage that gave up on it.

Once the cause is fixed (a model server that was down, a bug in a stage), a dead-lettered
event can be sent back ("redriven"). It is published again to its topic with an id derived
from the original and the stage, so sending the same letter back twice publishes it once,
and it is marked for that stage alone: the topic's other consumers (the projector, another
stage) handled their copy already and skip this one. Its deadline is dropped: whoever sends
it back has decided it should run now. A request that then completes shows as completed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from conveyor.events import Envelope, Topic
from conveyor.ids import derive_id
from conveyor.log.base import EventLog
from conveyor.payloads import DeadLetter, decode


@dataclasses.dataclass(frozen=True, slots=True)
class Letter:
    """One event of the dead-letter topic: when and for which request (``event``), and why."""

    event: Envelope
    letter: DeadLetter


async def dead_letters(log: EventLog) -> AsyncIterator[Letter]:
    """Every dead letter on the log so far, oldest first."""
    async for tailed in log.tail(Topic.DLQ, None, follow=False):
        yield Letter(tailed.envelope, decode(DeadLetter, tailed.envelope.data))


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
