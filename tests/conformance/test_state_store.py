"""The StateStore contract, run against every backend (memory and real NATS key-value)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from conveyor.store.base import Namespace, StateStore


async def test_put_get_and_growing_revisions(store: StateStore) -> None:
    assert await store.get(Namespace.STATUS, "r1") is None
    first = await store.put(Namespace.STATUS, "r1", b"one")
    second = await store.put(Namespace.STATUS, "r1", b"two")
    assert second > first
    entry = await store.get(Namespace.STATUS, "r1")
    assert entry is not None
    assert (entry.value, entry.revision) == (b"two", second)


async def test_namespaces_are_separate(store: StateStore) -> None:
    await store.put(Namespace.STATUS, "same", b"status")
    assert await store.get(Namespace.USAGE, "same") is None


async def test_create_writes_only_once_even_when_racing(store: StateStore) -> None:
    results = await asyncio.gather(
        *(store.create(Namespace.USAGE, "req", f"{i}".encode()) for i in range(10))
    )
    winners = [i for i, r in enumerate(results) if r is not None]
    assert len(winners) == 1
    entry = await store.get(Namespace.USAGE, "req")
    assert entry is not None
    assert entry.value == f"{winners[0]}".encode()


async def test_update_is_compare_and_set(store: StateStore) -> None:
    rev = await store.create(Namespace.STATUS, "r", b"a")
    assert rev is not None
    newer = await store.update(Namespace.STATUS, "r", b"b", rev)
    assert newer is not None
    assert await store.update(Namespace.STATUS, "r", b"stale", rev) is None
    entry = await store.get(Namespace.STATUS, "r")
    assert entry is not None
    assert entry.value == b"b"


async def test_delete_then_create_again(store: StateStore) -> None:
    await store.put(Namespace.IDEMPOTENCY, "k", b"v")
    await store.delete(Namespace.IDEMPOTENCY, "k")
    assert await store.get(Namespace.IDEMPOTENCY, "k") is None
    assert await store.create(Namespace.IDEMPOTENCY, "k", b"w") is not None


async def test_keys_lists_live_keys(store: StateStore) -> None:
    for key in ("a", "b", "c"):
        await store.put(Namespace.DEDUPE, key, b"1")
    await store.delete(Namespace.DEDUPE, "b")
    assert sorted(await store.keys(Namespace.DEDUPE)) == ["a", "c"]


async def test_delete_then_create_gets_a_newer_revision(store: StateStore) -> None:
    stale = await store.put(Namespace.STATUS, "k", b"a")
    await store.delete(Namespace.STATUS, "k")
    again = await store.create(Namespace.STATUS, "k", b"b")
    assert again is not None
    assert again > stale
    # A compare-and-set still holding the revision from before the delete must fail.
    assert await store.update(Namespace.STATUS, "k", b"stale", stale) is None


async def test_update_of_a_missing_key_writes_nothing(store: StateStore) -> None:
    assert await store.update(Namespace.STATUS, "missing", b"x", 1) is None
    assert await store.get(Namespace.STATUS, "missing") is None


async def test_values_are_bytes_exactly(store: StateStore) -> None:
    values = {"empty": b"", "binary": bytes(range(256)), "separators": b"3:a:b\n\r\n"}
    for key, value in values.items():
        await store.put(Namespace.USAGE, key, value)
    for key, value in values.items():
        entry = await store.get(Namespace.USAGE, key)
        assert entry is not None
        assert entry.value == value


async def test_keys_with_dots_slashes_and_dashes(store: StateStore) -> None:
    names = ["generate.01J9ZK", "a/b", "x-y_z=1"]
    for key in names:
        await store.put(Namespace.DEDUPE, key, b"1")
    assert sorted(await store.keys(Namespace.DEDUPE)) == sorted(names)


_LIVE = "watch-is-live"


@contextlib.asynccontextmanager
async def watching(
    store: StateStore, ns: Namespace
) -> AsyncIterator[Callable[[], Awaitable[tuple[str, bytes]]]]:
    """A live watch of ``ns``: yields the function that returns its next item."""
    items: asyncio.Queue[tuple[str, bytes] | Exception] = asyncio.Queue()
    live = asyncio.Event()

    async def pump() -> None:
        try:
            async for key, value in store.watch(ns):
                if key == _LIVE:
                    live.set()
                else:
                    items.put_nowait((key, value))
        except Exception as exc:
            items.put_nowait(exc)  # next_item raises it
            live.set()

    task = asyncio.create_task(pump())
    try:
        # The watch subscribes on its first iteration, at a moment the caller cannot see:
        # write a marker until one comes through; every later write must come through too.
        async with asyncio.timeout(10):
            while not live.is_set():
                await store.put(ns, _LIVE, b"")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(live.wait(), 0.05)

        async def next_item() -> tuple[str, bytes]:
            async with asyncio.timeout(10):
                item = await items.get()
            if isinstance(item, Exception):
                raise item
            return item

        yield next_item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_watch_sees_writes_made_after_it_started(store: StateStore) -> None:
    await store.put(Namespace.STATUS, "before", b"0")
    async with watching(store, Namespace.STATUS) as next_item:
        await store.put(Namespace.STATUS, "after", b"1")
        # Not ("before", b"0"): a watch does not replay what was written before it.
        assert await next_item() == ("after", b"1")


async def test_watch_sees_every_successful_write_and_nothing_else(store: StateStore) -> None:
    rev = await store.put(Namespace.STATUS, "k", b"0")
    async with watching(store, Namespace.STATUS) as next_item:
        assert await store.create(Namespace.STATUS, "k", b"refused") is None
        assert await store.update(Namespace.STATUS, "k", b"refused", rev + 1000) is None
        await store.delete(Namespace.STATUS, "k")
        await store.put(Namespace.USAGE, "k", b"other namespace")
        assert await store.create(Namespace.STATUS, "k", b"created") is not None
        assert await store.put(Namespace.STATUS, "k", b"put")
        entry = await store.get(Namespace.STATUS, "k")
        assert entry is not None
        assert await store.update(Namespace.STATUS, "k", b"\x00updated:", entry.revision) is not None
        seen = [await next_item() for _ in range(3)]
    assert seen == [("k", b"created"), ("k", b"put"), ("k", b"\x00updated:")]


async def test_many_more_concurrent_writes_than_connections_all_succeed(store: StateStore) -> None:
    # A stage may have hundreds of events in flight, each writing: the store queues them, it
    # does not refuse them (a pool that failed when exhausted dead-lettered requests under load).
    keys = [f"burst-{i}" for i in range(500)]
    revisions = await asyncio.gather(*(store.create(Namespace.STATUS, k, b"x") for k in keys))
    assert all(r is not None for r in revisions)
    assert set(keys) <= set(await store.keys(Namespace.STATUS))
