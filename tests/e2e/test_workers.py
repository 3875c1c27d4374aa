"""The pipeline as separate processes: a gateway, a projector, stage workers sharing one stage."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conveyor.backends import open_log, open_store
from conveyor.embedded import EmbeddedNats
from conveyor.events import Topic
from conveyor.log.base import EventLog
from conveyor.payloads import GenerationStarted, decode
from conveyor.testing import UpProcess
from tests.conftest import unique_prefix
from tests.helpers import assert_completed_exactly_once, submit

pytestmark = pytest.mark.slow

# Slow enough that a batch is still generating when its worker is killed; a short ack
# deadline so the killed worker's events are redelivered to the others within 2 s.
GENERATE = ("generate", "--model", "simulated", "--model-token-delay", "0.05", "--ack-wait", "2")


@pytest.fixture(params=["nats", "kafka+redis"])
def backends(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(log URL, store URL) for a fresh deployment."""
    if request.param == "nats":
        server = EmbeddedNats.launch(tmp_path / "nats")
        try:
            yield server.url, server.url
        finally:
            server.terminate()
        return
    # A short session: the group moves a killed member's partitions on after 3 s.
    log_url = request.getfixturevalue("kafka_url") + "?partitions=6&session_timeout=3"
    yield log_url, request.getfixturevalue("redis_url")


async def generating(log: EventLog, pid: int) -> None:
    """Returns once process ``pid`` announces it is generating a request (its first chunk is out)."""
    async with contextlib.aclosing(log.tail(Topic.PROGRESS, None)) as progress:
        async for tailed in progress:
            if decode(GenerationStarted, tailed.envelope.data).worker.endswith(f"/{pid}"):
                return


async def test_a_generate_worker_killed_mid_batch_and_another_joining(
    backends: tuple[str, str], tmp_path: Path
) -> None:
    log_url, store_url = backends
    urls = ("--log-url", log_url, "--store-url", store_url)
    env = {"CONVEYOR_PREFIX": unique_prefix()}  # a deployment of its own on a shared test broker

    def process(command: str, *args: str) -> UpProcess:
        started.append(UpProcess(tmp_path / "data", *args, *urls, command=command, env=env))
        return started[-1].start()

    started: list[UpProcess] = []
    try:
        gateway = process("gateway")
        process("projector")
        process("worker", "prepare", "finalize")
        generators = [process("worker", *GENERATE) for _ in range(3)]
        victim = generators[0]
        assert [g.log_url for g in generators] == [log_url] * 3

        prompts = [f"scale out {i}" for i in range(30)]
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            rids = await asyncio.gather(
                *(submit(client, p, max_tokens=30, key=f"user{i}") for i, p in enumerate(prompts))
            )
            log = await open_log(log_url, prefix=env["CONVEYOR_PREFIX"])
            try:
                assert victim.process is not None
                async with asyncio.timeout(30):
                    await generating(log, victim.process.pid)
            finally:
                await log.close()
            victim.kill9()  # one leaves mid-batch...
            process("worker", *GENERATE)  # ...and one joins while the rest is under way

            store = await open_store(store_url, prefix=env["CONVEYOR_PREFIX"])
            try:
                await assert_completed_exactly_once(client, store, prompts, rids, max_tokens=30)
            finally:
                await store.close()
        # The survivors did the work, the victim's share included.
        survivors = [g for g in generators if g is not victim]
        assert all(g.process is not None and g.process.poll() is None for g in survivors)
        for proc in (gateway, *survivors):
            assert proc.stop() == 0
    finally:
        for proc in started:
            proc.cleanup()
