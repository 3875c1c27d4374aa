"""What the Redis store promises beyond the shared contract: its TTLs, its errors, its URL."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from conveyor.backends import open_store
from conveyor.embedded import free_port
from conveyor.errors import MissingExtraError, UnavailableError
from conveyor.store.base import TTL, Namespace
from conveyor.store.redis import RedisStateStore
from conveyor.testing.servers import start_valkey
from tests.conformance.test_state_store import watching
from tests.conftest import unique_prefix


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    """A plain client, to look at what the store wrote."""
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStateStore]:
    store = await RedisStateStore.open(redis_url, prefix=unique_prefix())
    try:
        yield store
    finally:
        await store.delete_all()
        await store.close()


@pytest.mark.parametrize("ns", list(Namespace))
async def test_every_write_restarts_the_namespace_ttl(
    ns: Namespace, redis_store: RedisStateStore, raw: Redis
) -> None:
    name = f"{redis_store.prefix}:{ns.value}:k"
    full_ms = int(TTL[ns] * 1000)

    async def assert_full_ttl() -> None:
        pttl = await raw.pttl(name)
        if full_ms == 0:
            assert pttl == -1  # kept forever
        else:
            assert full_ms - 60_000 < pttl <= full_ms

    rev = await redis_store.create(ns, "k", b"1")
    assert rev is not None
    await assert_full_ttl()
    if full_ms:
        await raw.pexpire(name, 5_000)  # as if the key had aged since its last write
    assert await redis_store.update(ns, "k", b"2", rev) is not None
    await assert_full_ttl()
    if full_ms:
        await raw.pexpire(name, 5_000)
    await redis_store.put(ns, "k", b"3")
    await assert_full_ttl()


async def test_the_revision_counter_never_expires(redis_store: RedisStateStore, raw: Redis) -> None:
    await redis_store.put(Namespace.IDEMPOTENCY, "k", b"1")
    assert await raw.pttl(f"{redis_store.prefix}:revision") == -1


async def test_delete_all_leaves_other_prefixes_alone(redis_url: str, redis_store: RedisStateStore) -> None:
    other = await RedisStateStore.open(redis_url, prefix=redis_store.prefix + "x")
    try:
        await other.put(Namespace.USAGE, "kept", b"1")
        await redis_store.put(Namespace.USAGE, "gone", b"1")
        await redis_store.delete_all()
        assert await redis_store.keys(Namespace.USAGE) == []
        assert await other.keys(Namespace.USAGE) == ["kept"]
    finally:
        await other.delete_all()
        await other.close()


async def test_glob_characters_in_the_prefix_match_only_themselves(redis_url: str) -> None:
    base = unique_prefix()
    # Unescaped, the pattern of prefix "t…?" would also match the keys of prefix "t…x".
    stores = [await RedisStateStore.open(redis_url, prefix=base + suffix) for suffix in ("?", "x")]
    try:
        for store in stores:
            await store.put(Namespace.DEDUPE, store.prefix, b"1")
        assert [await store.keys(Namespace.DEDUPE) for store in stores] == [[base + "?"], [base + "x"]]
    finally:
        for store in stores:
            await store.delete_all()
            await store.close()


async def test_open_store_takes_redis_urls(redis_url: str) -> None:
    store = await open_store(redis_url, prefix=unique_prefix())
    try:
        assert isinstance(store, RedisStateStore)
        await store.ping()
    finally:
        await store.close()


async def test_an_unreachable_server_is_unavailable() -> None:
    store = await RedisStateStore.open(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(UnavailableError):
            await store.ping()
        with pytest.raises(UnavailableError):
            await store.get(Namespace.STATUS, "k")
    finally:
        await store.close()


async def test_a_lost_server_ends_the_watch_with_unavailable() -> None:
    server = await asyncio.to_thread(start_valkey)
    store = await RedisStateStore.open(server.url)
    try:
        async with watching(store, Namespace.STATUS) as next_item:
            await asyncio.to_thread(server.stop)
            with pytest.raises(UnavailableError):
                await next_item()
        with pytest.raises(UnavailableError):
            await store.put(Namespace.STATUS, "k", b"1")
    finally:
        await store.close()
        await asyncio.to_thread(server.stop)


def test_without_the_extra_the_import_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)  # what a missing package looks like
    monkeypatch.delitem(sys.modules, "conveyor.store.redis")
    with pytest.raises(MissingExtraError, match=r"conveyor\[redis\]"):
        importlib.import_module("conveyor.store.redis")
