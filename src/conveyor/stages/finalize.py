"""finalize: post-process the text and write the usage ledger exactly once per request, with
what the request cost at its model's price (none for an answer from the answer cache: the model
did not run)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

import orjson

from conveyor import spend
from conveyor.events import Envelope, Topic, now_rfc3339
from conveyor.observability.metrics import USAGE_TOKENS
from conveyor.payloads import EventType, GenerationCompleted, RequestCompleted, decode
from conveyor.pipeline import Output, Stage, StageContext
from conveyor.stages.deliver import settled
from conveyor.store.base import Namespace
from conveyor.usage import Price


def postprocess(text: str) -> str:
    return text.strip()


def finalize_stage(prices: Mapping[str, Price] | None = None) -> Stage:
    """``prices``: each priced model's, by the model name its events carry."""
    priced = dict(prices or {})

    async def handle(ctx: StageContext, event: Envelope) -> Sequence[Output]:
        generated = decode(GenerationCompleted, event.data)
        price = priced.get(event.model)
        cost = None if price is None else 0.0 if generated.cached else price.cost(generated.usage)
        record = {
            "request_id": event.request_id,
            "tenant": event.tenant,
            "model": event.model,
            "model_version": event.model_version,
            "model_license": event.model_license,
            "prompt_tokens": generated.usage.prompt_tokens,
            "completion_tokens": generated.usage.completion_tokens,
            "cached_tokens": generated.usage.cached_tokens,
            "finish_reason": generated.finish_reason,
            "cached": generated.cached,
            "cost_usd": cost,
            "event_id": event.id,
            "recorded_at": now_rfc3339(),
        }
        # Create-only: a redelivered or duplicated generation event finds the record
        # already there and bills nothing more.
        if await ctx.store.create(Namespace.USAGE, event.request_id, orjson.dumps(record)) is not None:
            USAGE_TOKENS.inc(generated.usage.total_tokens, tenant=event.tenant)
            if cost:
                await spend.add(ctx.store, event.tenant, cost, datetime.datetime.now(datetime.UTC))
        completed = RequestCompleted(
            output=generated.text if generated.continuation else postprocess(generated.text),
            streamed_chars=len(generated.text),
            finish_reason=generated.finish_reason,
            usage=generated.usage,
            generated_at=event.time,  # so the read model needs no delivery of [generated]
            tool_calls=generated.tool_calls,
            logprobs=generated.logprobs,
            embedding=generated.embedding,
            cached=generated.cached,
            cost_usd=cost,
        )
        return settled(ctx.derive(event, type=EventType.COMPLETED, payload=completed))

    return Stage(
        name="finalize",
        consumes=(Topic.GENERATED,),
        handler=handle,
        accepts=frozenset({EventType.GENERATED}),
        dedupe=False,  # the ledger write is create-only and the output id is deterministic
    )
