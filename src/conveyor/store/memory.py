"""An in-process StateStore for unit tests and the stage harness."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from conveyor.store.base import Entry, Namespace


class MemoryStateStore:
    """Every namespace a dict; revisions from one counter; watchers get every write."""

    def __init__(self) -> None:
        self._data: dict[tuple[Namespace, str], Entry] = {}
        self._revision = 0
        self._watchers: dict[Namespace, list[asyncio.Queue[tuple[str, bytes]]]] = {}

    def _write(self, ns: Namespace, key: str, value: bytes) -> int:
        self._revision += 1
        self._data[(ns, key)] = Entry(value, self._revision)
        for queue in self._watchers.get(ns, []):
            queue.put_nowait((key, value))
        return self._revision

    async def get(self, ns: Namespace, key: str) -> Entry | None:
        return self._data.get((ns, key))

    async def put(self, ns: Namespace, key: str, value: bytes) -> int:
        return self._write(ns, key, value)

    async def create(self, ns: Namespace, key: str, value: bytes) -> int | None:
        if (ns, key) in self._data:
            return None
        return self._write(ns, key, value)

    async def update(self, ns: Namespace, key: str, value: bytes, revision: int) -> int | None:
        current = self._data.get((ns, key))
        if current is None or current.revision != revision:
            return None
        return self._write(ns, key, value)

    async def delete(self, ns: Namespace, key: str) -> None:
        self._data.pop((ns, key), None)

    async def keys(self, ns: Namespace) -> list[str]:
        return [k for (n, k) in self._data if n == ns]

    async def watch(self, ns: Namespace) -> AsyncIterator[tuple[str, bytes]]:
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._watchers.setdefault(ns, []).append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers[ns].remove(queue)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
