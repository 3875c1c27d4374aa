"""A deterministic model for tests and load tests: the output is a function of the prompt.

Latency is a profile, not a computation: ``ttft`` before the first token, then
``token_delay`` per token. With both at zero it answers as fast as the loop runs. Asked for JSON
(``json_schema``), it answers with an instance of the schema made of the same words, so a client's
structured-output path can be load-tested too. Asked for logprobs, it makes up consistent ones
(each token the likeliest of its alternatives). Its embeddings are words hashed into a vector.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from conveyor.models.base import Embedding, GenerationRequest, ModelInfo, Token
from conveyor.payloads import FinishReason, TokenLogprob, TopLogprob

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


EMBEDDING_SIZE = 64


def embedding_of(text: str) -> list[float]:
    """The simulated model's embedding of ``text`` (see ``SimulatedModel.embed``)."""
    vector = [0.0] * EMBEDDING_SIZE
    for word in text.lower().split():
        vector[hashlib.sha256(word.encode()).digest()[0] % EMBEDDING_SIZE] += 1.0
    norm = sum(x * x for x in vector) ** 0.5 or 1.0
    return [x / norm for x in vector]


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

    def answer(
        self, prompt: str, max_tokens: int, json_schema: dict[str, Any] | None = None
    ) -> tuple[list[str], FinishReason]:
        """The full deterministic answer to ``prompt``: its tokens and finish reason."""
        digest = hashlib.sha256(prompt.encode()).digest()
        natural = 4 + digest[0] % max(1, self._max_length - 4)
        words = [_WORDS[digest[(i % 31) + 1] % len(_WORDS)] for i in range(natural)]
        if json_schema is not None:
            pieces = json.dumps(_instance(json_schema, " ".join(words))).split(" ")
            tokens = [pieces[0]] + [" " + p for p in pieces[1:]]
        else:
            tokens = [words[0].capitalize()] + [" " + w for w in words[1:]]
        return tokens[:max_tokens], "stop" if len(tokens) <= max_tokens else "length"

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        """Each word hashed into one of ``EMBEDDING_SIZE`` dimensions, the sum scaled to length 1:
        the same text, the same vector; texts sharing words, vectors close together."""
        return [Embedding(embedding_of(text), self.count_tokens(text)) for text in texts]

    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        plans = {r.id: self.answer(r.prompt, r.max_tokens, r.json_schema) for r in requests}
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
                    continue
                text = tokens[step] if step < len(tokens) else ""
                weighed = (_weighed(text, r.logprobs),) if r.logprobs is not None and text else ()
                if step >= len(tokens) - 1:
                    yield Token(r.id, text, reason, logprobs=weighed)
                else:
                    yield Token(r.id, text, logprobs=weighed)
                    still.append(r)
            active = still
            step += 1

    async def close(self) -> None:
        return None


def _weighed(token: str, alternatives: int) -> TokenLogprob:
    """A made-up but consistent weighing of ``token``: the likeliest of its ``alternatives``."""
    logprob = -0.1 - hashlib.sha256(token.encode()).digest()[0] / 512
    others = [w for w in _WORDS if w != token.strip().lower()][: max(0, alternatives - 1)]
    top = [TopLogprob(token=token, logprob=logprob)] if alternatives else []
    top += [TopLogprob(token=" " + w, logprob=-3.0 - i) for i, w in enumerate(others)]
    return TokenLogprob(token=token, logprob=logprob, top_logprobs=top)


def _instance(schema: dict[str, Any], text: str) -> Any:
    """A value that ``schema`` accepts, made of ``text``: every property present, the first of any
    choice, one item per array."""
    for choice in ("enum", "const"):
        if choice in schema:
            return schema[choice][0] if choice == "enum" else schema[choice]
    for union in ("anyOf", "oneOf", "allOf"):
        if schema.get(union):
            return _instance(schema[union][0], text)
    kind = schema.get("type", "string")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        properties = schema.get("properties") or {"answer": {"type": "string"}}
        return {name: _instance(sub, text) for name, sub in properties.items()}
    if kind == "array":
        return [_instance(schema.get("items") or {}, text)]
    return {"integer": len(text.split()), "number": len(text.split()) / 2, "boolean": True, "null": None}.get(
        kind, text
    )
