"""generate: run the model, stream coalesced token chunks, honour cancellation and deadlines."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, Sequence

from conveyor.errors import ConveyorError, InvalidEventError, RejectedError, RetryableError
from conveyor.events import Envelope, Topic, background_topic, generate_group, prepared_topic
from conveyor.log.base import EventLog
from conveyor.models.base import Embedder, Embedding, GenerationRequest, ModelBackend, ModelInfo, Token
from conveyor.payloads import (
    EventType,
    FinishReason,
    GenerationCompleted,
    GenerationStarted,
    RequestPrepared,
    TokenChunk,
    TokenLogprob,
    Usage,
    decode,
)
from conveyor.pipeline import BatchPolicy, Output, Stage, StageContext
from conveyor.stages.answer_cache import AnswerCache

logger = logging.getLogger("conveyor.generate")

# Which process generates: on `generation.started`, so an operator (or a test) can tell.
WORKER = f"{socket.gethostname()}/{os.getpid()}"


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

    The first token leaves at once if it took more than ``first_delay`` to come (a real model's
    prompt processing: time to first token is what a reader feels most), so an instant model's
    whole answer is still one chunk. After it, a model slower than ``max_delay`` per token streams
    token by token, a faster one in chunks (each chunk is a durable event: fewer is cheaper, for
    the broker and for the CPU the model shares with it).
    """

    max_chars: int = 256
    max_delay: float = 0.1
    first_delay: float = 0.01


class _Stream:
    """One request of a batch: cuts its tokens into chunks and builds its outputs when it ends."""

    def __init__(
        self,
        ctx: StageContext,
        event: Envelope,
        prepared: RequestPrepared,
        info: ModelInfo,
        model: ModelBackend,
        chunking: ChunkPolicy,
    ) -> None:
        self._prepared = prepared
        self._ctx, self._event, self._model, self._chunking = ctx, event, model, chunking
        self._source = _stamped(event, info)
        self.request = GenerationRequest(
            id=event.request_id,
            prompt=self._prepared.prompt,
            messages=tuple(self._prepared.messages),
            continuation=self._prepared.continuation,
            max_tokens=self._prepared.max_tokens,
            temperature=self._prepared.sampling.temperature,
            top_p=self._prepared.sampling.top_p,
            stop=tuple(self._prepared.sampling.stop),
            seed=self._prepared.sampling.seed,
            presence_penalty=self._prepared.sampling.presence_penalty,
            frequency_penalty=self._prepared.sampling.frequency_penalty,
            logit_bias=tuple(self._prepared.sampling.logit_bias.items()),
            json_schema=self._prepared.sampling.json_schema,
            tools=tuple(self._prepared.sampling.tools),
            tool_choice=self._prepared.sampling.tool_choice,
            tool_name=self._prepared.sampling.tool_name,
            logprobs=self._prepared.sampling.logprobs,
            priority=event.priority,
            tenant=event.tenant,
            traceparent=event.traceparent,
        )
        self.deadline = _arm_deadline(event.deadline, self.request)
        self._text: list[str] = []
        self._pending = ""
        self._logprobs: list[TokenLogprob] = []  # every token's, if asked for
        self._pending_logprobs: list[TokenLogprob] = []  # those of ``_pending``
        self._index = self._offset = self._produced = 0
        self._last_flush = time.monotonic()
        # The chunks handed to the log so far, published one after another in the background:
        # awaiting each in the batch's token loop made every request of the batch wait for
        # every other's round trips (and the wait itself then cut more, smaller chunks).
        self._sent: asyncio.Task[None] | None = None

    def _chunk(self, text: str, finish: FinishReason | None = None) -> Envelope:
        return _chunk(
            self._ctx, self._source, self._index, self._offset, text, finish, self._pending_logprobs
        )

    @property
    def sent(self) -> asyncio.Task[None] | None:
        """Done once every chunk cut so far is on the log (None: none was cut)."""
        return self._sent

    def take(self, token: Token) -> Sequence[Output] | None:
        """Add ``token``; the request's outputs once it is the last one (to publish after ``sent``)."""
        if token.error is not None:
            raise token.error
        if self._sent is not None and self._sent.done():
            self._sent.result()  # a chunk could not be published: this request fails here
        if token.text:
            self._text.append(token.text)
            self._pending += token.text
            self._produced += 1
        if token.logprobs:
            self._logprobs.extend(token.logprobs)
            self._pending_logprobs.extend(token.logprobs)
        if token.finish_reason is not None:
            return self._finish(token)
        policy = self._chunking
        waited = time.monotonic() - self._last_flush
        if (
            waited >= policy.max_delay
            or len(self._pending) >= policy.max_chars
            or (self._index == 0 and waited >= policy.first_delay)
        ):
            self._flush()
        return None

    def _flush(self) -> None:
        events = [Output(Topic.STREAM, self._chunk(self._pending))]
        if self._index == 0:
            # "generating" is announced with the first streamed chunk, not before: a request
            # answered in one chunk never needs the extra event (it goes straight to completed).
            started = self._ctx.derive(
                self._source, type=EventType.STARTED, payload=GenerationStarted(worker=WORKER)
            )
            events.append(Output(Topic.PROGRESS, started))
        self._sent = asyncio.create_task(self._publish(self._sent, events))
        self._index += 1
        self._offset += len(self._pending)
        self._pending = ""
        self._pending_logprobs = []
        self._last_flush = time.monotonic()

    async def _publish(self, previous: asyncio.Task[None] | None, outputs: Sequence[Output]) -> None:
        """Publish ``outputs`` once the chunks before them are on the log (the stream's order)."""
        if previous is not None:
            await previous
        await asyncio.gather(*(self._ctx.log.publish(o.topic, [o.event]) for o in outputs))

    def abandon(self) -> None:
        """Stop publishing chunks of a request whose batch ended without it."""
        if self._sent is None:
            return
        if not self._sent.done():
            self._sent.cancel()
        elif not self._sent.cancelled():
            self._sent.exception()  # its failure was answered already (or is moot): mark it seen

    def _finish(self, last: Token) -> Sequence[Output]:
        finish, usage = last.finish_reason or "stop", last.usage
        if finish == "cancelled" and _past(self._event.deadline):
            finish = "deadline"
        if usage is None:  # the backend did not count: the prompt's text and the chunks seen
            usage = Usage(
                prompt_tokens=self._model.count_tokens(self._prepared.prompt),
                completion_tokens=self._produced,
            )
        completed = GenerationCompleted(
            text="".join(self._text),
            finish_reason=finish,
            usage=usage,
            tool_calls=list(last.tool_calls),
            logprobs=None if self.request.logprobs is None else self._logprobs,
            continuation=self.request.continuation,
        )
        generated = self._ctx.derive(self._source, type=EventType.GENERATED, payload=completed)
        return [Output(Topic.STREAM, self._chunk(self._pending, finish)), Output(Topic.GENERATED, generated)]


def generate_stage(
    model: ModelBackend,
    cancels: CancelWatch,
    *,
    info: ModelInfo | None = None,
    chunking: ChunkPolicy = ChunkPolicy(),
    batching: BatchPolicy = BatchPolicy(),
    route: str = "",
    background: int = 4,
    fallback: str | None = None,
    cache: float = 0.0,
) -> Stage:
    """The generate stage over ``model``; ``info`` (default: the model's own) is stamped on
    every event it produces. It takes the requests whose events name ``route`` as their model
    (``""``: the deployment's default model) from that model's topic (``prepared_topic``), and
    its background requests (positive priority) from theirs, at most ``background`` at a time.
    With ``fallback`` (a model's route), a request this model failed (its retries spent, or a
    failure of the model's own) goes to that model's topic instead of the dead-letter topic.
    With ``cache`` (seconds), deterministic answers are kept that long and a request asked the
    same is answered from them (``AnswerCache``).
    """
    topic = prepared_topic(route)
    stamp = info or model.info
    answers = AnswerCache(stamp, cache) if cache > 0 else None

    async def handle_batch(
        ctx: StageContext, events: Sequence[Envelope]
    ) -> AsyncGenerator[tuple[int, Sequence[Output] | Exception], None]:
        streams: dict[str, tuple[int, _Stream]] = {}
        embeds: dict[str, tuple[int, Envelope, RequestPrepared]] = {}
        keys: dict[str, str] = {}  # request id -> the key its answer is kept by
        for index, event in enumerate(events):
            if event.request_id in streams or event.request_id in embeds:  # never from one lane at a time
                yield index, RetryableError("the same request twice in one batch")  # retried alone
                continue
            try:
                prepared = decode(RequestPrepared, event.data)
                if answers is not None and (key := answers.key(prepared)) is not None:
                    if (kept := await answers.get(ctx.store, key)) is not None:
                        yield index, _kept(ctx, event, stamp, kept)
                        continue
                    keys[event.request_id] = key
                if prepared.embed:
                    embeds[event.request_id] = (index, event, prepared)
                else:
                    streams[event.request_id] = (index, _Stream(ctx, event, prepared, stamp, model, chunking))
            except InvalidEventError as exc:
                yield index, exc
        for index, result in await _embeddings(ctx, model, stamp, list(embeds.values())):
            if (
                answers is not None
                and not isinstance(result, Exception)
                and (key := keys.get(events[index].request_id))
            ):
                await _keep(ctx, answers, key, result)
            yield index, result
        for _, stream in streams.values():
            cancels.attach(stream.request)
        try:
            requests = [stream.request for _, stream in streams.values()]
            failed: set[str] = set()
            # Answered by the model, waiting for their earlier chunks to be on the log: the last
            # chunk and [generated] must follow them, and the other requests must not wait.
            held: dict[asyncio.Task[None], tuple[int, Sequence[Output]]] = {}
            async with contextlib.aclosing(model.generate(requests)) as tokens:
                async for token in tokens:
                    if token.request_id in failed:
                        continue  # already answered with its error; its last tokens drain
                    index, stream = streams[token.request_id]
                    try:
                        outputs = stream.take(token)
                    except ConveyorError as exc:  # this request's own failure (the model's, or a publish)
                        failed.add(token.request_id)
                        stream.request.cancelled.set()  # it is retried alone: stop spending on it here
                        yield index, exc
                        continue
                    if outputs is not None and answers is not None and (key := keys.get(token.request_id)):
                        await _keep(ctx, answers, key, outputs)
                    if outputs is not None and (sent := stream.sent) is None:
                        yield index, outputs
                    elif outputs is not None and sent is not None:
                        held[sent] = (index, outputs)
                    for sent in [task for task in held if task.done()]:
                        yield _after(sent, *held.pop(sent))
            while held:
                await asyncio.wait(held, return_when=asyncio.FIRST_COMPLETED)
                for sent in [task for task in held if task.done()]:
                    yield _after(sent, *held.pop(sent))
        finally:
            for _, stream in streams.values():
                stream.abandon()
                cancels.detach(stream.request)
                if stream.deadline is not None:
                    stream.deadline.cancel()

    async def handle(ctx: StageContext, event: Envelope) -> Sequence[Output]:
        async with contextlib.aclosing(handle_batch(ctx, [event])) as results:
            async for _, result in results:
                if isinstance(result, Exception):
                    raise result
                return result
        raise RuntimeError(f"the model ended without finishing request {event.request_id}")

    async def fall_back(ctx: StageContext, event: Envelope, error: Exception) -> Sequence[Output]:
        if fallback is None or isinstance(error, RejectedError | InvalidEventError):
            return []  # the request's own fault: another model would refuse it too
        if await ctx.log.find(Topic.STREAM, event.request_id) is not None:
            return []  # part of this model's answer went out already: another's would not continue it
        again = ctx.derive(
            event,
            type=EventType.PREPARED,
            payload=decode(RequestPrepared, event.data),
            label=f"fallback:{fallback}",
        )
        target = prepared_topic(fallback)
        return [
            Output(
                background_topic(target) if event.priority > 0 else target,
                dataclasses.replace(again, model=fallback, model_version="", model_license=""),
            )
        ]

    return Stage(
        name=generate_group(route),
        consumes=(topic, background_topic(topic)),
        topic_limits={background_topic(topic): background},
        fallback=fall_back if fallback is not None else None,
        handler=handle,
        handle_batch=handle_batch,
        batching=batching,
        accepts=frozenset({EventType.PREPARED}),
        timeout=600.0,
    )


def _chunk(
    ctx: StageContext,
    source: Envelope,
    index: int,
    offset: int,
    text: str,
    finish: FinishReason | None,
    logprobs: list[TokenLogprob],
) -> Envelope:
    """A [stream] event: ``text`` at ``offset`` of the answer to ``source``'s request."""
    payload = TokenChunk(
        index=index,
        offset=offset,
        text=text,
        final=finish is not None,
        finish_reason=finish,
        logprobs=logprobs,
    )
    # Identified by content, so a redone generation adds only chunks that differ.
    label = f"chunk:{offset}:{len(text)}:{finish or ''}"
    out = ctx.derive(source, type=EventType.TOKEN, payload=payload, label=label)
    return dataclasses.replace(out, key=source.request_id)  # the stream is read per request


def _kept(ctx: StageContext, event: Envelope, info: ModelInfo, answer: GenerationCompleted) -> list[Output]:
    """The outputs of a request answered from the answer cache: its text in one final chunk (an
    embedding has none), and [generated]."""
    source = _stamped(event, info)
    generated = Output(Topic.GENERATED, ctx.derive(source, type=EventType.GENERATED, payload=answer))
    if answer.embedding is not None:
        return [generated]
    chunk = _chunk(ctx, source, 0, 0, answer.text, answer.finish_reason, answer.logprobs or [])
    return [Output(Topic.STREAM, chunk), generated]


async def _keep(ctx: StageContext, cache: AnswerCache, key: str, outputs: Sequence[Output]) -> None:
    """Keep the answer among ``outputs`` for the requests asked the same later."""
    generated = next(o.event for o in outputs if o.topic == Topic.GENERATED)
    await cache.put(ctx.store, key, decode(GenerationCompleted, generated.data))


def _stamped(event: Envelope, info: ModelInfo) -> Envelope:
    """``event`` as the source of what ``info``'s model made from it: every output names the model."""
    return dataclasses.replace(event, model=info.name, model_version=info.version, model_license=info.license)


async def _embeddings(
    ctx: StageContext,
    model: ModelBackend,
    info: ModelInfo,
    asked: Sequence[tuple[int, Envelope, RequestPrepared]],
) -> list[tuple[int, Sequence[Output] | Exception]]:
    """The embeddings ``asked`` for, made in one call (or one by one, if that call fails: then
    each request fails for itself alone), each as that request's [generated] event."""
    if not asked:
        return []
    if not isinstance(model, Embedder):
        return [
            (index, RejectedError("invalid_request", f"the model {info.name} makes no embeddings"))
            for index, _, _ in asked
        ]
    made: list[Embedding | BaseException]
    try:
        made = list(await model.embed([prepared.prompt for _, _, prepared in asked]))
    except ConveyorError as exc:
        if len(asked) == 1:
            made = [exc]
        else:
            alone = [model.embed([prepared.prompt]) for _, _, prepared in asked]
            made = [
                r if isinstance(r, BaseException) else r[0]
                for r in await asyncio.gather(*alone, return_exceptions=True)
            ]
    results: list[tuple[int, Sequence[Output] | Exception]] = []
    for (index, event, _), embedding in zip(asked, made, strict=True):
        if isinstance(embedding, BaseException):
            error = embedding if isinstance(embedding, Exception) else RetryableError(repr(embedding))
            results.append((index, error))
            continue
        completed = GenerationCompleted(
            text="", usage=Usage(prompt_tokens=embedding.tokens), embedding=embedding.vector
        )
        generated = ctx.derive(_stamped(event, info), type=EventType.GENERATED, payload=completed)
        results.append((index, [Output(Topic.GENERATED, generated)]))
    return results


def _after(
    sent: asyncio.Task[None], index: int, outputs: Sequence[Output]
) -> tuple[int, Sequence[Output] | Exception]:
    """A held request's result once its earlier chunks were published (or failed to be)."""
    error = sent.exception()
    if error is None:
        return index, outputs
    if isinstance(error, ConveyorError):
        return index, error  # it is retried alone
    raise error


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline


def _arm_deadline(deadline: float | None, request: GenerationRequest) -> asyncio.TimerHandle | None:
    if deadline is None:
        return None
    loop = asyncio.get_running_loop()
    return loop.call_later(max(0.0, deadline - time.time()), request.cancelled.set)
