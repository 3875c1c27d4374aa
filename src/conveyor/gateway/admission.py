"""Lag-based admission control: refuse new submits while the pipeline's intake is too far behind.

The backlog is what the ``prepare`` consumer group has not yet acknowledged on the ``requests``
topic (``backlog.py``). While it cannot be read, submits are admitted (the publish itself then
says whether the log takes them).
"""

from __future__ import annotations

import asyncio

from conveyor.events import Topic
from conveyor.gateway.backlog import Backlogs
from conveyor.observability.metrics import ADMISSION_BACKLOG, ADMISSION_OVERLOADED

GROUP = "prepare"  # the first stage: what it has not taken in yet is the pipeline's queue


class Admission:
    """Reads ``backlogs`` (which routing by backlog may read too) and refreshes them."""

    def __init__(self, backlogs: Backlogs, *, max_backlog: int) -> None:
        self.backlogs, self.max_backlog = backlogs, max_backlog

    @property
    def interval(self) -> float:
        return self.backlogs.interval

    @property
    def backlog(self) -> int | None:
        """None: not known (no prepare group yet, or the log failed)."""
        return self.backlogs.of(Topic.REQUESTS, GROUP)

    @property
    def overloaded(self) -> bool:
        return self.backlog is not None and self.backlog > self.max_backlog

    async def refresh(self) -> None:
        """Read the backlogs once."""
        await self.backlogs.refresh()
        ADMISSION_BACKLOG.set(float(self.backlog or 0))
        ADMISSION_OVERLOADED.set(1.0 if self.overloaded else 0.0)

    async def run(self) -> None:
        """Refresh every ``interval`` seconds until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)
