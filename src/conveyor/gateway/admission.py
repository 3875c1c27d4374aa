"""Lag-based admission control: refuse new submits while the pipeline's intake is too far behind.

The backlog is what the ``prepare`` consumer group has not yet acknowledged on the
``requests`` topic (pending plus in flight, summed over partitions on a partitioned log). It
is read from ``EventLog.lag()`` by a background task, never on a request's path, so a slow
or unreachable log does not slow submits down; while it cannot be read, submits are admitted
(the publish itself then says whether the log takes them).
"""

from __future__ import annotations

import asyncio
import logging

from conveyor.events import Topic
from conveyor.log.base import EventLog
from conveyor.observability.metrics import ADMISSION_BACKLOG, ADMISSION_OVERLOADED

logger = logging.getLogger("conveyor.gateway")

GROUP = "prepare"  # the first stage: what it has not taken in yet is the pipeline's queue
# Kafka's lag reads every partition's watermarks, which can take seconds on a busy cluster.
_LAG_TIMEOUT = 10.0


class Admission:
    def __init__(self, log: EventLog, *, max_backlog: int, interval: float = 0.5) -> None:
        self._log, self.max_backlog, self.interval = log, max_backlog, interval
        self.backlog: int | None = None  # None: not known (no prepare group yet, or the log failed)
        self._failing = False

    @property
    def overloaded(self) -> bool:
        return self.backlog is not None and self.backlog > self.max_backlog

    async def refresh(self) -> None:
        """Read the backlog once."""
        try:
            async with asyncio.timeout(_LAG_TIMEOUT):
                lags = [
                    lag for lag in await self._log.lag() if lag.topic == Topic.REQUESTS and lag.group == GROUP
                ]
        except Exception as exc:
            if not self._failing:
                logger.warning("admission control cannot read the backlog, admitting everything: %r", exc)
            self._failing, self.backlog = True, None
        else:
            if self._failing:
                logger.warning("admission control reads the backlog again")
            self._failing = False
            # A log where prepare never subscribed has no such group: nothing is known to be behind.
            self.backlog = sum(lag.pending + lag.in_flight for lag in lags) if lags else None
        ADMISSION_BACKLOG.set(float(self.backlog or 0))
        ADMISSION_OVERLOADED.set(1.0 if self.overloaded else 0.0)

    async def run(self) -> None:
        """Refresh every ``interval`` seconds until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)
