"""Interactive requests while a batch runs: what keeping background work on its own topic buys.

``conveyor up`` with the local model (its default: 16 slots). Interactive probes (one at a time,
one call each, ``max_tokens`` 16) are timed three ways in one run:

* alone, the machine otherwise idle (the baseline);
* while a batch of ``--batch`` requests runs through the Batch API: its lines are background
  work (priority 5), waiting on the background topic, at most ``--model-background`` (8) in the
  engine at a time;
* while the same requests run as ordinary submits (priority 0), as a job queue without classes of
  work would take them: in front of the probes in the log.

Run: ``.venv/bin/python benchmarks/background.py [--batch 240] [--probes 12]``. Bounded: every
scenario ends when its probes are answered (or after ``--seconds``), and the process stops its own
``conveyor up``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from conveyor.testing import UpProcess

MODEL = "smollm2-135m-instruct"
PROBE = "Name one colour of the rainbow."


async def probes(session: aiohttp.ClientSession, url: str, count: int, deadline: float) -> list[float]:
    """Latencies of ``count`` interactive requests, one after another, half a second apart."""
    latencies = []
    for i in range(count):
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        body = {"prompt": f"{PROBE} ({i})", "max_tokens": 16}
        async with session.post(f"{url}/v1/requests", params={"wait": "60"}, json=body) as answer:
            view = await answer.json()
        assert view["status"] == "completed", view
        latencies.append(time.perf_counter() - start)
        await asyncio.sleep(0.5)
    return latencies


async def batch(session: aiohttp.ClientSession, url: str, size: int) -> str:
    """Start a batch of ``size`` chat completions through the Batch API; its id."""
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Story {i} about a river."}],
                "max_tokens": 32,
            },
        }
        for i in range(size)
    ]
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", "".join(json.dumps(line) + "\n" for line in lines), filename="batch.jsonl")
    async with session.post(f"{url}/v1/files", data=form) as answer:
        uploaded = await answer.json()
    asked = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    async with session.post(f"{url}/v1/batches", json=asked) as answer:
        return str((await answer.json())["id"])


async def submits(session: aiohttp.ClientSession, url: str, size: int) -> list[str]:
    """The same requests as ordinary submits (priority 0); their ids."""

    async def one(i: int) -> str:
        body = {"prompt": f"Story {i} about a river.", "max_tokens": 32}
        async with session.post(f"{url}/v1/requests", json=body) as answer:
            return str((await answer.json())["id"])

    return list(await asyncio.gather(*(one(i) for i in range(size))))


async def drained(session: aiohttp.ClientSession, url: str, ids: list[str], deadline: float) -> None:
    for rid in ids:
        while time.monotonic() < deadline:
            async with session.get(f"{url}/v1/requests/{rid}", params={"wait": "30"}) as answer:
                if (await answer.json())["status"] in ("completed", "failed", "cancelled"):
                    break


def row(name: str, latencies: list[float], work: str) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"| {name} | {len(ms)} | {statistics.median(ms):.0f} | {p99:.0f} | {work} |"


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        up = UpProcess(Path(tmp), "--model", "local").start(timeout=300)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
                await probes(session, up.url, 2, time.monotonic() + 60)  # warm up
                deadline = time.monotonic() + args.seconds
                rows = [row("alone", await probes(session, up.url, args.probes, deadline), "-")]

                deadline = time.monotonic() + args.seconds
                batch_id = await batch(session, up.url, args.batch)
                during = await probes(session, up.url, args.probes, deadline)
                async with session.get(f"{up.url}/v1/batches/{batch_id}") as answer:
                    counts = (await answer.json())["request_counts"]
                rows.append(
                    row("during a batch (background)", during, f"{counts['completed']} of {args.batch} done")
                )
                async with session.post(f"{up.url}/v1/batches/{batch_id}/cancel") as answer:
                    await answer.read()
                async with session.get(f"{up.url}/v1/batches/{batch_id}", params={"wait": "60"}) as answer:
                    await answer.read()

                deadline = time.monotonic() + args.seconds
                ids = await submits(session, up.url, args.batch)
                started = time.monotonic()
                during = await probes(session, up.url, args.probes, deadline)
                done = time.monotonic() - started
                rows.append(
                    row("during the same requests at priority 0", during, f"probes took {done:.0f} s")
                )
                await drained(session, up.url, ids, time.monotonic() + args.seconds)
        finally:
            up.stop()
    print(f"Interactive probes (max_tokens 16, one at a time), a batch of {args.batch} requests of 32 tokens")
    print()
    print("| probes | answered | latency p50 ms | latency p99 ms | the other work meanwhile |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=240, help="requests in the batch (default %(default)s)")
    parser.add_argument("--probes", type=int, default=12, help="interactive requests per scenario")
    parser.add_argument("--seconds", type=float, default=240.0, help="each scenario's bound")
    asyncio.run(main(parser.parse_args()))
