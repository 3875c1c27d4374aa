"""Fan-out of status-view changes to the requests waiting on them (long-poll, SSE).

One store watch per gateway process; each waiter registers a queue for one
request id and gets every new view of that request as it is written. ``on_write``, if
given, is told of every view written (the tenants' parallel limit follows ends with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from conveyor.store.base import Namespace, StateStore
from conveyor.view import RequestView

logger = logging.getLogger("conveyor.gateway")


class StatusWatch:
    def __init__(self, store: StateStore, *, on_write: Callable[[str, bytes], None] | None = None) -> None:
        self._store = store
        self._on_write = on_write
        self._waiters: dict[str, set[asyncio.Queue[Any]]] = {}

    @contextlib.contextmanager
    def subscribe(self, request_id: str, queue: asyncio.Queue[Any]) -> Iterator[None]:
        """Put ``("view", RequestView)`` on ``queue`` for every change while inside."""
        self._waiters.setdefault(request_id, set()).add(queue)
        try:
            yield
        finally:
            waiters = self._waiters.get(request_id)
            if waiters is not None:
                waiters.discard(queue)
                if not waiters:
                    del self._waiters[request_id]

    async def run(self) -> None:
        while True:
            try:
                async for key, value in self._store.watch(Namespace.STATUS):
                    if self._on_write is not None:
                        self._on_write(key, value)
                    waiters = self._waiters.get(key)
                    if not waiters:
                        continue  # nobody waits: skip the parse
                    view = RequestView.model_validate_json(value)
                    for queue in waiters:
                        queue.put_nowait(("view", view))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("status watch failed; restarting it")
                await asyncio.sleep(0.5)
