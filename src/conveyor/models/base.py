"""The ModelBackend seam: generate text for a batch of requests, token by token."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol, runtime_checkable

from conveyor.errors import ConveyorError
from conveyor.payloads import ChatMessage, FinishReason, TokenLogprob, Tool, ToolCall, Usage

# The id each --model backend answers to in the OpenAI-compatible API (GET /v1/models).
MODEL_IDS = {"local": "smollm2-135m-instruct", "simulated": "simulated"}  # openai: the upstream's name


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    """Travels on every event the model produced."""

    name: str
    version: str
    license: str


@dataclasses.dataclass(slots=True, kw_only=True)
class GenerationRequest:
    """One sequence to generate. Setting ``cancelled`` stops it at the next token.

    ``temperature`` 0 is greedy; above 0, sampling is seeded from ``seed``, or else from ``id``,
    so a request that is generated again (after a crash) produces the same text.
    """

    id: str
    prompt: str
    max_tokens: int
    messages: tuple[ChatMessage, ...] = ()  # the conversation; empty: the prompt is one user turn
    continuation: bool = False  # continue the prompt as it is, without the chat template
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    json_schema: dict[str, Any] | None = None  # the answer is JSON text matching it
    tools: tuple[Tool, ...] = ()  # functions the model may call (see Sampling)
    tool_choice: str = "auto"  # "auto", "none" or "required" (``tool_name``, if set)
    tool_name: str | None = None
    logprobs: int | None = None  # report each token's log probability and that many alternatives
    priority: int = 0  # lower is served sooner, where requests wait for a backend (local: a slot)
    tenant: str = "default"  # within a priority, tenants take turns there
    traceparent: str = ""  # the request's trace context, for a backend calling a server to pass on
    cancelled: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    """A piece of text for request ``request_id``; the last one has ``finish_reason``, or
    ``error`` when that request failed on its own (its batch-mates go on). A backend that counts
    what the model read and wrote puts it in the last token's ``usage`` (the prompt as the model
    saw it, chat template included); without it the generate stage counts for itself. The calls
    the model made come whole on the last token, whose reason is then ``"tool_calls"``. Asked for
    ``logprobs``, a token carries one for each token of the model's in its ``text``."""

    request_id: str
    text: str
    finish_reason: FinishReason | None = None
    error: ConveyorError | None = None
    usage: Usage | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class ModelBackend(Protocol):
    """A text generator called by the generate stage with a batch of requests.

    Contract: every request of the batch ends with exactly one ``last`` token (a
    ``finish_reason``, or the ``error`` of a request that failed on its own, retryable or
    permanent); a request whose ``cancelled`` event is set ends at its next token with
    ``"cancelled"``; tokens of different requests may interleave. An exception raised by
    ``generate`` fails the whole batch: each request is then retried alone.
    """

    @property
    def info(self) -> ModelInfo: ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        """Tokens of all ``requests``, interleaved; each request ends with one finishing token."""
        ...

    async def close(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Embedding:
    """A text's embedding, and the tokens the model read to make it."""

    vector: list[float]
    tokens: int


@runtime_checkable
class Embedder(Protocol):
    """A model that also turns texts into embeddings (OpenAI's ``/v1/embeddings``)."""

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        """One embedding per text, in order; PermanentError if this model makes none (or not of
        these texts), RetryableError if it may another time."""
        ...
