"""The per-request read model: what ``GET /v1/requests/{id}`` returns.

``fold`` applies one event to a view. It is idempotent and order-tolerant: status
only moves forward (accepted < prepared < generating < terminal) and the first
terminal status wins (but a completion wins over a dead letter: the request was
sent back and finished), so redeliveries and events from different topics arriving
in any order converge on the same view.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from conveyor.events import Envelope
from conveyor.payloads import (
    DeadLetter,
    EventType,
    GenerationCompleted,
    RequestCompleted,
    RequestFailed,
    TokenLogprob,
    ToolCall,
    Usage,
    decode,
)

Status = Literal["accepted", "prepared", "generating", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
_OUTCOME = ("id", "status", "output", "tool_calls", "finish_reason", "usage", "cost_usd", "error", "model")
_HIDDEN = {"cancel_requested", "batch"}  # bookkeeping, not for clients
_RANK = {"accepted": 0, "prepared": 1, "generating": 2, "completed": 3, "failed": 3, "cancelled": 3}


class ErrorInfo(BaseModel):
    code: str
    message: str
    stage: str = ""


class RequestView(BaseModel):
    """One request as the status API shows it, folded from its events by the projector."""

    model_config = ConfigDict(extra="ignore")

    id: str
    status: Status = "accepted"
    tenant: str = "default"
    output: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)  # the functions the model asks to call
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # of each token of the output, if asked for
    embedding: list[float] | None = None  # the prompt's, if that was asked for instead of text
    cached: bool = False  # answered from the answer cache (the model did not run)
    cost_usd: float | None = None  # at its model's price (None: the model has none)
    streamed_chars: int | None = None
    stages: dict[str, dict[str, str]] = Field(default_factory=dict)
    usage: Usage | None = None
    error: ErrorInfo | None = None
    model: str | None = None
    cancel_requested: bool = False
    batch: str = ""  # the Batch API line it answers (batch_progress.py); not shown

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def outcome(self) -> dict[str, Any]:
        """How it ended, without the stage timestamps (which may still be filling in): what the
        final event of its stream and its callback carry."""
        public = self.public()
        return {k: public[k] for k in _OUTCOME}

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=_HIDDEN)

    def public_json(self) -> bytes:
        return self.model_dump_json(exclude=_HIDDEN).encode()


def _advance(view: RequestView, status: Status) -> None:
    if view.terminal:
        return
    if _RANK[status] >= _RANK[view.status]:
        view.status = status


def _dead_lettered(view: RequestView, stage: str) -> bool:
    return "dead_lettered_at" in view.stages.get(stage, {})


def _stamp(view: RequestView, stage: str, mark: str, at: str) -> None:
    view.stages.setdefault(stage, {}).setdefault(mark, at)


def fold(view: RequestView | None, event: Envelope) -> RequestView:
    """The view after ``event`` (a new object; the input is not modified)."""
    if view is None:
        v = RequestView(id=event.request_id, tenant=event.tenant)
    else:  # the only nested value fold mutates is ``stages``: copy that, share the rest
        v = view.model_copy(update={"stages": {k: dict(marks) for k, marks in view.stages.items()}})
    at = event.time
    if event.batch:
        v.batch = event.batch
    match event.type:
        case EventType.ACCEPTED:
            _stamp(v, "gateway", "accepted_at", at)
            v.model = v.model or event.model or None  # the one asked for, until another answers
        case EventType.PREPARED:
            _advance(v, "prepared")
            _stamp(v, "prepare", "finished_at", at)
        case EventType.STARTED:
            _advance(v, "generating")
            _stamp(v, "generate", "started_at", at)
            v.model = v.model or event.model or None
        case EventType.GENERATED:
            generated = decode(GenerationCompleted, event.data)
            _advance(v, "generating")
            _stamp(v, "generate", "finished_at", at)
            v.streamed_chars = len(generated.text)
        case EventType.COMPLETED:
            completed = decode(RequestCompleted, event.data)
            _stamp(v, "finalize", "finished_at", at)
            if completed.generated_at:
                _stamp(v, "generate", "finished_at", completed.generated_at)
            v.output, v.usage, v.streamed_chars = completed.output, completed.usage, completed.streamed_chars
            v.finish_reason, v.tool_calls = completed.finish_reason, completed.tool_calls
            v.logprobs, v.embedding, v.cached = completed.logprobs, completed.embedding, completed.cached
            v.cost_usd = completed.cost_usd
            v.model = event.model or v.model
            if v.status == "failed" and v.error is not None and _dead_lettered(v, v.error.stage):
                # Redriven from the dead-letter topic and finished after all (in whichever order
                # the two arrive, the completion stands; the dead letter stays in ``stages``).
                v.status, v.error = "generating", None
            # Whether a cancel won the race with the last token is the generator's call.
            cancelled = completed.finish_reason in ("cancelled", "deadline")
            _advance(v, "cancelled" if cancelled else "completed")
        case EventType.FAILED:
            failed = decode(RequestFailed, event.data)
            _stamp(v, failed.stage, "failed_at", at)
            if not v.terminal:
                v.error = ErrorInfo(code=failed.code, message=failed.message, stage=failed.stage)
            _advance(v, "failed")
        case EventType.CANCEL:
            v.cancel_requested = True
            _stamp(v, "gateway", "cancel_requested_at", at)
            if not v.terminal and v.status != "generating":
                # Generation stops at its next token and reports; before that, nothing runs.
                _advance(v, "cancelled")
        case EventType.DEAD_LETTER:
            letter = decode(DeadLetter, event.data)
            _stamp(v, letter.stage, "dead_lettered_at", at)
            if not v.terminal:
                # A refusal's own code (e.g. context_length_exceeded) tells the client what to fix.
                v.error = ErrorInfo(
                    code=letter.code or "dead_lettered", message=letter.error, stage=letter.stage
                )
            _advance(v, "failed")
    return v
