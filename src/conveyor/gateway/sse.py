"""Server-Sent Events for one request, resumable with ``Last-Event-ID``.

The event sequence of a request is a pure function of its history, so it can be
regenerated on reconnect and everything up to the client's last id skipped:

    id 1  accepted           id 2  prepared           id 3  generating
    id 4+e  token (text up to character e)       id 5+n  completed | failed | cancelled

Tokens come from the stream topic (tailed for this request only), progress and the final
event from the status view: the gateway's, so a request it has just accepted is "accepted" at
once, before the projector wrote anything, and a stream starts with the request's id. Chunks are
placed by character offset, so when a generation is redone after a crash (with differently cut
chunks) each character is still sent once, and ``n``, the streamed length, is known from the
final view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from conveyor.errors import UnavailableError
from conveyor.events import Topic
from conveyor.gateway.core import GatewayCore
from conveyor.gateway.streaming import Last
from conveyor.log.base import EventLog
from conveyor.payloads import EventType, TokenChunk, decode
from conveyor.view import TERMINAL, RequestView

logger = logging.getLogger("conveyor.gateway")

_ACCEPTED, _PREPARED, _GENERATING, _FIRST_TOKEN = 1, 2, 3, 4
Event = tuple[int, str, dict[str, Any]]  # (SSE id, event name, data)
KEEPALIVE_SECONDS = 15.0
TAIL_RETRY_SECONDS = 30.0  # a broker node's failover takes seconds; a stream rides it out
TAIL_RETRY_PAUSE = 0.25


def format_event(event_id: int, event: str, data: Any) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {orjson.dumps(data).decode()}\n\n"


class Sequencer:
    """Turns views and chunks, in any order and with repeats, into the canonical sequence."""

    def __init__(self, request_id: str, last_id: int) -> None:
        self.request_id, self.last_id = request_id, last_id
        self.sent: set[int] = set()
        self.position = 0  # characters of the stream sent (or skipped on resume)
        self.held: dict[int, TokenChunk] = {}
        self.final: RequestView | None = None
        self.done = False

    def _emit(self, event_id: int, event: str, data: Any) -> list[Event]:
        if event_id in self.sent:
            return []
        self.sent.add(event_id)
        return [] if event_id <= self.last_id else [(event_id, event, data)]

    def _progress(self, upto: int) -> list[Event]:
        """Progress events up to ``upto`` (accepted, prepared, generating), always in that order."""
        out: list[Event] = []
        for event_id, status in (
            (_ACCEPTED, "accepted"),
            (_PREPARED, "prepared"),
            (_GENERATING, "generating"),
        ):
            if event_id <= upto:
                out += self._emit(event_id, status, {"id": self.request_id, "status": status})
        return out

    def on_view(self, view: RequestView) -> list[Event]:
        reached = _ACCEPTED
        if "finished_at" in view.stages.get("prepare", {}):
            reached = _PREPARED
        if "started_at" in view.stages.get("generate", {}):
            reached = _GENERATING
        out = self._progress(reached)
        if view.terminal:
            self.final = view
        return out + self._finish()

    def on_chunk(self, chunk: TokenChunk) -> list[Event]:
        if chunk.offset + len(chunk.text) <= self.position:
            return []  # already sent (a repeat, or an overlapping chunk of a redone generation)
        kept = self.held.get(chunk.offset)
        if kept is None or len(chunk.text) > len(kept.text):
            self.held[chunk.offset] = chunk
        out: list[Event] = []
        while held := [c for o, c in self.held.items() if o <= self.position]:
            for c in held:
                del self.held[c.offset]
            c = max(held, key=lambda h: h.offset + len(h.text))
            end = c.offset + len(c.text)
            if end <= self.position:
                continue
            out += self._progress(_GENERATING)
            skip = self.position - c.offset
            data: dict[str, Any] = {"text": c.text[skip:], "offset": self.position}
            if c.logprobs:
                data["logprobs"] = _logprobs_after(c, skip)
            out += self._emit(_FIRST_TOKEN + end, "token", data)
            self.position = end
        return out + self._finish()

    def _finish(self) -> list[Event]:
        if self.final is None or self.done:
            return []
        total = self.final.streamed_chars or 0
        if self.position < total:
            return []  # the rest of the stream is still on its way
        self.done = True
        # A resumed stream must repeat this event exactly: the outcome, not the stage timestamps.
        outcome = self.final.outcome()
        return self._emit(_FIRST_TOKEN + 1 + max(total, self.position), self.final.status, outcome)


def _logprobs_after(chunk: TokenChunk, skip: int) -> list[dict[str, Any]]:
    """The logprobs of the tokens of ``chunk`` from its character ``skip`` on (a redone generation's
    chunk overlapping what was sent)."""
    out, at = [], 0
    for entry in chunk.logprobs:
        if at >= skip:
            out.append(entry.model_dump())
        at += len(entry.token)
    return out


async def _pump_chunks(
    log: EventLog, request_id: str, queue: asyncio.Queue[Any], *, retry_for: float = TAIL_RETRY_SECONDS
) -> None:
    """Tail the request's chunks into ``queue``. A tail that fails (the broker fails over to another
    node, a connection drops) is opened again after the last chunk read, for up to ``retry_for``
    seconds without progress; only then does the stream end with the error."""
    after = 0
    failing_since: float | None = None
    while True:
        try:
            async for tailed in log.tail(Topic.STREAM, request_id, after=after):
                after, failing_since = tailed.position, None
                if tailed.envelope.type == EventType.TOKEN:
                    queue.put_nowait(("chunk", decode(TokenChunk, tailed.envelope.data)))
            return
        except Exception as exc:
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since >= retry_for:  # hand it to the response, which ends with it
                queue.put_nowait(("error", exc))
                return
            logger.warning("the token stream of %s failed (%r); reading it again", request_id, exc)
            await asyncio.sleep(TAIL_RETRY_PAUSE)


async def _view(core: GatewayCore, request_id: str, tenant: str) -> RequestView | None:
    """The request's view, or None while the store cannot be read (a pool exhausted under overload,
    a failover): the stream goes on with the watch and the chunks and reads it again at the next
    keepalive, rather than ending unfinished."""
    try:
        return await core.view(request_id, tenant=tenant)
    except UnavailableError as exc:
        logger.warning("the status of %s could not be read (%r); its stream goes on", request_id, exc)
        return None


async def request_events(
    core: GatewayCore, request_id: str, last_id: int, *, tenant: str
) -> AsyncGenerator[list[Event] | None, None]:
    """The tenant's request's events after ``last_id`` as they happen, those ready together in one
    list (one write to the client, not one each); None when a keepalive is due."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    seq = Sequencer(request_id, last_id)
    with core.watch.subscribe(request_id, queue):
        pump = asyncio.create_task(_pump_chunks(core.log, request_id, queue))
        try:
            view = await _view(core, request_id, tenant)
            if view is not None and (events := seq.on_view(view)):
                yield events
            while not seq.done:
                try:
                    async with asyncio.timeout(KEEPALIVE_SECONDS):
                        updates = [await queue.get()]
                except TimeoutError:
                    # Also a safety net for a missed watch notification: re-read the view.
                    view = await _view(core, request_id, tenant)
                    yield (seq.on_view(view) if view else []) or None
                    continue
                while not queue.empty():
                    updates.append(queue.get_nowait())
                events = []
                for kind, item in updates:
                    if kind == "error":
                        if events:
                            yield events  # what came before the failure
                        raise item
                    events += seq.on_view(item) if kind == "view" else seq.on_chunk(item)
                if events:
                    yield events
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump


async def stream_request(
    core: GatewayCore, request_id: str, last_id: int, *, tenant: str
) -> AsyncGenerator[str, None]:
    """The job API's SSE body; the final event leaves with the end of the body."""
    async with contextlib.aclosing(request_events(core, request_id, last_id, tenant=tenant)) as updates:
        async for events in updates:
            if events is None:
                yield ": keepalive\n\n"
                continue
            text = "".join(format_event(*event) for event in events)
            yield Last(text) if events[-1][1] in TERMINAL else text
