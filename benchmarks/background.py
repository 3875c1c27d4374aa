"""Interactive requests while a batch runs: what keeping background work on its own topic buys.

``conveyor up`` with the local model (its default: 16 slots). Interactive probes (one at a time,
one call each, ``max_tokens`` 16) are timed three ways in one run:

* alone, the machine otherwise idle (the baseline);
* while a batch of ``--batch`` requests runs through the Batch API: its lines are background
  work (priority 5), waiting on the background topic, at most ``--model-background`` (4 by default) in the
  engine at a time;
* while the same requests run as ordinary submits (priority 0), as a job queue without classes of
  work would take them: in front of the probes in the log.

Run: ``.venv/bin/python benchmarks/background.py [--batch 240] [--probes 12] [--background 8]``.
Bounded: the probes of a scenario are a fixed number, each answered within 60 s, the last
scenario's requests are waited for at most ``--seconds``, and the process stops its own ``conveyor
up``.
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


async def probes(session: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    """Latencies of ``count`` interactive requests sent half a second apart (open loop: each leaves
    on time, whether or not the one before was answered)."""

    async def one(i: int) -> float:
        await asyncio.sleep(0.5 * i)
        start = time.perf_counter()
        body = {"prompt": f"{PROBE} ({i})", "max_tokens": 16}
        async with session.post(f"{url}/v1/requests", params={"wait": "60"}, json=body) as answer:
            view = await answer.json()
        assert view["status"] == "completed", view
        return time.perf_counter() - start

    return list(await asyncio.gather(*(one(i) for i in range(count))))


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
        options = ("--model", "local", "--model-background", str(args.background))
        up = UpProcess(Path(tmp), *options).start(timeout=300)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
                await probes(session, up.url, 2)  # warm up
                rows = [row("alone", await probes(session, up.url, args.probes), "-")]

                batch_id = await batch(session, up.url, args.batch)
                during = await probes(session, up.url, args.probes)
                async with session.get(f"{up.url}/v1/batches/{batch_id}") as answer:
                    done = (await answer.json())["request_counts"]["completed"]
                rows.append(
                    row("during a batch (background)", during, f"{done} of {args.batch} done by then")
                )
                async with session.post(f"{up.url}/v1/batches/{batch_id}/cancel") as answer:
                    await answer.read()
                async with session.get(f"{up.url}/v1/batches/{batch_id}", params={"wait": "60"}) as answer:
                    await answer.read()

                ids = await submits(session, up.url, args.batch)
                started = time.monotonic()
                during = await probes(session, up.url, args.probes)
                took = time.monotonic() - started
                rows.append(
                    row("during the same requests at priority 0", during, f"answered after {took:.0f} s")
                )
                await drained(session, up.url, ids, time.monotonic() + args.seconds)
        finally:
            up.stop()
    print(
        f"Interactive probes (max_tokens 16, every 0.5 s), a batch of {args.batch} requests of 32 tokens,"
        f" --model-background {args.background}"
    )
    print()
    print("| probes | answered | latency p50 ms | latency p99 ms | the other work |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=240, help="requests in the batch (default %(default)s)")
    parser.add_argument("--probes", type=int, default=12, help="interactive requests per scenario")
    parser.add_argument("--seconds", type=float, default=240.0, help="bound on draining the last scenario")
    parser.add_argument("--background", type=int, default=4, help="--model-background (default %(default)s)")
    asyncio.run(main(parser.parse_args()))
