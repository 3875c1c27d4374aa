"""deliver: tell a request's callback URL how it ended (the webhook of an async job API).

A request submitted with ``callback_url`` gets its outcome POSTed there once it ends, as JSON with
the status API's outcome fields (id, status, output, tool_calls, finish_reason, usage, error,
model). The terminal events of such requests go to [callbacks] as well as [completed] (``settled``),
so requests without a callback cost this stage nothing; dead letters come from [dlq].

A 2xx answer delivers it. A connection failure, a timeout, a 408, 429 or 5xx is tried again with
backoff; any other answer (or retries spent) puts the call on the dead-letter topic with the
receiver's reason, from where ``conveyor dlq --redrive`` sends it again once the receiver is fixed.
Delivery is at least once: a receiver drops repeats by ``Conveyor-Event-Id``. Only the allowed
hosts are called (``conveyor.callbacks``), and a redirect is not followed.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp
import orjson

from conveyor.callbacks import LOOPBACK, SIGNATURE_HEADER, refusal, sign
from conveyor.errors import PermanentError, RetryableError
from conveyor.events import Envelope, Topic
from conveyor.payloads import DeadLetter, EventType, decode
from conveyor.pipeline import Output, RetryPolicy, Stage, StageContext
from conveyor.view import fold

STAGE = "deliver"


def settled(event: Envelope) -> list[Output]:
    """A request's terminal ``event`` on [completed], and on [callbacks] if it asked for a call."""
    outputs = [Output(Topic.COMPLETED, event)]
    if event.callback:
        outputs.append(Output(Topic.CALLBACKS, event))
    return outputs


def deliver_stage(*, hosts: Sequence[str] = LOOPBACK, secret: str = "", timeout: float = 10.0) -> Stage:
    """Calls back the allowed ``hosts`` only, each call signed with ``secret`` if one is given and
    given up after ``timeout`` seconds (then tried again)."""
    limit = aiohttp.ClientTimeout(total=timeout)

    async def handle(_: StageContext, event: Envelope) -> Sequence[Output]:
        if not event.callback:
            return []
        if event.type == EventType.DEAD_LETTER and decode(DeadLetter, event.data).stage == STAGE:
            return []  # a call of ours that failed for good: calling about it would fail again
        if (why := refusal(event.callback, hosts)) is not None:
            raise PermanentError(why)
        body = orjson.dumps(fold(None, event).outcome())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "conveyor",
            "Conveyor-Event-Id": event.id,
            "Conveyor-Request-Id": event.request_id,
        }
        if secret:
            headers[SIGNATURE_HEADER] = sign(secret, body)
        try:
            # A session per call: calls are one per request that asked, and nothing is left open.
            async with (
                aiohttp.ClientSession(timeout=limit) as session,
                session.post(event.callback, data=body, headers=headers, allow_redirects=False) as answer,
            ):
                status, said = answer.status, (await answer.text())[:200]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableError(f"callback to {event.callback} failed: {exc!r}") from exc
        if 200 <= status < 300:
            return []
        problem = f"callback to {event.callback} answered {status}: {said}"
        if status in (408, 429) or status >= 500:
            raise RetryableError(problem)
        raise PermanentError(problem)

    return Stage(
        name=STAGE,
        consumes=(Topic.CALLBACKS, Topic.DLQ),
        handler=handle,
        accepts=frozenset({EventType.COMPLETED, EventType.FAILED, EventType.DEAD_LETTER}),
        timeout=timeout + 5.0,
        # A receiver down for a minute or two is worth waiting for (8 attempts over ~1 minute on
        # average, ~2 at most); longer, the dead-letter topic keeps the call.
        retry=RetryPolicy(max_attempts=8, initial_backoff=1.0, max_backoff=60.0),
    )
