"""What reporting logprobs costs the local model (``logprobs`` / ``top_logprobs``).

The same requests to the local engine, called directly, without logprobs, with each token's own,
and with 5 alternatives too, one at a time and 8 at once, in two rounds that alternate them:
completion tokens/s and the time per token after the first (p50). The answers are greedy, so all
three say the same. Run: ``.venv/bin/python benchmarks/logprobs.py``.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from conveyor.models.base import GenerationRequest
from conveyor.models.local import LocalModel

MAX_TOKENS = 64
REQUESTS = 16
ASKED = {"none": None, "the token's": 0, "and 5 alternatives": 5}


async def call(model: LocalModel, i: int, logprobs: int | None) -> tuple[int, float]:
    prompt = f"Request {i}. Write a short paragraph about rivers."
    request = GenerationRequest(id=f"bench-{i}", prompt=prompt, max_tokens=MAX_TOKENS, logprobs=logprobs)
    start, tokens, first = time.perf_counter(), 0, 0.0
    async for token in model.generate([request]):
        first = first or (time.perf_counter() - start if token.text else 0.0)
        if token.usage is not None:
            tokens = token.usage.completion_tokens
    return tokens, (time.perf_counter() - start - first) / max(1, tokens - 1)


async def level(model: LocalModel, concurrency: int, kind: str) -> str:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[int, float]:
        async with gate:
            return await call(model, i, ASKED[kind])

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    rate = sum(r[0] for r in results) / (time.perf_counter() - start)
    per_token = statistics.median(r[1] for r in results) * 1e3
    return f"| {kind} | {concurrency} | {rate:.0f} | {per_token:.1f} |"


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = LocalModel(cache_dir=Path(tmp), slots=8)
        try:
            await level(model, 8, "none")  # warm-up
            print("| logprobs | concurrent | tokens/s | ms per token after the first |")
            print("|---|---|---|---|")
            for _ in range(2):
                for concurrency in (1, 8):
                    for kind in ASKED:
                        print(await level(model, concurrency, kind), flush=True)
        finally:
            await model.close()


if __name__ == "__main__":
    asyncio.run(main())
