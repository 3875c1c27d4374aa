"""The pipeline as separate processes: a gateway, a projector, stage workers sharing one stage."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conveyor.backends import open_store
from conveyor.embedded import EmbeddedNats
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


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text page (0 if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def mid_batch(metrics_url: str, *, timeout: float = 30) -> None:
    """Returns once the worker has events handed to a batch that it has not finished."""
    async with httpx.AsyncClient(timeout=5) as client, asyncio.timeout(timeout):
        while True:
            text = (await client.get(metrics_url)).text
            batched = metric(text, "conveyor_batch_size_sum", stage="generate")
            done = metric(text, "conveyor_events_total", outcome="ok", stage="generate")
            if batched > done:
                return
            await asyncio.sleep(0.02)  # polling a live process; the deadline bounds it


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
        generators = [process("worker", *GENERATE, "--metrics-port", "0") for _ in range(3)]
        victim = generators[0]
        assert [g.log_url for g in generators] == [log_url] * 3

        prompts = [f"scale out {i}" for i in range(30)]
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            rids = await asyncio.gather(
                *(submit(client, p, max_tokens=30, key=f"user{i}") for i, p in enumerate(prompts))
            )
            await mid_batch(victim.metrics_urls[0])
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
