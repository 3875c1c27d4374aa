"""The StateStore contract, run against every backend (memory and real NATS key-value)."""

from __future__ import annotations

import asyncio

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


async def test_watch_sees_writes_made_after_it_started(store: StateStore) -> None:
    await store.put(Namespace.STATUS, "before", b"0")
    seen: list[tuple[str, bytes]] = []
    started = asyncio.Event()

    async def watch() -> None:
        updates = store.watch(Namespace.STATUS)
        started.set()
        async for item in updates:
            seen.append(item)
            if len(seen) == 2:
                return

    task = asyncio.create_task(watch())
    await started.wait()
    # The watch subscribes on its first iteration; writes go on until it has seen them.
    async with asyncio.timeout(10):
        while not task.done():
            await store.put(Namespace.STATUS, "after", b"1")
            await asyncio.wait({task}, timeout=0.05)
    assert seen[0] == ("after", b"1")
    assert ("before", b"0") not in seen
