"""Admission control reads prepare's backlog on the requests topic from the log's lag."""

from __future__ import annotations

import pytest

from conveyor.errors import UnavailableError
from conveyor.events import Topic, new_event
from conveyor.gateway.admission import Admission
from conveyor.gateway.backlog import Backlogs
from conveyor.log.base import Lag
from conveyor.log.memory import MemoryEventLog
from conveyor.observability.metrics import ADMISSION_BACKLOG, ADMISSION_OVERLOADED
from conveyor.payloads import EventType, RequestAccepted


async def publish_requests(log: MemoryEventLog, count: int) -> None:
    events = [
        new_event(type=EventType.ACCEPTED, source="test", payload=RequestAccepted(prompt=f"p{i}"))
        for i in range(count)
    ]
    await log.publish(Topic.REQUESTS, events)


async def test_over_the_limit_means_more_than_max_backlog_not_yet_acknowledged_by_prepare() -> None:
    log = MemoryEventLog()
    intake = await log.subscribe(Topic.REQUESTS, "prepare")
    await log.subscribe(Topic.REQUESTS, "audit")  # another group's backlog does not count
    admission = Admission(Backlogs(log), max_backlog=3)
    await publish_requests(log, 3)
    await admission.refresh()
    assert (admission.backlog, admission.overloaded) == (3, False)
    assert (ADMISSION_BACKLOG.value(), ADMISSION_OVERLOADED.value()) == (3.0, 0.0)
    await publish_requests(log, 1)
    delivered = await intake.fetch(2, timeout=1)  # taken but not acknowledged: still behind
    await admission.refresh()
    assert (admission.backlog, admission.overloaded) == (4, True)
    assert ADMISSION_OVERLOADED.value() == 1.0
    for delivery in delivered:
        await delivery.ack()
    await admission.refresh()
    assert (admission.backlog, admission.overloaded) == (2, False)
    assert ADMISSION_OVERLOADED.value() == 0.0


async def test_without_a_prepare_group_nothing_is_known_to_be_behind() -> None:
    log = MemoryEventLog()
    await publish_requests(log, 10)
    admission = Admission(Backlogs(log), max_backlog=0)
    await admission.refresh()
    assert (admission.backlog, admission.overloaded) == (None, False)


class _Partitioned(MemoryEventLog):
    """Lag as Kafka reports it: one entry per partition."""

    def __init__(self, lags: list[Lag] | Exception) -> None:
        super().__init__()
        self.lags = lags

    async def lag(self) -> list[Lag]:
        if isinstance(self.lags, Exception):
            raise self.lags
        return self.lags


async def test_a_partitioned_logs_backlog_is_the_sum_over_partitions() -> None:
    lags = [Lag("requests", "prepare", 4, 1, partition=p) for p in range(3)]
    lags.append(Lag("prepared", "generate", 100, 0, partition=0))
    admission = Admission(Backlogs(_Partitioned(lags)), max_backlog=14)
    await admission.refresh()
    assert (admission.backlog, admission.overloaded) == (15, True)


async def test_while_the_backlog_cannot_be_read_submits_are_admitted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = _Partitioned([Lag("requests", "prepare", 50, 0)])
    admission = Admission(Backlogs(log), max_backlog=10)
    await admission.refresh()
    assert admission.overloaded
    log.lags = UnavailableError("the log is down")
    await admission.refresh()
    await admission.refresh()
    assert (admission.backlog, admission.overloaded) == (None, False)
    assert ADMISSION_OVERLOADED.value() == 0.0
    assert [r.getMessage() for r in caplog.records].count(
        "the log's backlogs cannot be read, none is known: UnavailableError('the log is down')"
    ) == 1  # said once, not every half second
