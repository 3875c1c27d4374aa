"""Per-tenant token limits: tokens per minute, counted from the usage ledger as requests finish.

Every gateway watches the ledger (one record per request, written once by finalize, so a retried
or redelivered request counts once) and keeps each tenant's tokens of the last minute. A tenant at
its limit is refused (429 ``token_limit``, with the seconds until enough of its tokens are a minute
old) before its request reaches the log. The tokens counted are those used, prompt and completion,
not those asked for: requests already in flight when a tenant reaches its limit still finish and
count, so a burst may pass the limit by what it had in flight. A gateway counts what finished since
it started.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping

import orjson

from conveyor.store.base import Namespace, StateStore

logger = logging.getLogger("conveyor.gateway")


class TokenQuota:
    def __init__(
        self,
        store: StateStore,
        *,
        default: int | None = None,
        tenants: Mapping[str, int] | None = None,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store, self._default = store, default
        self._tenants = tenants if tenants is not None else {}  # a live view of a keys file's, maybe
        self._window, self._clock = window, clock
        self._used: dict[str, collections.deque[tuple[float, int]]] = {}
        self._sums: collections.Counter[str] = collections.Counter()

    def limit(self, tenant: str) -> int | None:
        """The tenant's tokens per minute (its own, else the default; None: no limit)."""
        return self._tenants.get(tenant, self._default)

    def used(self, tenant: str) -> int:
        """The tenant's tokens counted in the last minute."""
        self._expire(tenant, self._clock())
        return self._sums[tenant]

    def wait(self, tenant: str) -> float:
        """Seconds until ``tenant`` is under its limit again (0: it is)."""
        limit = self.limit(tenant)
        if limit is None or self.used(tenant) < limit:
            return 0.0
        over = self._sums[tenant] - limit
        for at, tokens in self._used[tenant]:  # the oldest first: when enough of them are gone
            over -= tokens
            if over < 0:
                return max(0.0, at + self._window - self._clock())
        return self._window  # not reached: every entry is needed

    def add(self, tenant: str, tokens: int) -> None:
        if self.limit(tenant) is None or tokens <= 0:
            return
        now = self._clock()
        self._used.setdefault(tenant, collections.deque()).append((now, tokens))
        self._sums[tenant] += tokens
        self._expire(tenant, now)

    def _expire(self, tenant: str, now: float) -> None:
        used = self._used.get(tenant)
        while used and used[0][0] <= now - self._window:
            self._sums[tenant] -= used.popleft()[1]

    async def run(self) -> None:
        """Count every record written to the usage ledger from now on, until cancelled."""
        while True:
            try:
                async for _, value in self._store.watch(Namespace.USAGE):
                    record = orjson.loads(value)
                    tokens = int(record.get("prompt_tokens", 0)) + int(record.get("completion_tokens", 0))
                    self.add(str(record.get("tenant", "default")), tokens)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("usage ledger watch failed; restarting it")
                await asyncio.sleep(0.5)
