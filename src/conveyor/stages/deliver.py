"""deliver: tell a request's callback URL how it ended (the webhook of an async job API).

A request submitted with ``callback_url`` gets its outcome POSTed there once it ends, as JSON with
the status API's outcome fields (id, status, output, tool_calls, finish_reason, usage, error,
model). The terminal events of such requests go to [callbacks] as well as [completed] (``settled``),
so requests without a callback cost this stage nothing; dead letters come from [dlq].

A 2xx answer delivers it. A connection failure, a timeout, a 408, 429 or 5xx is tried again with
backoff, by the broker's redelivery: a call waiting for its next try holds no worker, and a host
with ``per_host`` calls in flight gets no more until one ends, so a receiver that hangs never stops
the others being called. Any other answer (or deliveries spent) puts the call on the dead-letter
topic with the receiver's reason, from where ``conveyor dlq --redrive`` sends it again once the
receiver is fixed.
Delivery is at least once: a receiver drops repeats by ``Conveyor-Event-Id``. Only the allowed
hosts are called (``conveyor.callbacks``), and a redirect is not followed.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp
import orjson

from conveyor.callbacks import LOOPBACK, SIGNATURE_HEADER, refusal, sign
from conveyor.errors import DeferredError, PermanentError
from conveyor.events import Envelope, Topic
from conveyor.observability.tracing import TRACEPARENT
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


def deliver_stage(
    *,
    hosts: Sequence[str] = LOOPBACK,
    secret: str = "",
    timeout: float = 10.0,
    concurrency: int = 256,
    per_host: int = 32,
) -> Stage:
    """Calls back the allowed ``hosts`` only, each call signed with ``secret`` if one is given and
    given up after ``timeout`` seconds. A call that failed for now is handed back to the broker
    and tried again later (it holds no worker meanwhile); so is one to a host with ``per_host``
    calls in flight already: a receiver that hangs takes up at most that many of the stage's
    ``concurrency``, and the other receivers are called as usual."""
    limit = aiohttp.ClientTimeout(total=timeout)
    in_flight: collections.Counter[str] = collections.Counter()

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
        if event.traceparent:
            headers[TRACEPARENT] = event.traceparent
        if secret:
            headers[SIGNATURE_HEADER] = sign(secret, body)
        host = urlsplit(event.callback).netloc
        if in_flight[host] >= per_host:
            raise DeferredError(f"{host} has {in_flight[host]} callbacks in flight already")
        in_flight[host] += 1
        try:
            # A session per call: calls are one per request that asked, and nothing is left open.
            async with (
                aiohttp.ClientSession(timeout=limit) as session,
                session.post(event.callback, data=body, headers=headers, allow_redirects=False) as answer,
            ):
                status, said = answer.status, (await answer.text())[:200]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeferredError(f"callback to {event.callback} failed: {exc!r}") from exc
        finally:
            in_flight[host] -= 1
        if 200 <= status < 300:
            return []
        problem = f"callback to {event.callback} answered {status}: {said}"
        if status in (408, 429) or status >= 500:
            raise DeferredError(problem)
        raise PermanentError(problem)

    return Stage(
        name=STAGE,
        consumes=(Topic.CALLBACKS, Topic.DLQ),
        handler=handle,
        accepts=frozenset({EventType.COMPLETED, EventType.FAILED, EventType.DEAD_LETTER}),
        timeout=timeout + 5.0,
        concurrency=concurrency,
        # A receiver down for a minute or two is worth waiting for (8 deliveries over ~1 minute on
        # average, ~2 at most); longer, the dead-letter topic keeps the call.
        max_deliveries=8,
        retry=RetryPolicy(initial_backoff=1.0, max_backoff=60.0),
    )
