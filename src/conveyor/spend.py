"""What each tenant spent this month, at the models' prices: the counter budgets are held to.

finalize adds each request's cost (``conveyor.usage.Price``) to its tenant's counter for the
calendar month (UTC) when it writes the request's usage record, and only then: the record is
written once, so a redelivered generation adds nothing. The counter is a limit's measure, not the
bill: a worker that dies between the two writes leaves one request's cost out of it (the ledger
and ``conveyor usage`` stay exact). The gateway reads it on each submit of a tenant that has a
budget (``--budget``, ``budget=USD`` in the keys file), and refuses the submit once it is spent.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import orjson

from conveyor.store.base import Entry, Namespace, StateStore


def month(at: datetime.datetime) -> str:
    return at.astimezone(datetime.UTC).strftime("%Y-%m")


def next_month(at: datetime.datetime) -> datetime.datetime:
    """When the month of ``at`` (UTC) ends, and its budgets start over."""
    first = at.astimezone(datetime.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + datetime.timedelta(days=32)).replace(day=1)


def _key(tenant: str, at: datetime.datetime) -> str:
    return f"{tenant}.{month(at)}"


def _usd(entry: Entry | None) -> float:
    return float(orjson.loads(entry.value)["usd"]) if entry else 0.0


async def spent(store: StateStore, tenant: str, at: datetime.datetime) -> float:
    """USD ``tenant`` spent in the month of ``at``."""
    return _usd(await store.get(Namespace.SPEND, _key(tenant, at)))


async def add(store: StateStore, tenant: str, usd: float, at: datetime.datetime) -> None:
    """Add ``usd`` to what ``tenant`` spent in the month of ``at`` (compare-and-set)."""
    key = _key(tenant, at)
    while True:
        entry = await store.get(Namespace.SPEND, key)
        value = orjson.dumps({"usd": _usd(entry) + usd})
        if entry is None:
            if await store.create(Namespace.SPEND, key, value) is not None:
                return
        elif await store.update(Namespace.SPEND, key, value, entry.revision) is not None:
            return


class Budgets:
    """The tenants' monthly budgets in USD: ``default`` for every tenant without its own."""

    def __init__(self, store: StateStore, *, default: float | None, tenants: Mapping[str, float]) -> None:
        self._store, self._default = store, default
        self._tenants = tenants  # a live view of a keys file's, maybe

    def budget(self, tenant: str) -> float | None:
        return self._tenants.get(tenant, self._default)

    async def spent(self, tenant: str, now: datetime.datetime) -> float | None:
        """What ``tenant`` spent this month if that is its whole budget or more, else None."""
        budget = self.budget(tenant)
        if budget is None:
            return None
        used = await spent(self._store, tenant, now)
        return used if used >= budget else None
