"""A batch's progress as the projector records it, and what reading a batch costs."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from conveyor.batch_progress import PAGE, ProgressMarks, line_tag, read_progress
from conveyor.events import Topic
from conveyor.files import Files, dumps
from conveyor.gateway.batch_api import BatchCreate, Batches
from conveyor.gateway.core import GatewayCore, GatewayLimits
from conveyor.payloads import CancelRequested, EventType, RequestCompleted
from conveyor.projector import Projector
from conveyor.store.base import Entry, Namespace
from conveyor.testing import MemoryEventLog, MemoryStateStore
from tests.unit.test_batch_api import chat_line


class CountingStore(MemoryStateStore):
    """Counts reads and writes per namespace; each lets other tasks run first, as a server's
    round trip does."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter[Namespace] = collections.Counter()
        self.writes: collections.Counter[Namespace] = collections.Counter()

    async def get(self, ns: Namespace, key: str) -> Entry | None:
        self.reads[ns] += 1
        await asyncio.sleep(0)
        return await super().get(ns, key)

    async def create(self, ns: Namespace, key: str, value: bytes) -> int | None:
        self.writes[ns] += 1
        await asyncio.sleep(0)
        return await super().create(ns, key, value)

    async def update(self, ns: Namespace, key: str, value: bytes, revision: int) -> int | None:
        self.writes[ns] += 1
        await asyncio.sleep(0)
        return await super().update(ns, key, value, revision)


async def test_marks_count_each_line_once_and_a_failed_line_that_completes_moves_over() -> None:
    store, marks = MemoryStateStore(), ProgressMarks()
    total = PAGE + 10  # two records
    for line in (0, 1, 2, PAGE + 3):
        await marks.mark(store, line_tag("batch_a", line), completed=line != 1)
    await marks.mark(store, line_tag("batch_a", 2), completed=True)  # a redelivery
    progress = await read_progress(store, "batch_a", total)
    assert (progress.ended, progress.completed, progress.failed) == (4, 3, 1)
    assert progress.first_running == 3
    assert progress.running() == [line for line in range(total) if line not in (0, 1, 2, PAGE + 3)]

    # Line 1 failed, was sent back from the dead-letter topic and completed; another projector
    # (its own marks, nothing cached) records it.
    await ProgressMarks().mark(store, line_tag("batch_a", 1), completed=True)
    progress = await read_progress(store, "batch_a", total)
    assert (progress.ended, progress.completed, progress.failed) == (4, 4, 0)
    # Another batch's lines are its own.
    assert (await read_progress(store, "batch_b", total)).ended == 0

    for line in range(total):
        await marks.mark(store, line_tag("batch_a", line), completed=False)
    progress = await read_progress(store, "batch_a", total)
    assert (progress.ended, progress.completed, progress.first_running, progress.running()) == (
        total,
        4,
        None,
        [],
    )


async def test_marks_arriving_together_are_written_together_and_two_projectors_lose_none() -> None:
    store = CountingStore()
    one, two = ProgressMarks(), ProgressMarks()
    # Two projectors marking the same record at once: their compare-and-sets collide, and the
    # loser reads the record again and adds its marks.
    await asyncio.gather(
        *(
            (one if line % 2 else two).mark(store, line_tag("batch_a", line), completed=line % 3 == 0)
            for line in range(200)
        )
    )
    progress = await read_progress(store, "batch_a", 200)
    assert (progress.ended, progress.completed) == (200, len(range(0, 200, 3)))
    # Each projector wrote its marks in a few writes, not one per line.
    assert store.writes[Namespace.BATCHES] < 20


async def test_reading_a_batch_reads_its_progress_records_not_every_line() -> None:
    log, store = MemoryEventLog(), CountingStore()
    core = GatewayCore(log, store, models=["simulated"])
    files = Files(store)
    total = 3 * PAGE
    stored = await files.save(
        "default", "in.jsonl", "batch", dumps([chat_line(f"n{i}", "hi") for i in range(total)])
    )
    asked = BatchCreate(input_file_id=stored.id, endpoint="/v1/chat/completions", completion_window="24h")
    batches = Batches(core, files, ["simulated"], GatewayLimits())
    batch = await batches.create(asked, "default")
    accepted = log.events(Topic.REQUESTS)
    assert [e.batch for e in accepted[:2]] == [line_tag(batch.id, 0), line_tag(batch.id, 1)]

    # The projector folds what the pipeline would send: some lines completed, some cancelled.
    projector = Projector()
    ended: dict[int, Any] = {}
    for line in range(0, total, 3):
        first = accepted[line]
        if line % 2:
            outcome = first.derive(
                type=EventType.CANCEL, source="gw", payload=CancelRequested(), label="cancel"
            )
        else:
            done = RequestCompleted(output="ok", streamed_chars=2)
            outcome = first.derive(type=EventType.COMPLETED, source="t", payload=done, label="finalize")
        await projector.apply(store, [first, outcome])
        ended[line] = outcome.type
    completed = sum(1 for kind in ended.values() if kind == EventType.COMPLETED)

    store.reads.clear()
    found = await batches.get(batch.id, "default")
    assert found is not None
    current = await batches.current(*found)
    assert current["status"] == "in_progress"
    counts = current["request_counts"]
    assert (counts["total"], counts["completed"], counts["failed"]) == (
        total,
        completed,
        len(ended) - completed,
    )
    # The batch's record and one progress record per PAGE lines; no line's view.
    assert store.reads == {Namespace.BATCHES: 1 + 3}

    # Cancelling it cancels the lines still running, and only those.
    await batches.cancel(*found)
    cancels = {e.request_id for e in log.events(Topic.CONTROL)}
    assert cancels == {batch.request_id(line) for line in range(total) if line not in ended}
