"""The pipeline as separate processes: a gateway, a projector, stage workers sharing one stage."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conveyor.backends import open_log, open_store
from conveyor.embedded import EmbeddedNats
from conveyor.events import Topic, prepared_topic
from conveyor.log.base import EventLog
from conveyor.models.simulated import SimulatedModel
from conveyor.payloads import GenerationStarted, decode
from conveyor.testing import UpProcess
from tests.conftest import unique_prefix
from tests.helpers import assert_completed_exactly_once, submit, wait_final

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


class Deployment:
    """The processes of one deployment on the ``backends``' log and store, each started with
    ``env``; the fixture kills whatever is left of them by PID."""

    def __init__(self, backends: tuple[str, str], data_dir: Path) -> None:
        self.log_url, self.store_url = backends
        self.data_dir = data_dir
        self.env = {"CONVEYOR_PREFIX": unique_prefix()}  # its own, on a shared test broker
        self.started: list[UpProcess] = []

    def start(self, command: str, *args: str) -> UpProcess:
        urls = ("--log-url", self.log_url, "--store-url", self.store_url)
        self.started.append(UpProcess(self.data_dir, *args, *urls, command=command, env=self.env))
        return self.started[-1].start()

    def stop(self) -> list[int]:
        return [proc.stop() for proc in self.started]


@pytest.fixture
def deployment(backends: tuple[str, str], tmp_path: Path) -> Iterator[Deployment]:
    made = Deployment(backends, tmp_path / "data")
    try:
        yield made
    finally:
        for proc in made.started:
            proc.cleanup()


async def generating(log: EventLog, pid: int) -> None:
    """Returns once process ``pid`` announces it is generating a request (its first chunk is out)."""
    async with contextlib.aclosing(log.tail(Topic.PROGRESS, None)) as progress:
        async for tailed in progress:
            if decode(GenerationStarted, tailed.envelope.data).worker.endswith(f"/{pid}"):
                return


async def test_a_generate_worker_killed_mid_batch_and_another_joining(deployment: Deployment) -> None:
    process = deployment.start
    gateway = process("gateway")
    process("projector")
    process("worker", "prepare", "finalize")
    generators = [process("worker", *GENERATE) for _ in range(3)]
    victim = generators[0]
    assert [g.log_url for g in generators] == [deployment.log_url] * 3

    prompts = [f"scale out {i}" for i in range(30)]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
        rids = await asyncio.gather(
            *(submit(client, p, max_tokens=30, key=f"user{i}") for i, p in enumerate(prompts))
        )
        log = await open_log(deployment.log_url, prefix=deployment.env["CONVEYOR_PREFIX"])
        try:
            assert victim.process is not None
            async with asyncio.timeout(30):
                await generating(log, victim.process.pid)
        finally:
            await log.close()
        victim.kill9()  # one leaves mid-batch...
        process("worker", *GENERATE)  # ...and one joins while the rest is under way

        store = await open_store(deployment.store_url, prefix=deployment.env["CONVEYOR_PREFIX"])
        try:
            await assert_completed_exactly_once(client, store, prompts, rids, max_tokens=30)
        finally:
            await store.close()
    # The survivors did the work, the victim's share included.
    survivors = [g for g in generators if g is not victim]
    assert all(g.process is not None and g.process.poll() is None for g in survivors)
    for proc in (gateway, *survivors):
        assert proc.stop() == 0


async def test_each_model_is_generated_by_the_workers_that_serve_it(deployment: Deployment) -> None:
    # Every process of the deployment is told its models the same way: here the environment.
    deployment.env["CONVEYOR_MODEL"] = "simulated"
    deployment.env["CONVEYOR_MODELS"] = json.dumps([{"name": "fast", "backend": "simulated", "version": "2"}])
    process = deployment.start
    gateway = process("gateway")
    process("projector")
    process("worker", "prepare", "finalize")
    process("worker", "generate", "--serve", "simulated")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
        waiting = await submit(client, "for the fast one", model="fast", max_tokens=8)
        default = await wait_final(client, await submit(client, "for the default one", max_tokens=8))
        assert (default["status"], default["model"]) == ("completed", "simulated")
        # The other model's request waits on its own topic, where no worker takes it yet.
        log = await open_log(deployment.log_url, prefix=deployment.env["CONVEYOR_PREFIX"])
        try:
            async with (
                asyncio.timeout(30),
                contextlib.aclosing(log.tail(prepared_topic("fast"), waiting)) as prepared,
            ):
                assert (await anext(prepared)).envelope.request_id == waiting
        finally:
            await log.close()
        assert (await client.get(f"/v1/requests/{waiting}")).json()["status"] in ("accepted", "prepared")

        process("worker", "generate", "--serve", "fast")
        fast = await wait_final(client, waiting)
        assert (fast["status"], fast["model"]) == ("completed", "fast")
        assert fast["output"] == "".join(SimulatedModel().answer("for the fast one", 8)[0]).strip()
    assert deployment.stop() == [0] * 5
