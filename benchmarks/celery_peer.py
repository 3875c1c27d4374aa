"""The peer a user would pick instead: the same steps as a Celery chain on Redis, behind FastAPI.

What a typical Celery service looks like: prefork workers; Redis (here Valkey) as broker and result
backend; late acks, so a task a dying worker held is run again, as Conveyor's events are; a chain
prepare → generate → finalize, only the last step's result stored; the usage record written once
per request with SET NX; the HTTP API of Conveyor's gateway (``POST /v1/requests[?wait=]``,
``GET /v1/requests/{id}?wait=``), so that ``pipeline.py`` drives both with one load generator, the
wait being ``AsyncResult.get`` in a thread. The steps call the same functions as Conveyor's stages:
safety policy, PII redaction, the simulated model, post-processing. There is no read model, stream,
dedupe record or dead-letter topic: it does less per request than Conveyor.

``pipeline.py`` starts ``celery -A celery_peer worker`` and ``uvicorn celery_peer:api`` with
``CELERY_PEER_REDIS`` naming the Valkey server it started.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
import celery.exceptions
import orjson
import redis
from celery import Celery
from celery.result import AsyncResult
from fastapi import FastAPI
from pydantic import BaseModel

from conveyor.models.simulated import SimulatedModel
from conveyor.stages.finalize import postprocess
from conveyor.stages.prepare import SafetyPolicy
from conveyor.stages.redact import redact

URL = os.environ.get("CELERY_PEER_REDIS", "redis://127.0.0.1:6379/0")

worker = Celery("celery_peer", broker=URL, backend=URL)
worker.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
_policy, _model = SafetyPolicy(), SimulatedModel()
_ledger = redis.Redis.from_url(URL)


# The steps before the last pass their result on in the chain's next message: not stored.
@worker.task(ignore_result=True)  # type: ignore[untyped-decorator]
def prepare(body: dict[str, Any]) -> dict[str, Any]:
    if (blocked := _policy.violation(body["prompt"])) is not None:
        raise ValueError(f"the prompt was refused by the safety policy (matched {blocked!r})")
    prompt, _ = redact(body["prompt"])
    return {**body, "prompt": prompt}


@worker.task(ignore_result=True)  # type: ignore[untyped-decorator]
def generate(prepared: dict[str, Any]) -> dict[str, Any]:
    tokens, finish = _model.answer(prepared["prompt"], prepared["max_tokens"])
    return {**prepared, "text": "".join(tokens), "finish_reason": finish, "completion_tokens": len(tokens)}


@worker.task  # type: ignore[untyped-decorator]
def finalize(generated: dict[str, Any]) -> dict[str, Any]:
    usage = {"request_id": generated["id"], "completion_tokens": generated["completion_tokens"]}
    _ledger.set(f"usage:{generated['id']}", orjson.dumps(usage), nx=True)  # billed once
    return {"id": generated["id"], "status": "completed", "output": postprocess(generated["text"])}


class Submission(BaseModel):
    prompt: str
    max_tokens: int = 256


@contextlib.asynccontextmanager
async def _threads(_: FastAPI) -> AsyncIterator[None]:
    # Every waiting client holds a thread: room for the load generator's 256 in flight.
    anyio.to_thread.current_default_thread_limiter().total_tokens = 512
    yield


api = FastAPI(lifespan=_threads)


@api.post("/v1/requests", status_code=202)
def submit(body: Submission, wait: float = 0.0) -> dict[str, Any]:
    rid = uuid.uuid4().hex
    steps = prepare.s({"id": rid, **body.model_dump()}) | generate.s() | finalize.s().set(task_id=rid)
    steps.apply_async()
    return status(rid, wait) if wait else {"id": rid}


@api.get("/v1/requests/{rid}")
def status(rid: str, wait: float = 0.0) -> dict[str, Any]:
    result = AsyncResult(rid, app=worker)
    try:
        return dict(result.get(timeout=wait)) if wait else dict(result.result or {"status": "accepted"})
    except celery.exceptions.TimeoutError:
        return {"id": rid, "status": "accepted"}
