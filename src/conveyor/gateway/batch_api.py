"""OpenAI's Files and Batch APIs: a file of requests answered in the background, through the pipeline.

Each line of a batch's input file (a chat completion, a text completion, or an embedding of one
text) becomes one request, accepted onto the log like any other (prepared, generated, finalized,
billed once) with priority ``PRIORITY``: background work, which waits on a topic of its own and never
stands in front of interactive requests (``background_topic``). Its deadline is the end of the
completion window. A line's request id is derived from the batch's id and the line's number: the batch keeps
no list of them, and publishing its lines again (a gateway that died halfway through, its batch
left ``validating``, is finished by the next one to read it) adds nothing, since the log and the
stages drop what they already have. Progress is the projector's (batch_progress.py): reading a
batch reads a record per 1,024 lines, not each line's view. The output and error files are written
once every request has ended, from their views, read then and once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol

import orjson
from fastapi import Depends, FastAPI, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from conveyor.batch_progress import line_tag, read_progress
from conveyor.events import Envelope, Topic, new_event
from conveyor.files import Files, StoredFile, dumps
from conveyor.gateway import embeddings_api as embeddings
from conveyor.gateway.core import SOURCE, GatewayCore, GatewayLimits, Refused
from conveyor.gateway.openai_api import CHAT, TEXT, Endpoint, OpenAIError
from conveyor.ids import derive_id, new_id
from conveyor.observability.tracing import current_traceparent
from conveyor.payloads import CancelRequested, EventType, RequestAccepted
from conveyor.projector import read_view
from conveyor.store.base import Namespace
from conveyor.view import RequestView

FILES_PATH = "/v1/files"
PRIORITY = 5  # background work: after interactive requests (0) where requests wait for a slot
WINDOW = 24 * 3600.0  # "24h", the one completion window
MAX_LINES = 50_000


class _Lines(Protocol):
    """What the lines of a batch for one endpoint ask, and how their answers are written."""

    @property
    def path(self) -> str: ...

    def request(
        self, raw: bytes, models: Sequence[str], limits: GatewayLimits
    ) -> tuple[str, RequestAccepted]:
        """(the model asked for, the request for the pipeline); ValueError or OpenAIError if wrong."""
        ...

    def answer(self, view: RequestView, model: str, created: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class _Completions:
    endpoint: Endpoint[Any]

    @property
    def path(self) -> str:
        return self.endpoint.path

    def request(
        self, raw: bytes, models: Sequence[str], limits: GatewayLimits
    ) -> tuple[str, RequestAccepted]:
        body, payload = self.endpoint.parse(raw, models, limits)
        if body.stream or body.n != 1:
            raise ValueError("stream and n are not for a batch: one answer per line")
        return body.model, payload

    def answer(self, view: RequestView, model: str, created: int) -> dict[str, Any]:
        return self.endpoint.wire(view.id, model, created, 0).whole([view])


class _Embeddings:
    path = "/v1/embeddings"

    def request(
        self, raw: bytes, models: Sequence[str], limits: GatewayLimits
    ) -> tuple[str, RequestAccepted]:
        body, payloads = embeddings.parsed(raw, models, limits)
        if len(payloads) != 1:
            raise ValueError("one text per line (input: a text, or a list of one)")
        return body.model, payloads[0]

    def answer(self, view: RequestView, model: str, created: int) -> dict[str, Any]:
        return embeddings.answered([view], model)


_ENDPOINTS: dict[str, _Lines] = {
    CHAT.path: _Completions(CHAT),
    TEXT.path: _Completions(TEXT),
    "/v1/embeddings": _Embeddings(),
}
_ENDED = ("completed", "failed", "cancelled", "expired")


class BatchCreate(BaseModel):
    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class Batch(BaseModel):
    """A batch's record: what it was asked, where it is, and its counts once it ended."""

    id: str
    tenant: str
    endpoint: str
    input_file_id: str
    created_at: int
    total: int
    metadata: dict[str, str] | None = None
    status: str = "validating"
    in_progress_at: int | None = None
    cancelling_at: int | None = None
    finalizing_at: int | None = None
    ended_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0

    def request_id(self, line: int) -> str:
        return derive_id(self.id.removeprefix("batch_"), f"line:{line}")

    def public(self, completed: int | None = None, failed: int | None = None) -> dict[str, Any]:
        """As OpenAI's Batch API describes a batch, with these counts (default: the record's)."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.created_at + int(WINDOW),
            "finalizing_at": self.finalizing_at,
            "completed_at": self.ended_at if self.status == "completed" else None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.ended_at if self.status == "cancelled" else None,
            "request_counts": {
                "total": self.total,
                "completed": self.completed if completed is None else completed,
                "failed": self.failed if failed is None else failed,
            },
            "metadata": self.metadata,
        }


class Batches:
    """Batches of one gateway: created, advanced as they are read, cancelled."""

    def __init__(self, core: GatewayCore, files: Files, models: Sequence[str], limits: GatewayLimits) -> None:
        self.core, self.files, self.models, self.limits = core, files, models, limits

    async def get(self, batch_id: str, tenant: str) -> tuple[Batch, int] | None:
        entry = await self.core.store.get(Namespace.BATCHES, batch_id) if _valid(batch_id) else None
        batch = Batch.model_validate_json(entry.value) if entry else None
        return (batch, entry.revision) if batch is not None and entry and batch.tenant == tenant else None

    async def create(self, asked: BatchCreate, tenant: str) -> Batch:
        try:  # a spent budget holds for a batch's thousands of requests as for one
            await self.core.check_budget(tenant)
        except Refused as exc:
            raise OpenAIError.refused(exc) from None
        stored = await self.files.get(asked.input_file_id, tenant)
        if stored is None:
            raise OpenAIError(
                404, f"no file {asked.input_file_id!r}", code="not_found", param="input_file_id"
            )
        batch = Batch(
            id=f"batch_{new_id()}",
            tenant=tenant,
            endpoint=asked.endpoint,
            input_file_id=stored.id,
            created_at=int(time.time()),
            total=0,
            metadata=asked.metadata,
        )
        lines = self._lines(batch, await self.files.content(stored))  # every line checked first
        batch = batch.model_copy(update={"total": len(lines)})
        revision = await self.core.store.create(Namespace.BATCHES, batch.id, batch.model_dump_json().encode())
        assert revision is not None  # a new id
        return (await self._submit(batch, revision, lines))[0]

    async def _submit(self, batch: Batch, revision: int, events: Sequence[Envelope]) -> tuple[Batch, int]:
        """Put the lines' requests on the log, then mark the batch in progress."""
        for start in range(0, len(events), 256):
            await self.core.log.publish(Topic.REQUESTS, events[start : start + 256])
        return await self._advance(batch, revision, status="in_progress", in_progress_at=int(time.time()))

    def _lines(self, batch: Batch, content: bytes) -> list[Envelope]:
        """The requests of a batch's input file; OpenAIError (400) naming the first wrong line."""
        endpoint = _ENDPOINTS[batch.endpoint]
        seen: set[str] = set()
        lines: list[Envelope] = []
        trace = current_traceparent()  # the call that made the batch, or read it on
        for number, raw in enumerate(content.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = _line(raw, endpoint.path, seen)
                model, payload = endpoint.request(orjson.dumps(line["body"]), self.models, self.limits)
                self.core.check_access(batch.tenant, model)
                index = len(lines)
                metadata = {**payload.metadata, "batch_id": batch.id, "custom_id": line["custom_id"]}
                event = new_event(
                    type=EventType.ACCEPTED,
                    source=SOURCE,
                    payload=payload.model_copy(update={"metadata": metadata}),
                    request_id=batch.request_id(index),
                    tenant=batch.tenant,
                    deadline=batch.created_at + WINDOW,
                    priority=PRIORITY,
                    model=self.core.route(model),
                    batch=line_tag(batch.id, index),
                    traceparent=trace,
                )
            except (OpenAIError, Refused) as exc:
                raise _wrong(number, exc.message) from None
            except (ValueError, KeyError, TypeError) as exc:
                raise _wrong(number, str(exc)) from None
            lines.append(dataclasses.replace(event, id=event.request_id))
            if len(lines) > MAX_LINES:
                raise _wrong(number, f"a batch has at most {MAX_LINES} requests")
        if not lines:
            raise OpenAIError(
                400, "the input file has no requests", code="invalid_request", param="input_file_id"
            )
        return lines

    async def current(self, batch: Batch, revision: int, *, wait: float = 0.0) -> dict[str, Any]:
        """The batch as it is now, advanced if it moved on; with ``wait``, once it has ended, or as it
        is after that many seconds."""
        if batch.status == "validating":  # its gateway died while submitting it: finish that
            stored = await self.files.get(batch.input_file_id, batch.tenant)
            if stored is None:
                raise OpenAIError(410, f"the input file of {batch.id} is gone", code="file_gone")
            batch, revision = await self._submit(
                batch, revision, self._lines(batch, await self.files.content(stored))
            )
        if batch.status in _ENDED:
            return batch.public()
        until = time.monotonic() + wait
        progress = await read_progress(self.core.store, batch.id, batch.total)
        while (line := progress.first_running) is not None and (left := until - time.monotonic()) > 0:
            view = await self.core.wait(batch.request_id(line), left, tenant=batch.tenant)
            if view is not None and view.terminal:
                # The projector marks the line just after it writes the view: moments later.
                await asyncio.sleep(0.02)
            progress = await read_progress(self.core.store, batch.id, batch.total)
        if progress.first_running is not None:
            return batch.public(progress.completed, progress.failed)
        return (await self._finish(batch, revision))[0].public()

    async def cancel(self, batch: Batch, revision: int) -> dict[str, Any]:
        if batch.status in _ENDED or batch.status == "cancelling":
            return batch.public()
        batch, _ = await self._advance(batch, revision, status="cancelling", cancelling_at=int(time.time()))
        progress = await read_progress(self.core.store, batch.id, batch.total)
        cancels = [
            new_event(
                type=EventType.CANCEL,
                source=SOURCE,
                payload=CancelRequested(reason="batch cancelled"),
                request_id=batch.request_id(line),
                tenant=batch.tenant,
                batch=line_tag(batch.id, line),
            )
            for line in progress.running()
        ]
        for start in range(0, len(cancels), 256):
            await self.core.log.publish(Topic.CONTROL, cancels[start : start + 256])
        return batch.public()

    async def _views(self, batch: Batch) -> list[RequestView]:
        """Each line's view (a line not projected yet, which only a redrive can make, is accepted)."""
        rids = [batch.request_id(i) for i in range(batch.total)]
        views: list[RequestView] = []
        for start in range(0, len(rids), 512):
            chunk = rids[start : start + 512]
            read = await asyncio.gather(*(read_view(self.core.store, rid) for rid in chunk))
            views += (v or RequestView(id=r, tenant=batch.tenant) for r, v in zip(chunk, read, strict=True))
        return views

    async def _finish(self, batch: Batch, revision: int) -> tuple[Batch, int]:
        """Write the output and error files of a batch whose requests all ended, and end it."""
        views = await self._views(batch)
        stored = await self.files.get(batch.input_file_id, batch.tenant)
        # Each line's name and model, as checked when the batch was made: no need to check them again.
        content = await self.files.content(stored) if stored is not None else b""
        lines = [orjson.loads(raw) for raw in content.splitlines() if raw.strip()]
        answered, errors = [], []
        created = int(time.time())
        for i, view in enumerate(views):
            custom_id, model = (
                (lines[i]["custom_id"], lines[i]["body"]["model"]) if i < len(lines) else (str(i), "")
            )
            line: dict[str, Any] = {"id": f"batch_req_{view.id}", "custom_id": custom_id}
            if view.status == "completed":
                body = _ENDPOINTS[batch.endpoint].answer(view, view.model or model, created)
                answered.append(
                    {
                        **line,
                        "response": {"status_code": 200, "request_id": view.id, "body": body},
                        "error": None,
                    }
                )
            else:
                code = view.error.code if view.error else view.status
                message = view.error.message if view.error else f"the request was {view.status}"
                errors.append({**line, "response": None, "error": {"code": code, "message": message}})
        hexid = batch.id.removeprefix("batch_")
        output = await self._result(batch, f"file-{hexid}-output", "batch_output.jsonl", answered)
        error = await self._result(batch, f"file-{hexid}-errors", "batch_errors.jsonl", errors)
        return await self._advance(
            batch,
            revision,
            status="cancelled" if batch.status == "cancelling" else "completed",
            finalizing_at=created,
            ended_at=int(time.time()),
            output_file_id=output.id if output else None,
            error_file_id=error.id if error else None,
            completed=len(answered),
            failed=len(errors),
        )

    async def _result(
        self, batch: Batch, file_id: str, name: str, lines: list[dict[str, Any]]
    ) -> StoredFile | None:
        if not lines:
            return None
        return await self.files.save(batch.tenant, name, "batch_output", dumps(lines), file_id=file_id)

    async def _advance(self, batch: Batch, revision: int, **changes: Any) -> tuple[Batch, int]:
        """Write ``changes``; if another gateway moved the batch on first, its record is the answer."""
        moved = batch.model_copy(update=changes)
        written = await self.core.store.update(
            Namespace.BATCHES, batch.id, moved.model_dump_json().encode(), revision
        )
        if written is not None:
            return moved, written
        return await self.get(batch.id, batch.tenant) or (moved, revision)

    async def listed(self, tenant: str) -> list[Batch]:
        keys = await self.core.store.keys(Namespace.BATCHES)
        found = await asyncio.gather(*(self.get(key, tenant) for key in keys))
        return sorted((f[0] for f in found if f is not None), key=lambda b: (-b.created_at, b.id))


def _line(raw: bytes, path: str, seen: set[str]) -> dict[str, Any]:
    line = orjson.loads(raw)
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str) or not line["custom_id"]:
        raise ValueError("each line is an object with a custom_id, a method, a url and a body")
    if line["custom_id"] in seen:
        raise ValueError(f"custom_id {line['custom_id']!r} is used twice")
    seen.add(line["custom_id"])
    if line.get("method") != "POST" or line.get("url") != path:
        raise ValueError(f"each line must be a POST to the batch's endpoint, {path}")
    if not isinstance(line.get("body"), dict):
        raise ValueError("the body is not an object")
    return line


def _wrong(number: int, why: str) -> OpenAIError:
    return OpenAIError(400, f"input file line {number}: {why}", code="invalid_request", param="input_file_id")


def _valid(batch_id: str) -> bool:
    return batch_id.startswith("batch_") and batch_id[6:].replace("-", "").isalnum()


def add_batch_routes(
    app: FastAPI, core: GatewayCore, *, models: Sequence[str], limits: GatewayLimits
) -> None:
    files = Files(core.store)
    batches = Batches(core, files, models, limits)
    tenant_of_key = Depends(core.tenant_dependency(OpenAIError.refused))

    async def owned(file_id: str, tenant: str) -> StoredFile:
        stored = await files.get(file_id, tenant)
        if stored is None:
            raise OpenAIError(404, f"no file {file_id!r}", code="not_found")
        return stored

    async def batch_of(batch_id: str, tenant: str) -> tuple[Batch, int]:
        found = await batches.get(batch_id, tenant)
        if found is None:
            raise OpenAIError(404, f"no batch {batch_id!r}", code="not_found")
        return found

    @app.post(FILES_PATH, tags=["openai batch"])
    async def upload(
        file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()], tenant: str = tenant_of_key
    ) -> dict[str, Any]:
        """Upload a file (a batch's input: JSON Lines, purpose "batch")."""
        content = await file.read()
        return (await files.save(tenant, file.filename or "upload", purpose, content)).public()

    @app.get(FILES_PATH, tags=["openai batch"])
    async def list_files(tenant: str = tenant_of_key) -> dict[str, Any]:
        return {"object": "list", "data": [f.public() for f in await files.listed(tenant)], "has_more": False}

    @app.get(FILES_PATH + "/{file_id}", tags=["openai batch"])
    async def file_info(file_id: str, tenant: str = tenant_of_key) -> dict[str, Any]:
        return (await owned(file_id, tenant)).public()

    @app.get(FILES_PATH + "/{file_id}/content", tags=["openai batch"])
    async def file_content(file_id: str, tenant: str = tenant_of_key) -> Response:
        return Response(await files.content(await owned(file_id, tenant)), media_type="application/jsonl")

    @app.delete(FILES_PATH + "/{file_id}", tags=["openai batch"])
    async def delete_file(file_id: str, tenant: str = tenant_of_key) -> dict[str, Any]:
        await files.delete(await owned(file_id, tenant))
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches", tags=["openai batch"])
    async def create_batch(asked: BatchCreate, tenant: str = tenant_of_key) -> JSONResponse:
        """Answer every line of an uploaded file in the background (see the module's docs)."""
        return JSONResponse((await batches.create(asked, tenant)).public())

    @app.get("/v1/batches/{batch_id}", tags=["openai batch"])
    async def retrieve_batch(
        batch_id: str,
        wait: Annotated[
            float, Query(ge=0, description="Not OpenAI's: wait up to this many seconds for the batch to end.")
        ] = 0.0,
        tenant: str = tenant_of_key,
    ) -> dict[str, Any]:
        batch, revision = await batch_of(batch_id, tenant)
        return await batches.current(batch, revision, wait=min(wait, limits.max_wait_seconds))

    @app.post("/v1/batches/{batch_id}/cancel", tags=["openai batch"])
    async def cancel_batch(batch_id: str, tenant: str = tenant_of_key) -> dict[str, Any]:
        return await batches.cancel(*await batch_of(batch_id, tenant))

    @app.get("/v1/batches", tags=["openai batch"])
    async def list_batches(
        limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None, tenant: str = tenant_of_key
    ) -> dict[str, Any]:
        listed = await batches.listed(tenant)
        if after is not None:
            ids = [b.id for b in listed]
            listed = listed[ids.index(after) + 1 :] if after in ids else []
        page = listed[:limit]
        return {
            "object": "list",
            "data": [b.public() for b in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(listed) > limit,
        }
