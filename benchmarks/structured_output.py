"""What holding the local model's answer to a JSON Schema costs (``response_format``).

The same requests to the local engine, called directly, free and held to a schema (an object with a
city, its country and its population), one at a time and 8 at once, in two rounds that alternate
the two: completion tokens/s, latency p50, the time per token after the first (p50; answers held
to the schema are shorter, so tokens/s alone would charge them the prompt's share), and how many
answers parse as JSON with the schema's keys. Run: ``.venv/bin/python benchmarks/structured_output.py``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from conveyor.models.base import GenerationRequest
from conveyor.models.local import LocalModel

MAX_TOKENS = 48
REQUESTS = 16
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string"},
        "population": {"type": "integer"},
    },
    "required": ["city", "country", "population"],
}


def request(i: int, schema: dict[str, Any] | None) -> GenerationRequest:
    prompt = f"Request {i}. Name a large European city, its country and its population."
    return GenerationRequest(id=f"bench-{i}", prompt=prompt, max_tokens=MAX_TOKENS, json_schema=schema)


async def call(model: LocalModel, i: int, schema: dict[str, Any] | None) -> tuple[float, int, bool, float]:
    start, text, tokens, first = time.perf_counter(), "", 0, 0.0
    async for token in model.generate([request(i, schema)]):
        text += token.text
        first = first or (time.perf_counter() - start if token.text else 0.0)
        if token.usage is not None:
            tokens = token.usage.completion_tokens
    try:
        valid = set(json.loads(text)) == set(SCHEMA["required"])
    except ValueError:
        valid = False
    latency = time.perf_counter() - start
    return latency, tokens, valid, (latency - first) / max(1, tokens - 1)


async def level(model: LocalModel, concurrency: int, schema: dict[str, Any] | None) -> str:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[float, int, bool, float]:
        async with gate:
            return await call(model, i, schema)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    wall = time.perf_counter() - start
    tokens = sum(r[1] for r in results)
    latency = statistics.median(r[0] for r in results) * 1e3
    valid = sum(r[2] for r in results)
    per_token = statistics.median(r[3] for r in results) * 1e3
    kind = "held to the schema" if schema else "free"
    rate = tokens / wall
    return f"| {kind} | {concurrency} | {rate:.0f} | {latency:.0f} | {per_token:.1f} | {valid}/{REQUESTS} |"


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = LocalModel(cache_dir=Path(tmp), slots=8)
        try:
            await level(model, 8, None)  # warm-up
            print(
                "| answer | concurrent | tokens/s | latency p50 ms | ms per token after the first "
                "| JSON with the schema's keys |"
            )
            print("|---|---|---|---|---|---|")
            for _ in range(2):
                for concurrency in (1, 8):
                    for schema in (None, SCHEMA):
                        print(await level(model, concurrency, schema), flush=True)
        finally:
            await model.close()


if __name__ == "__main__":
    asyncio.run(main())
