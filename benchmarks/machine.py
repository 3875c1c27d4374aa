"""What a wakeup costs on this machine: the floor under Conveyor's latency and its CPU below saturation.

A request crosses about ten processes' worth of hops one after another (gateway, broker, worker,
broker, ...) and ~30 broker messages in all. When the machine is not saturated, each of them finds
its process asleep, so what a wakeup costs here multiplies into every number of ``pipeline.py``.
Measured, each beside its own baseline in the same run:

* two processes passing a byte back and forth over pipes, both on one vCPU (the baseline) and on
  two: time and CPU (both processes, user + system) per round trip;
* a round trip through the bundled nats-server (a core request answered by a subscriber, and a
  JetStream publish acknowledged by the server), back to back (the baseline) and each after a
  20 ms pause, as a lone request's hops are.

Run: ``.venv/bin/python benchmarks/machine.py``.
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
from nats.aio.msg import Msg

from conveyor.embedded import EmbeddedNats

ROUND_TRIPS = 20_000
BROKER_TRIPS = 200
PAUSE = 0.02


def ping_pong(parent_cpu: int, child_cpu: int) -> str:
    """A byte there and back ROUND_TRIPS times between two processes pinned to the given vCPUs."""
    there_r, there_w = os.pipe()
    back_r, back_w = os.pipe()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pid = os.fork()
    if pid == 0:  # the child answers every byte and exits
        os.sched_setaffinity(0, {child_cpu})
        for _ in range(ROUND_TRIPS):
            os.read(there_r, 1)
            os.write(back_w, b"y")
        os._exit(0)
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {parent_cpu})
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(ROUND_TRIPS):
            os.write(there_w, b"x")
            os.read(back_r, 1)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        os.waitpid(pid, 0)
        os.sched_setaffinity(0, affinity)
        for fd in (there_r, there_w, back_r, back_w):
            os.close(fd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    where = "one vCPU" if parent_cpu == child_cpu else "two vCPUs"
    per = 1e6 / ROUND_TRIPS
    return f"| two processes, a pipe each way, on {where} | {wall * per:.1f} | {(cpu + child) * per:.1f} |"


async def broker_round_trips() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        server = await EmbeddedNats.start(Path(tmp))
        try:
            nc = await nats.connect(server.url)
            answerer = await nats.connect(server.url)  # a second connection, as another process has
            js = nc.jetstream()
            await js.add_stream(name="MACHINE", subjects=["machine.>"])

            async def echo(msg: Msg) -> None:
                await msg.respond(b"ok")

            await answerer.subscribe("machine-echo", cb=echo)

            async def request() -> object:
                return await nc.request("machine-echo", b"x", timeout=5)

            async def publish() -> object:
                return await js.publish("machine.x", b"x")

            rows = []
            calls = (("a core NATS request and its answer", request), ("a JetStream publish", publish))
            for label, call in calls:
                for pause in (0.0, PAUSE):
                    median = await _median(call, pause)
                    when = f"each after a {PAUSE * 1e3:.0f} ms pause" if pause else "back to back"
                    rows.append(f"| {label} through nats-server, {when} | {median * 1e6:.0f} | — |")
            await answerer.close()
            await nc.close()
            return rows
        finally:
            await server.stop()


async def _median(call: Callable[[], Awaitable[object]], pause: float) -> float:
    for _ in range(20):  # warm up
        await call()
    times = []
    for _ in range(BROKER_TRIPS):
        if pause:
            await asyncio.sleep(pause)
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    print("| round trip | µs each (median for the broker) | CPU µs each |")
    print("|---|---|---|")
    print(ping_pong(cpus[0], cpus[0]))
    if len(cpus) > 1:
        print(ping_pong(cpus[0], cpus[1]))
    for row in asyncio.run(broker_round_trips()):
        print(row)


if __name__ == "__main__":
    main()
