"""How many requests a tenant may have under way at once (``--max-parallel``, or ``parallel=N``
for a tenant in the API keys file).

The log hands requests to the stages in the order they came, so a tenant that submits thousands
at once stands in front of everyone who comes after (and admission control, which looks at the
whole backlog, then refuses the others too). A tenant at its limit is refused (429
``parallel_limit``) until one of its requests ends: no tenant holds more than that many places of
the backlog, and another tenant's request waits behind at most that many of each.

Each gateway counts the requests it accepted and has not seen end: its status watch, which every
gateway runs, tells of every view written. With several gateways, a tenant may have that many
under way through each. An end the watch missed (a watch restarting) is found by reading the
views of requests under way for longer than ``RECHECK`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import orjson

from conveyor.projector import read_view
from conveyor.store.base import StateStore
from conveyor.view import TERMINAL

RECHECK = 30.0


class ParallelLimit:
    def __init__(self, store: StateStore, *, default: int | None, tenants: Mapping[str, int]) -> None:
        self._store = store
        self._default, self._tenants = default, tenants  # a live view of a keys file's, maybe
        self._under_way: dict[str, dict[str, float]] = {}  # tenant -> request id -> since (monotonic)
        self._tenant_of: dict[str, str] = {}

    def limit(self, tenant: str) -> int | None:
        return self._tenants.get(tenant, self._default)

    def under_way(self, tenant: str) -> int:
        return len(self._under_way.get(tenant, ()))

    def reserve(self, tenant: str, rid: str) -> bool:
        """Count ``rid`` as under way, unless ``tenant`` is at its limit (False)."""
        limit = self.limit(tenant)
        requests = self._under_way.setdefault(tenant, {})
        if limit is not None and len(requests) >= limit:
            return False
        requests[rid] = time.monotonic()
        self._tenant_of[rid] = tenant
        return True

    def release(self, rid: str) -> None:
        """``rid`` ended, or was never put on the log."""
        tenant = self._tenant_of.pop(rid, None)
        if tenant is not None:
            requests = self._under_way[tenant]
            requests.pop(rid, None)
            if not requests:
                del self._under_way[tenant]

    def seen(self, rid: str, view: bytes) -> None:
        """A view was written (the status watch): if it is one of ours and it ended, release it."""
        if rid in self._tenant_of and orjson.loads(view).get("status") in TERMINAL:
            self.release(rid)

    async def run(self) -> None:
        """Release the requests that ended unseen."""
        while True:
            await asyncio.sleep(RECHECK / 2)
            old = time.monotonic() - RECHECK
            stale = [rid for requests in self._under_way.values() for rid, t in requests.items() if t < old]
            for rid in stale:
                view = await read_view(self._store, rid)
                if view is not None and view.terminal:
                    self.release(rid)
