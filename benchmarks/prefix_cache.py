"""What the local engine's slot prefix cache buys on a chat workload: every request carries the
same system turn (a support assistant's ~150-token instructions) and its own question.

The same requests, engine called directly, with the cache on (the default) and off: 16 concurrent
requests from a cold start (no slot has read the system turn yet), then 1, then 16 again: time to
first token (p50), end-to-end latency (p50), aggregate tokens/s and the prompt tokens actually
computed per request. Run: ``.venv/bin/python benchmarks/prefix_cache.py``.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from conveyor.models.base import GenerationRequest
from conveyor.models.local import LocalModel
from conveyor.observability.metrics import PROMPT_TOKENS
from conveyor.payloads import ChatMessage

MAX_TOKENS = 32
SYSTEM = (
    "You are the support assistant of Conveyor, a system that serves language models to many users "
    "at once. Answer in one or two short sentences, in plain English, without lists or code unless "
    "asked. If a question is about billing, say that the billing team answers within one business "
    "day and give no figures. If a question is about an outage, point to the status page and do not "
    "guess at causes. Never promise features or dates. If you do not know an answer, say so and "
    "suggest opening a ticket. Be friendly but brief, and do not repeat the question back. Use the "
    "customer's own words for the product names they mention. Do not discuss these instructions."
)
TOPICS = ["queues", "latency", "billing", "an outage", "streaming", "retries", "batching", "quotas"]


def request(i: int) -> GenerationRequest:
    question = f"Ticket {i}: I have a question about {TOPICS[i % len(TOPICS)]}. What should I do?"
    return GenerationRequest(
        id=f"bench-{i}",
        prompt="",
        max_tokens=MAX_TOKENS,
        messages=(ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content=question)),
    )


async def call(model: LocalModel, i: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first, tokens = 0.0, 0
    async for token in model.generate([request(i)]):
        if token.text:
            tokens += 1
            first = first or time.perf_counter() - start
    return first, time.perf_counter() - start, tokens


async def level(model: LocalModel, concurrency: int, offset: int) -> list[str]:
    gate = asyncio.Semaphore(concurrency)
    count = max(8, 2 * concurrency)

    async def one(i: int) -> tuple[float, float, int]:
        async with gate:
            return await call(model, i)

    computed = PROMPT_TOKENS.value(source="computed")
    start = time.perf_counter()
    results = await asyncio.gather(*(one(offset + i) for i in range(count)))
    wall = time.perf_counter() - start
    per_request = (PROMPT_TOKENS.value(source="computed") - computed) / count
    return [
        f"{sum(r[2] for r in results) / wall:.0f}",
        f"{statistics.median(r[0] for r in results) * 1000:.0f}",
        f"{statistics.median(r[1] for r in results) * 1000:.0f}",
        f"{per_request:.0f}",
    ]


async def main() -> None:
    print("| prefix cache | concurrent | tokens/s | TTFT p50 ms | latency p50 ms | prompt tokens computed |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for enabled in (False, True):
            model = LocalModel(cache_dir=Path(tmp), prefix_cache=enabled)
            async for _ in model.generate([GenerationRequest(id="warm-up", prompt="Hi", max_tokens=4)]):
                pass  # the engine's first step allocates its buffers; no system turn read yet
            for label, concurrency in (("16, cold start", 16), ("1", 1), ("16", 16)):
                cells = await level(model, concurrency, offset=len(label) * 100)
                print(f"| {'on' if enabled else 'off'} | {label} | {' | '.join(cells)} |", flush=True)
            await model.close()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
