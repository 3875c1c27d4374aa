"""Any OpenAI-compatible server as the model: vLLM, TGI, Ollama, llama.cpp's server, hosted APIs.

Streams ``/chat/completions``. Failures are sorted the way the runtime needs them: a connection
error, a timeout, a 429 or a 5xx is retryable (the runtime backs off and tries again); any other
4xx — a bad request, a refused prompt — is permanent, and the event goes to the dead-letter topic
with the upstream's own message. A cancelled request closes its stream, so the server stops too.

The client is aiohttp: httpx took ~4 ms of the worker's CPU per streamed completion of 16 chunks,
aiohttp ~0.4 (benchmarks/README.md), and a worker in front of a fast upstream serves hundreds.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson
from pydantic import ValidationError

from conveyor.errors import ConveyorError, PermanentError, RetryableError, UnavailableError
from conveyor.models.base import Embedding, GenerationRequest, ModelInfo, Token
from conveyor.observability.tracing import TRACEPARENT
from conveyor.payloads import (
    ChatMessage,
    ContentPart,
    FinishReason,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)

logger = logging.getLogger("conveyor.models.openai_compat")

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


class OpenAICompatModel:
    """The ModelBackend of ``--model openai``: one HTTP stream per request."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        version: str = "",
        license: str = "see the upstream provider",
    ) -> None:
        self._url = f"{base_url.rstrip('/')}/chat/completions"
        self._completions_url = f"{base_url.rstrip('/')}/completions"
        self._embeddings_url = f"{base_url.rstrip('/')}/embeddings"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Each read waits at most ``timeout`` (a long generation is no failure, a silent server is).
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None  # made on first use, inside the loop
        self._model = model
        self._info = ModelInfo(name=model, version=version, license=license)

    @property
    def info(self) -> ModelInfo:
        return self._info

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)  # the upstream's tokenizer is not ours; ~4 characters a token

    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        # One stream per request, all at once: the upstream server does its own batching.
        merged: asyncio.Queue[Token] = asyncio.Queue()

        async def pump(request: GenerationRequest) -> None:
            try:
                async for token in self._one(request):
                    merged.put_nowait(token)
            except ConveyorError as exc:  # this request's own failure; the others go on
                merged.put_nowait(Token(request.id, "", error=exc))
            except Exception as exc:  # e.g. a garbled stream: worth another try
                merged.put_nowait(Token(request.id, "", error=RetryableError(f"upstream stream: {exc!r}")))

        pumps = [asyncio.create_task(pump(request)) for request in requests]
        remaining = len(requests)
        try:
            while remaining:
                token = await merged.get()
                remaining -= token.last
                yield token
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    def _request(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """Where to send ``request`` and what: a chat completion, or a text completion for a
        continuation."""
        body: dict[str, Any] = {
            "model": self._model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
            # The server's own count (what it bills; cached prompt tokens too) comes in a last chunk.
            # A server that does not know the option ignores it, and the stage counts instead.
            "stream_options": {"include_usage": True},
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        if request.presence_penalty:
            body["presence_penalty"] = request.presence_penalty
        if request.frequency_penalty:
            body["frequency_penalty"] = request.frequency_penalty
        if request.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in request.logit_bias}
        if request.continuation:
            body["prompt"] = request.prompt
            if request.logprobs is not None:  # the legacy API's form: how many alternatives
                body["logprobs"] = request.logprobs
            return self._completions_url, body
        body["messages"] = [_message(m) for m in request.messages] or [
            {"role": "user", "content": request.prompt}
        ]
        if request.json_schema is not None:
            schema = {"name": "answer", "schema": request.json_schema}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        if request.logprobs is not None:
            body["logprobs"] = True
            if request.logprobs:
                body["top_logprobs"] = request.logprobs
        if request.tools:
            body["tools"] = [{"type": "function", "function": tool.model_dump()} for tool in request.tools]
            body["tool_choice"] = (
                {"type": "function", "function": {"name": request.tool_name}}
                if request.tool_name is not None
                else request.tool_choice
            )
        return self._url, body

    async def _one(self, request: GenerationRequest) -> AsyncIterator[Token]:
        url, body = self._request(request)
        try:
            # The request's trace goes on to a server that traces too (vLLM with an OTLP endpoint).
            trace = {TRACEPARENT: request.traceparent} if request.traceparent else None
            async with self._client().post(url, data=orjson.dumps(body), headers=trace) as response:
                if response.status >= 400:
                    raise _classify(response.status, response.reason, await response.text())
                finish: FinishReason = "stop"
                usage: Usage | None = None
                calls = _ToolCalls()
                async for raw in response.content:
                    if request.cancelled.is_set():
                        yield Token(request.id, "", "cancelled")
                        return
                    line = raw.decode()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = orjson.loads(data)
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        text = (choice.get("text") if request.continuation else delta.get("content")) or ""
                        weighed = _logprobs(choice.get("logprobs"))
                        if text or weighed:
                            yield Token(request.id, text, logprobs=weighed)
                        calls.add(delta.get("tool_calls") or [])
                        if choice.get("finish_reason"):
                            finish = _FINISH.get(choice["finish_reason"], "stop")
                    if chunk.get("usage"):
                        usage = _usage(chunk["usage"])
                made = calls.made()
                yield Token(request.id, "", "tool_calls" if made else finish, usage=usage, tool_calls=made)
        except (aiohttp.ClientError, TimeoutError) as exc:  # refused, reset, timed out: worth another try
            raise UnavailableError(f"model server unreachable: {exc!r}") from exc

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        """The upstream's embeddings of ``texts``, in one call. Its token count is split over the
        texts by their length (it gives one number for the call)."""
        body = {"model": self._model, "input": list(texts), "encoding_format": "float"}
        try:
            async with self._client().post(self._embeddings_url, data=orjson.dumps(body)) as response:
                if response.status >= 400:
                    raise _classify(response.status, response.reason, await response.text())
                answer = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UnavailableError(f"model server unreachable: {exc!r}") from exc
        try:
            vectors = [item["embedding"] for item in sorted(answer["data"], key=lambda item: item["index"])]
            total = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise RetryableError(f"upstream embeddings: unexpected answer: {exc!r}") from exc
        if len(vectors) != len(texts):
            raise RetryableError(f"upstream embeddings: {len(vectors)} for {len(texts)} texts")
        sizes = [self.count_tokens(text) for text in texts]
        shares = [total * size // sum(sizes) for size in sizes] if total else sizes
        shares[-1] += total - sum(shares) if total else 0  # every token billed once, rounding aside
        return [Embedding(_pooled(vector), share) for vector, share in zip(vectors, shares, strict=True)]

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={**self._headers, "Content-Type": "application/json"},
                timeout=self._timeout,
                read_bufsize=2**20,  # a line is a whole chunk of the stream
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _message(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.parts:
        out["content"] = [_part(part) for part in message.parts]
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
        out["content"] = out["content"] or None
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _part(part: ContentPart) -> dict[str, Any]:
    if part.type == "text":
        return {"type": "text", "text": part.text}
    image: dict[str, Any] = {"url": part.url}
    if part.detail is not None:
        image["detail"] = part.detail
    return {"type": "image_url", "image_url": image}


class _ToolCalls:
    """The calls of a streamed answer, put together from their pieces: each delta gives call
    ``index`` its id or its name, or adds a piece of its arguments."""

    def __init__(self) -> None:
        self._parts: dict[int, dict[str, str]] = {}

    def add(self, deltas: list[Any]) -> None:
        for delta in deltas:
            part = self._parts.setdefault(int(delta.get("index", 0)), {"id": "", "name": "", "arguments": ""})
            function = delta.get("function") or {}
            part["id"] = delta.get("id") or part["id"]
            part["name"] = function.get("name") or part["name"]  # whole; some servers repeat it
            part["arguments"] += function.get("arguments") or ""

    def made(self) -> tuple[ToolCall, ...]:
        return tuple(ToolCall(**self._parts[i]) for i in sorted(self._parts))


def _logprobs(found: Any) -> tuple[TokenLogprob, ...]:
    """The logprobs of a streamed choice's tokens, if the server sent them: as chat completions
    write them, or as the legacy text completions do (parallel lists)."""
    if not found:
        return ()
    try:
        if "tokens" in found:
            tops = found.get("top_logprobs") or [{}] * len(found["tokens"])
            return tuple(
                TokenLogprob(
                    token=token,
                    logprob=logprob,
                    top_logprobs=[TopLogprob(token=t, logprob=p) for t, p in (top or {}).items()],
                )
                for token, logprob, top in zip(found["tokens"], found["token_logprobs"], tops, strict=True)
            )
        return tuple(TokenLogprob.model_validate(entry) for entry in found.get("content") or ())
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        logger.warning("ignoring the upstream's malformed logprobs %.200r: %s", found, exc)
        return ()


def _usage(counts: Any) -> Usage | None:
    """The server's counts; None (the stage counts instead) if they are not what OpenAI sends:
    a generation is not failed for its bookkeeping."""
    try:
        details = counts.get("prompt_tokens_details") or {}
        return Usage(
            prompt_tokens=counts.get("prompt_tokens") or 0,
            completion_tokens=counts.get("completion_tokens") or 0,
            cached_tokens=details.get("cached_tokens") or 0,
        )
    except (AttributeError, ValidationError) as exc:
        logger.warning("ignoring the upstream's malformed usage %.200r: %s", counts, exc)
        return None


def _pooled(vector: list[Any]) -> list[float]:
    """One vector: as it came, or, from a server that answers a vector per token (llama.cpp's for a
    model without a pooling type), their mean scaled to length 1, as the local model's are."""
    if not vector or not isinstance(vector[0], list):
        return [float(x) for x in vector]
    mean = [sum(column) / len(vector) for column in zip(*vector, strict=True)]
    norm = math.sqrt(sum(x * x for x in mean)) or 1.0
    return [x / norm for x in mean]


def _classify(status: int, reason: str | None, text: str) -> Exception:
    try:
        error = orjson.loads(text).get("error", {})
        detail = error.get("message") if isinstance(error, dict) else str(error)
    except (orjson.JSONDecodeError, AttributeError):
        detail = text[:500]
    message = f"model server answered {status}: {detail or reason}"
    if status == 429 or status >= 500:
        return RetryableError(message)
    return PermanentError(message)
