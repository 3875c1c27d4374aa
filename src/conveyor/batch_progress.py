"""A batch's progress: which of its lines ended, and which of those completed (a projection).

The projector marks a Batch API request's line when the request's view ends; the Batch API
reads the batch's few progress records instead of every line's view, so reading a batch of
50,000 lines costs 49 store reads, not 50,000, however often it is polled. A record holds
``PAGE`` lines as two bitmaps (ended, completed). Setting a bit is idempotent and bits are
never cleared, so a redelivered event marks its line once, a second projector can write beside
the first (each write is a compare-and-set), and a line that failed and then completed (sent
back from the dead-letter topic) moves from failed to completed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses

from conveyor.store.base import Entry, Namespace, StateStore

PAGE = 1024  # lines per progress record
_HALF = PAGE // 8  # bytes of one bitmap
NAMESPACE = Namespace.BATCHES  # beside the batch's own record, as ``<batch id>.<page>``


def line_tag(batch_id: str, line: int) -> str:
    """What a batch line's request carries (``Envelope.batch``) so the projector can mark it."""
    return f"{batch_id}/{line}"


def _key(batch_id: str, page: int) -> str:
    return f"{batch_id}.{page}"


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """How far a batch of ``total`` lines is: ``ended`` and ``completed`` are bitmaps (bit i is
    line i)."""

    total: int
    ended_bits: int
    completed_bits: int

    @property
    def ended(self) -> int:
        return self.ended_bits.bit_count()

    @property
    def completed(self) -> int:
        return (self.completed_bits & self.ended_bits).bit_count()

    @property
    def failed(self) -> int:
        """Ended otherwise: failed, refused or cancelled."""
        return self.ended - self.completed

    @property
    def first_running(self) -> int | None:
        """The first line not ended yet; None once every line has."""
        if self.ended == self.total:
            return None
        return (~self.ended_bits & (self.ended_bits + 1)).bit_length() - 1

    def running(self) -> list[int]:
        """The lines not ended yet, in order."""
        bits = format(self.ended_bits, f"0{self.total}b")[::-1] if self.total else ""
        return [line for line, bit in enumerate(bits) if bit == "0"]


async def read_progress(store: StateStore, batch_id: str, total: int) -> Progress:
    pages = await asyncio.gather(
        *(store.get(NAMESPACE, _key(batch_id, page)) for page in range(-(-total // PAGE)))
    )
    ended = completed = 0
    for page, entry in enumerate(pages):
        if entry is not None:
            shift = page * PAGE
            ended |= int.from_bytes(entry.value[:_HALF], "little") << shift
            completed |= int.from_bytes(entry.value[_HALF:], "little") << shift
    whole = (1 << total) - 1
    return Progress(total, ended & whole, completed & whole)


class ProgressMarks:
    """The projector's writer. Marks for the same record that arrive while one is being written
    are written together next, in one compare-and-set; ``mark`` returns once its line's mark is
    stored (so the event that ended the line is acknowledged only then)."""

    def __init__(self, *, cache_size: int = 256) -> None:
        self._pending: dict[str, dict[int, bool]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # The records this projector wrote last, with their revisions: no read before a write.
        self._known: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self._cache_size = cache_size

    async def mark(self, store: StateStore, tag: str, *, completed: bool) -> None:
        batch_id, _, line = tag.rpartition("/")
        page, bit = divmod(int(line), PAGE)
        key = _key(batch_id, page)
        pending = self._pending.setdefault(key, {})
        pending[bit] = pending.get(bit, False) or completed
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            marks = self._pending.pop(key, None)
            if marks:  # else the write before this one took this mark with its own
                try:
                    await self._write(store, key, marks)
                except BaseException:
                    for b, done in marks.items():  # for the next writer (this event is retried)
                        self._pending.setdefault(key, {})[b] = self._pending[key].get(b, False) or done
                    raise
        if key not in self._pending and not lock.locked():
            # Only saves memory: were a writer still to come, two locks would race, and the
            # compare-and-set would make the loser read and write again.
            self._locks.pop(key, None)

    async def _write(self, store: StateStore, key: str, marks: dict[int, bool]) -> None:
        while True:
            entry = self._known.pop(key, None) or await store.get(NAMESPACE, key)
            value = bytearray(entry.value if entry is not None else bytes(2 * _HALF))
            for bit, completed in marks.items():
                value[bit // 8] |= 1 << bit % 8
                if completed:
                    value[_HALF + bit // 8] |= 1 << bit % 8
            if entry is not None and value == entry.value:
                self._remember(key, entry)
                return
            if entry is None:
                revision = await store.create(NAMESPACE, key, bytes(value))
            else:
                revision = await store.update(NAMESPACE, key, bytes(value), entry.revision)
            if revision is not None:
                self._remember(key, Entry(bytes(value), revision))
                return
            # Another projector wrote it first: read it again and add these marks to its.

    def _remember(self, key: str, entry: Entry) -> None:
        self._known[key] = entry
        while len(self._known) > self._cache_size:
            self._known.popitem(last=False)
