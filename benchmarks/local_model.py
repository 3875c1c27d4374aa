"""The local model (SmolLM2 on llama.cpp, continuous batching) at 1, 4, 8 and 16 concurrent requests:
called directly, and through ``conveyor up`` (its own API over HTTP + SSE, and the OpenAI API), in one run.

Per level: 4 * ``concurrency`` requests, at least 16 (one at a time then gives 48 first tokens over
the rounds; 64 new tokens at most, greedy), ``concurrency`` in flight, so the engine runs near steady
state rather than draining one wave. Reported:
aggregate completion tokens/s, time to first token and end-to-end latency (p50), as medians of
``ROUNDS`` rounds; each round runs every system over all levels, one system after the other, and each
ratio is against the same round's single stream, each TTFT overhead against the same round's direct
call. Through Conveyor, the first token is the first SSE ``token`` event (the first content chunk of
the OpenAI stream) and the count comes from the recorded usage.
Then ``PAIRS`` pairs of lone requests, each sent directly and through Conveyor back to back (in
alternating order, on a prompt neither engine has seen): the median and p90 of each pair's TTFT
difference is Conveyor's overhead, measured where a slow spell of this VM falls on both sides of it.
Each weight type of ``--weights`` (default: q8_0, the default, and f16) is run whole, one after the
other. Run: ``.venv/bin/python benchmarks/local_model.py [--weights q8_0,f16]`` (~8 min per type).
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson

from conveyor.models.base import MODEL_IDS, GenerationRequest
from conveyor.models.local import LocalModel
from conveyor.testing import UpProcess

LEVELS = (1, 4, 8, 16)
ROUNDS = 3
PAIRS = 24
MAX_TOKENS = 64
PROMPTS = [
    "Explain what a message queue is.",
    "Write a short poem about the sea.",
    "Give three tips for learning Python.",
    "Describe a sunrise in two sentences.",
]


def prompt(i: int) -> str:
    # Unique from its first word: no request finds another's prompt in the engine's slot cache.
    return f"Request {i}. {PROMPTS[i % len(PROMPTS)]}"


# One request: returns (time to first token, latency, completion tokens).
Call = Callable[[int], Awaitable[tuple[float, float, int]]]


async def direct_call(model: LocalModel, i: int) -> tuple[float, float, int]:
    request = GenerationRequest(id=f"bench-{i}", prompt=prompt(i), max_tokens=MAX_TOKENS)
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    async for token in model.generate([request]):
        if token.text:
            tokens += 1
            first = first or time.perf_counter() - start
    return first, time.perf_counter() - start, tokens


async def conveyor_call(client: aiohttp.ClientSession, i: int) -> tuple[float, float, int]:
    body = {"prompt": prompt(i), "max_tokens": MAX_TOKENS}
    start = time.perf_counter()
    async with client.post("/v1/requests", json=body) as response:
        rid = (await response.json())["id"]
    first = 0.0
    async with client.get(f"/v1/requests/{rid}/events") as events:
        event = ""
        async for raw in events.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "token":
                first = first or time.perf_counter() - start
            elif line.startswith("data: ") and event in ("completed", "failed", "cancelled"):
                usage = orjson.loads(line[6:])["usage"] or {}
                return first, time.perf_counter() - start, int(usage.get("completion_tokens", 0))
    raise RuntimeError(f"stream of {rid} ended without a final event")


async def openai_call(client: aiohttp.ClientSession, i: int) -> tuple[float, float, int]:
    """The same request as an OpenAI SDK user sends it: one streamed chat completion."""
    body = {
        "model": MODEL_IDS["local"],
        "messages": [{"role": "user", "content": prompt(i)}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = 0.0
    async with client.post("/v1/chat/completions", json=body) as response:
        async for raw in response.content:
            if not raw.startswith(b"data: {"):
                continue
            chunk = orjson.loads(raw[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter() - start
            if chunk.get("usage"):
                return first, time.perf_counter() - start, int(chunk["usage"]["completion_tokens"])
    raise RuntimeError("a chat completion stream ended without its usage")


async def level(call: Call, concurrency: int) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[float, float, int]:
        async with gate:
            return await call(i)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(max(16, 4 * concurrency))))
    wall = time.perf_counter() - start
    return {
        "tok_s": sum(r[2] for r in results) / wall,
        "ttft": statistics.median(r[0] for r in results) * 1000,
        "latency": statistics.median(r[1] for r in results) * 1000,
    }


async def rounds(weights: str, systems: dict[str, Call]) -> None:
    """Every level of every system, ``ROUNDS`` times: each round runs the systems one after the
    other, so that both a round's ratios to one request at a time and its TTFT overhead compare
    runs minutes apart at most (this VM has slow spells)."""
    runs: dict[str, dict[int, list[dict[str, float]]]] = {s: {c: [] for c in LEVELS} for s in systems}
    for _ in range(ROUNDS):
        for system, call in systems.items():
            for c in LEVELS:
                runs[system][c].append(await level(call, c))
    for system, by_level in runs.items():
        alone = by_level[LEVELS[0]]
        for c in LEVELS:
            ratios = [r["tok_s"] / one["tok_s"] for r, one in zip(by_level[c], alone, strict=True)]
            cell = {k: statistics.median(r[k] for r in by_level[c]) for k in ("tok_s", "ttft", "latency")}
            print(
                f"| {weights}: {system} | {c} | {cell['tok_s']:.0f} | {statistics.median(ratios):.2f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f}) | {cell['ttft']:.0f} | {cell['latency']:.0f} |",
                flush=True,
            )
    direct, *through = (by_level[LEVELS[0]] for by_level in runs.values())
    for system, alone in zip(list(systems)[1:], through, strict=True):
        overheads = [r["ttft"] - d["ttft"] for r, d in zip(alone, direct, strict=True)]
        each = ", ".join(f"{o:.0f}" for o in overheads)
        print(f"{weights}, {system}: TTFT overhead one at a time, per round: {each} ms", flush=True)


async def paired(weights: str, systems: dict[str, Call]) -> None:
    """Each system's TTFT overhead over the direct call, pair by pair."""
    (_, direct), *others = systems.items()
    for system, call in others:
        overheads = []
        for i in range(PAIRS):
            first, second = (direct, call) if i % 2 == 0 else (call, direct)
            a, b = (await first(1000 + i))[0], (await second(1000 + i))[0]
            through, alone = (b, a) if i % 2 == 0 else (a, b)
            overheads.append((through - alone) * 1000)
        p90 = statistics.quantiles(overheads, n=10)[-1]
        print(
            f"{weights}, {system}: TTFT overhead over the direct call, {PAIRS} pairs: median "
            f"{statistics.median(overheads):.1f} ms, p90 {p90:.1f} ms",
            flush=True,
        )


async def weight_type(weights: str) -> None:
    """One weight type: the engine called directly, and through ``conveyor up`` by its own API
    (POST, then SSE) and by the OpenAI API (one streamed chat completion), round by round."""
    with tempfile.TemporaryDirectory() as tmp:
        model = LocalModel(cache_dir=Path(tmp) / "models", weights=weights)
        up = UpProcess(Path(tmp) / "data", "--model", "local", "--model-weights", weights).start(timeout=120)
        try:
            async with aiohttp.ClientSession(up.url) as client:
                await direct_call(model, 0)  # warm up both engines
                await conveyor_call(client, 0)
                systems: dict[str, Call] = {
                    "direct (same engine, no Conveyor)": functools.partial(direct_call, model),
                    "conveyor up (HTTP + NATS + SSE)": functools.partial(conveyor_call, client),
                    "conveyor up (OpenAI API, streamed)": functools.partial(openai_call, client),
                }
                await rounds(weights, systems)
                await paired(weights, systems)
        finally:
            up.stop()
            up.cleanup()
            await model.close()


async def main(weight_types: list[str]) -> None:
    print(f"Medians of {ROUNDS} rounds; the ratio is each round's against its own single stream.")
    print("| system | concurrent | tokens/s | vs 1 at a time (range) | TTFT p50 ms | latency p50 ms |")
    print("|---|---|---|---|---|---|")
    for weights in weight_types:
        await weight_type(weights)


if __name__ == "__main__":
    import argparse

    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="q8_0,f16", help="weight types, comma-separated")
    uvloop.run(main(parser.parse_args().weights.split(",")))
