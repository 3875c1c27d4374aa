"""The BlobStore contract, run against every backend: memory, a directory, JetStream's object store
and S3 (moto's server)."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from conveyor.blobs.base import BlobStore
from conveyor.blobs.nats import NatsBlobStore
from conveyor.blobs.object_storage import ObjectStorageBlobs
from conveyor.embedded import free_port
from conveyor.errors import UnavailableError
from tests.conftest import unique_prefix

pytestmark = pytest.mark.timeout(60)


async def test_a_blob_reads_back_byte_for_byte(blobs: BlobStore) -> None:
    # Larger than one chunk of the object store (128 KiB) and than a NATS message (1 MB), every
    # byte value in it.
    data = random.Random(7).randbytes(3 * 1024 * 1024 + 17)
    await blobs.put("events/01JABC", data)
    assert await blobs.get("events/01JABC") == data


async def test_a_name_never_put_is_none(blobs: BlobStore) -> None:
    await blobs.put("events/present", b"x")
    assert await blobs.get("events/absent") is None
    assert await blobs.get("other/present") is None


async def test_putting_a_name_again_replaces_it(blobs: BlobStore) -> None:
    await blobs.put("events/again", b"first")
    await blobs.put("events/again", b"second, and longer")
    assert await blobs.get("events/again") == b"second, and longer"


async def test_an_empty_blob_is_not_an_absent_one(blobs: BlobStore) -> None:
    await blobs.put("events/empty", b"")
    assert await blobs.get("events/empty") == b""


async def test_concurrent_puts_of_different_names_all_land(blobs: BlobStore) -> None:
    names = [f"events/{i:03d}" for i in range(20)]
    await asyncio.gather(*(blobs.put(name, name.encode() * 1000) for name in names))
    got = await asyncio.gather(*(blobs.get(name) for name in names))
    assert got == [name.encode() * 1000 for name in names]


async def test_ping_succeeds_on_a_reachable_store(blobs: BlobStore) -> None:
    await blobs.ping()


async def test_an_unreachable_object_store_is_unavailable_not_absent() -> None:
    # Nothing listens there: a get must not pass for "never stored" (the event would be dead-lettered
    # for a lost payload, where it only has to wait for the store).
    url = f"s3://nowhere?endpoint=http://127.0.0.1:{free_port()}&region=us-east-1"
    blobs = ObjectStorageBlobs(url + "&access_key_id=a&secret_access_key=b")
    try:
        async with asyncio.timeout(30):
            with pytest.raises(UnavailableError):
                await blobs.get("events/x")
            with pytest.raises(UnavailableError):
                await blobs.put("events/x", b"x")
            with pytest.raises(UnavailableError):
                await blobs.ping()
    finally:
        await blobs.close()


async def test_a_directory_store_sweeps_blobs_older_than_its_max_age(tmp_path: Path) -> None:
    blobs = ObjectStorageBlobs(tmp_path.as_uri(), max_age=3600)
    try:
        await blobs.put("events/old", b"old")
        await blobs.put("events/new", b"new")
        day_ago = (tmp_path / "events" / "new").stat().st_mtime - 86_400
        os.utime(tmp_path / "events" / "old", (day_ago, day_ago))
        assert await blobs.sweep() == 1
        assert await blobs.get("events/old") is None
        assert await blobs.get("events/new") == b"new"
    finally:
        await blobs.close()


async def test_the_nats_store_reads_a_blob_without_making_a_consumer(nats_url: str) -> None:
    # nats-py reads an object through an ephemeral consumer, which a cluster makes by consensus:
    # every long prompt read by prepare, generate and the projector would make one.
    blobs = await NatsBlobStore.open(nats_url, prefix=unique_prefix())
    try:
        data = random.Random(5).randbytes(300_000)  # three chunks
        await blobs.put("events/long", data)
        assert await blobs.get("events/long") == data
        info = await blobs._js.stream_info(f"OBJ_{blobs.bucket}")
        assert info.state.consumer_count == 0
    finally:
        await blobs.close()
