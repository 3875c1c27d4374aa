"""generate: run the model, stream coalesced token chunks, honour cancellation and deadlines."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Sequence

from conveyor.events import Envelope, Topic
from conveyor.log.base import EventLog
from conveyor.models.base import GenerationRequest, ModelBackend
from conveyor.payloads import (
    EventType,
    FinishReason,
    GenerationCompleted,
    GenerationStarted,
    RequestPrepared,
    TokenChunk,
    Usage,
    decode,
)
from conveyor.pipeline import Output, Stage, StageContext

logger = logging.getLogger("conveyor.generate")


class CancelWatch:
    """Which requests were cancelled, learned by tailing the control topic.

    Every generate worker reads the whole topic (it is small: one event per cancel)
    so the worker holding a request stops it wherever the cancel was issued.
    """

    def __init__(self, log: EventLog, *, remember: int = 100_000) -> None:
        self._log = log
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._running: dict[str, GenerationRequest] = {}
        self._remember = remember

    def is_cancelled(self, request_id: str) -> bool:
        return request_id in self._cancelled

    def cancel(self, request_id: str) -> None:
        self._cancelled[request_id] = None
        if len(self._cancelled) > self._remember:
            self._cancelled.popitem(last=False)
        running = self._running.get(request_id)
        if running is not None:
            running.cancelled.set()

    def attach(self, request: GenerationRequest) -> None:
        self._running[request.id] = request
        if request.id in self._cancelled:
            request.cancelled.set()

    def detach(self, request: GenerationRequest) -> None:
        self._running.pop(request.id, None)

    async def run(self) -> None:
        while True:
            try:
                async for tailed in self._log.tail(Topic.CONTROL, None):
                    if tailed.envelope.type == EventType.CANCEL:
                        self.cancel(tailed.envelope.request_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("control topic watch failed; restarting it")
                await asyncio.sleep(1.0)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChunkPolicy:
    """Coalesce tokens into chunks of about ``max_chars`` or ``max_delay`` seconds, whichever first.

    A model slower than ``max_delay`` per token streams token by token; a fast one is sent in
    chunks of up to ``max_chars`` (each chunk is a durable event: fewer is cheaper).
    """

    max_chars: int = 256
    max_delay: float = 0.05


def generate_stage(
    model: ModelBackend, cancels: CancelWatch, *, chunking: ChunkPolicy = ChunkPolicy()
) -> Stage:
    info = model.info

    async def handle(ctx: StageContext, event: Envelope) -> Sequence[Output]:
        prepared = decode(RequestPrepared, event.data)
        source = dataclasses.replace(
            event, model=info.name, model_version=info.version, model_license=info.license
        )

        def chunk(index: int, offset: int, text: str, finish: FinishReason | None = None) -> Envelope:
            payload = TokenChunk(
                index=index, offset=offset, text=text, final=finish is not None, finish_reason=finish
            )
            # Identified by content, so a redone generation adds only chunks that differ.
            label = f"chunk:{offset}:{len(text)}:{finish or ''}"
            out = ctx.derive(source, type=EventType.TOKEN, payload=payload, label=label)
            return dataclasses.replace(out, key=event.request_id)  # the stream is read per request

        # "generating" is announced with the first streamed chunk, not before: a request
        # answered in one chunk never needs the extra event (it goes straight to completed).
        started = ctx.derive(source, type=EventType.STARTED, payload=GenerationStarted(worker=ctx.stage))

        request = GenerationRequest(
            id=event.request_id,
            prompt=prepared.prompt,
            messages=tuple((m.role, m.content) for m in prepared.messages),
            max_tokens=prepared.max_tokens,
            temperature=prepared.sampling.temperature,
            top_p=prepared.sampling.top_p,
            stop=tuple(prepared.sampling.stop),
        )
        cancels.attach(request)
        deadline_timer = _arm_deadline(event.deadline, request)
        text: list[str] = []
        pending = ""
        index, offset, produced = 0, 0, 0
        finish: FinishReason = "stop"
        last_flush = time.monotonic()
        try:
            async for token in model.generate([request]):
                if token.text:
                    text.append(token.text)
                    pending += token.text
                    produced += 1
                if token.finish_reason is not None:
                    finish = token.finish_reason
                    break
                if len(pending) >= chunking.max_chars or time.monotonic() - last_flush >= chunking.max_delay:
                    flush = ctx.log.publish(Topic.STREAM, [chunk(index, offset, pending)])
                    if index == 0:
                        await asyncio.gather(flush, ctx.log.publish(Topic.PROGRESS, [started]))
                    else:
                        await flush
                    index, offset, pending, last_flush = (
                        index + 1,
                        offset + len(pending),
                        "",
                        time.monotonic(),
                    )
        finally:
            cancels.detach(request)
            if deadline_timer is not None:
                deadline_timer.cancel()
        if finish == "cancelled" and _past(event.deadline):
            finish = "deadline"
        completed = GenerationCompleted(
            text="".join(text),
            finish_reason=finish,
            usage=Usage(prompt_tokens=model.count_tokens(prepared.prompt), completion_tokens=produced),
        )
        return [
            Output(Topic.STREAM, chunk(index, offset, pending, finish)),
            Output(Topic.GENERATED, ctx.derive(source, type=EventType.GENERATED, payload=completed)),
        ]

    return Stage(
        name="generate",
        consumes=(Topic.PREPARED,),
        handler=handle,
        accepts=frozenset({EventType.PREPARED}),
        timeout=600.0,
    )


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline


def _arm_deadline(deadline: float | None, request: GenerationRequest) -> asyncio.TimerHandle | None:
    if deadline is None:
        return None
    loop = asyncio.get_running_loop()
    return loop.call_later(max(0.0, deadline - time.time()), request.cancelled.set)
