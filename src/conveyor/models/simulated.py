"""A deterministic model for tests and load tests: the output is a function of the prompt.

Latency is a profile, not a computation: ``ttft`` before the first token, then
``token_delay`` per token. With both at zero it answers as fast as the loop runs.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, Sequence

from conveyor.models.base import GenerationRequest, ModelInfo, Token
from conveyor.payloads import FinishReason

_WORDS = [
    "queue",
    "event",
    "stream",
    "token",
    "batch",
    "river",
    "stone",
    "light",
    "signal",
    "quiet",
    "harbor",
    "lantern",
    "morning",
    "paper",
    "window",
    "garden",
    "thread",
    "echo",
    "orbit",
    "ember",
    "meadow",
    "cloud",
    "anchor",
    "bridge",
    "silver",
    "north",
]


class SimulatedModel:
    """Answers every prompt with the same words every time, at a configurable pace."""

    def __init__(self, *, ttft: float = 0.0, token_delay: float = 0.0, max_length: int = 24) -> None:
        self._ttft, self._token_delay, self._max_length = ttft, token_delay, max_length
        self._info = ModelInfo(name="simulated", version="1", license="Apache-2.0")

    @property
    def info(self) -> ModelInfo:
        return self._info

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def answer(self, prompt: str, max_tokens: int) -> tuple[list[str], FinishReason]:
        """The full deterministic answer to ``prompt``: its tokens and finish reason."""
        digest = hashlib.sha256(prompt.encode()).digest()
        natural = 4 + digest[0] % max(1, self._max_length - 4)
        n = min(natural, max_tokens)
        words = [_WORDS[digest[(i % 31) + 1] % len(_WORDS)] for i in range(n)]
        tokens = [words[0].capitalize()] + [" " + w for w in words[1:]] if words else []
        return tokens, "stop" if natural <= max_tokens else "length"

    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        plans = {r.id: self.answer(r.prompt, r.max_tokens) for r in requests}
        if self._ttft:
            await asyncio.sleep(self._ttft)
        step = 0
        active = list(requests)
        while active:
            if step and self._token_delay:
                await asyncio.sleep(self._token_delay)
            still = []
            for r in active:
                tokens, reason = plans[r.id]
                if r.cancelled.is_set():
                    yield Token(r.id, "", "cancelled")
                elif step >= len(tokens) - 1:
                    yield Token(r.id, tokens[step] if step < len(tokens) else "", reason)
                else:
                    yield Token(r.id, tokens[step])
                    still.append(r)
            active = still
            step += 1

    async def close(self) -> None:
        return None
