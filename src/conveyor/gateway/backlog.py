"""The pipeline's backlogs as the gateway sees them: what each consumer group has not acknowledged
on each topic (pending plus in flight, summed over partitions on a partitioned log).

They are read from ``EventLog.lag()`` by a background task, never on a request's path, so a slow or
unreachable log does not slow submits down; while they cannot be read, none is known. Admission
control reads prepare's (``admission.py``); routing an alias by backlog reads each model's generate
stage's (``GatewayCore.route``).
"""

from __future__ import annotations

import asyncio
import logging

from conveyor.log.base import EventLog

logger = logging.getLogger("conveyor.gateway")

# Kafka's lag reads every partition's watermarks, which can take seconds on a busy cluster.
_LAG_TIMEOUT = 10.0


class Backlogs:
    def __init__(self, log: EventLog, *, interval: float = 0.5) -> None:
        self._log, self.interval = log, interval
        self._by_group: dict[tuple[str, str], int] | None = None  # None: the log could not be read
        self._failing = False

    def of(self, topic: str, group: str) -> int | None:
        """``group``'s backlog on ``topic``; None if not known (no such group, or no log)."""
        return None if self._by_group is None else self._by_group.get((topic, group))

    async def refresh(self) -> None:
        """Read every backlog once."""
        try:
            async with asyncio.timeout(_LAG_TIMEOUT):
                lags = await self._log.lag()
        except Exception as exc:
            if not self._failing:
                logger.warning("the log's backlogs cannot be read, none is known: %r", exc)
            self._failing, self._by_group = True, None
            return
        if self._failing:
            logger.warning("the log's backlogs are read again")
        self._failing = False
        by_group: dict[tuple[str, str], int] = {}
        for lag in lags:
            key = (lag.topic, lag.group)
            by_group[key] = by_group.get(key, 0) + lag.pending + lag.in_flight
        self._by_group = by_group

    async def run(self) -> None:
        """Refresh every ``interval`` seconds until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)
