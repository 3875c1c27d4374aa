"""Server-Sent Events for one request, resumable with ``Last-Event-ID``.

The event sequence of a request is a pure function of its history, so it can be
regenerated on reconnect and everything up to the client's last id skipped:

    id 1  accepted           id 2  prepared           id 3  generating
    id 4+i  token (chunk i)  id 4+n  completed | failed | cancelled  (n = chunks)

Tokens come from the stream topic (tailed for this request only), progress and the
final event from the status view; chunks are ordered and deduplicated by index, so
a generation that was redone after a crash never shows twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from conveyor.events import Topic
from conveyor.gateway.watch import StatusWatch
from conveyor.log.base import EventLog
from conveyor.payloads import EventType, TokenChunk, decode
from conveyor.projector import read_view
from conveyor.store.base import StateStore
from conveyor.view import RequestView

_ACCEPTED, _PREPARED, _GENERATING, _FIRST_TOKEN = 1, 2, 3, 4
KEEPALIVE_SECONDS = 15.0


def format_event(event_id: int, event: str, data: Any) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {orjson.dumps(data).decode()}\n\n"


class _Sequencer:
    """Turns views and chunks, in any order and with repeats, into the canonical sequence."""

    def __init__(self, request_id: str, last_id: int) -> None:
        self.request_id, self.last_id = request_id, last_id
        self.sent: set[int] = set()
        self.next_chunk = 0
        self.held: dict[int, TokenChunk] = {}
        self.final: RequestView | None = None
        self.done = False

    def _emit(self, event_id: int, event: str, data: Any) -> list[str]:
        if event_id in self.sent:
            return []
        self.sent.add(event_id)
        return [] if event_id <= self.last_id else [format_event(event_id, event, data)]

    def _progress(self, event_id: int, status: str, at: str = "") -> list[str]:
        return self._emit(event_id, status, {"id": self.request_id, "status": status, "at": at})

    def on_view(self, view: RequestView) -> list[str]:
        out = self._progress(_ACCEPTED, "accepted", view.stages.get("gateway", {}).get("accepted_at", ""))
        if "finished_at" in view.stages.get("prepare", {}):
            out += self._progress(_PREPARED, "prepared", view.stages["prepare"]["finished_at"])
        if "started_at" in view.stages.get("generate", {}):
            out += self._progress(_GENERATING, "generating", view.stages["generate"]["started_at"])
        if view.terminal:
            self.final = view
        return out + self._finish()

    def on_chunk(self, chunk: TokenChunk) -> list[str]:
        if chunk.index < self.next_chunk:
            return []
        self.held[chunk.index] = chunk
        out: list[str] = []
        while self.next_chunk in self.held:
            c = self.held.pop(self.next_chunk)
            out += self._progress(_PREPARED, "prepared") + self._progress(_GENERATING, "generating")
            data = {"index": c.index, "text": c.text, "finish_reason": c.finish_reason}
            out += self._emit(_FIRST_TOKEN + c.index, "token", data)
            self.next_chunk += 1
        return out + self._finish()

    def _finish(self) -> list[str]:
        if self.final is None or self.done:
            return []
        total = self.final.chunks or 0
        if self.next_chunk < total:
            return []  # the rest of the stream is still on its way
        self.done = True
        return self._emit(_FIRST_TOKEN + max(total, self.next_chunk), self.final.status, self.final.public())


async def _pump_chunks(log: EventLog, request_id: str, queue: asyncio.Queue[Any]) -> None:
    try:
        async for tailed in log.tail(Topic.STREAM, request_id):
            if tailed.envelope.type == EventType.TOKEN:
                queue.put_nowait(("chunk", decode(TokenChunk, tailed.envelope.data)))
    except Exception as exc:  # hand it to the response, which ends the stream with the error
        queue.put_nowait(("error", exc))


async def stream_request(
    request_id: str, last_id: int, log: EventLog, store: StateStore, watch: StatusWatch
) -> AsyncIterator[str]:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    seq = _Sequencer(request_id, last_id)
    with watch.subscribe(request_id, queue):
        pump = asyncio.create_task(_pump_chunks(log, request_id, queue))
        try:
            view = await read_view(store, request_id)
            if view is not None:
                for frame in seq.on_view(view):
                    yield frame
            while not seq.done:
                try:
                    kind, item = await asyncio.wait_for(queue.get(), timeout=KEEPALIVE_SECONDS)
                except TimeoutError:
                    # Also a safety net for a missed watch notification: re-read the view.
                    view = await read_view(store, request_id)
                    frames = seq.on_view(view) if view else []
                    for frame in frames or [": keepalive\n\n"]:
                        yield frame
                    continue
                if kind == "error":
                    raise item
                frames = seq.on_view(item) if kind == "view" else seq.on_chunk(item)
                for frame in frames:
                    yield frame
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
