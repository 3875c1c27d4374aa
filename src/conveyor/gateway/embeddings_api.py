"""OpenAI's ``POST /v1/embeddings``, through the durable pipeline like every other request.

Each input is one request (safety and redaction in prepare, the model's ``embed`` in generate,
usage recorded once in finalize), accepted all together or not at all. Token arrays are refused:
the pipeline carries text, and the tokenizer is the model's.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from conveyor.gateway.core import GatewayCore, GatewayLimits
from conveyor.gateway.model_request import ModelRequest, given
from conveyor.gateway.openai_api import OpenAIError, accept_all, ended, validated
from conveyor.payloads import RequestAccepted
from conveyor.view import RequestView

MAX_INPUTS = 2048  # OpenAI's


class EmbeddingRequest(ModelRequest):
    unsupported = {"dimensions": given}

    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = Field(None, description="Recorded nowhere; accepted for compatibility.")

    def texts(self, limits: GatewayLimits) -> list[str]:
        """The inputs; OpenAIError (400) saying what is wrong with them."""
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts or not all(isinstance(text, str) for text in texts):
            raise OpenAIError(
                400,
                "input: give a text or a list of texts (token arrays are not supported here)",
                code="invalid_request",
                param="input",
            )
        strings = [text for text in texts if isinstance(text, str)]
        if len(strings) > MAX_INPUTS or not all(strings) or max(map(len, strings)) > limits.max_prompt_chars:
            raise OpenAIError(
                400,
                f"input: 1 to {MAX_INPUTS} texts, none empty, none over {limits.max_prompt_chars} characters",
                code="invalid_request",
                param="input",
            )
        return strings


def _encoded(vector: Sequence[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return list(vector)
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()  # float32, little-endian


def parsed(
    raw: bytes, models: Sequence[str], limits: GatewayLimits
) -> tuple[EmbeddingRequest, list[RequestAccepted]]:
    """The request ``raw`` and one request for the pipeline per text; OpenAIError (400, 404) if wrong."""
    body = validated(EmbeddingRequest, raw, models)
    if (name := body.refused_field()) is not None:
        raise OpenAIError(
            400, f"{name} is not supported by this server", code="unsupported_parameter", param=name
        )
    payloads = [
        RequestAccepted(prompt=text, max_tokens=1, embed=True, metadata={"api": "openai.embeddings"})
        for text in body.texts(limits)
    ]
    return body, payloads


def answered(views: Sequence[RequestView], model: str, encoding: str = "float") -> dict[str, Any]:
    """The embeddings response for ``views`` (ended, in input order); OpenAIError if one has none."""
    data: list[dict[str, Any]] = []
    for index, view in enumerate(views):
        if view.embedding is None:  # cancelled before the model answered
            raise OpenAIError(500, f"request {view.id} ended without an embedding", code="no_embedding")
        data.append({"object": "embedding", "index": index, "embedding": _encoded(view.embedding, encoding)})
    tokens = sum(view.usage.prompt_tokens for view in views if view.usage is not None)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def add_embeddings_routes(
    app: FastAPI, core: GatewayCore, *, models: Sequence[str], limits: GatewayLimits
) -> None:
    tenant_of_key = Depends(core.tenant_dependency(OpenAIError.refused))

    @app.post(
        "/v1/embeddings",
        tags=["openai"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": EmbeddingRequest.model_json_schema()}},
            }
        },
    )
    async def embeddings(request: Request, tenant: str = tenant_of_key) -> JSONResponse:
        """Each input's embedding, from the model asked for (a model that makes none answers 400)."""
        body, payloads = parsed(await request.body(), models, limits)
        rids = await accept_all(core, payloads, tenant=tenant, model=body.model)
        views = await asyncio.gather(
            *(ended(core, rid, tenant, limits.max_completion_seconds) for rid in rids)
        )
        return JSONResponse(answered(views, body.model, body.encoding_format))
