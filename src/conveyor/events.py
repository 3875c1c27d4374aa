"""The event envelope: CloudEvents 1.0 attributes plus Conveyor's routing fields.

On the wire the envelope travels in broker headers (CloudEvents binary content mode,
``ce-`` prefixed) and the payload is the message body, so a broker, a tracing
proxy or a CloudEvents SDK can route and read events without knowing our schemas.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel

from conveyor.errors import InvalidEventError
from conveyor.ids import derive_id, new_id

SPEC_VERSION = "1.0"


class Topic(StrEnum):
    """The topics of the built-in pipeline (DESIGN.md §2). [callbacks] carries the outcomes of
    the requests that asked to be called back, and only those."""

    REQUESTS = "requests"
    PREPARED = "prepared"
    GENERATED = "generated"
    COMPLETED = "completed"
    STREAM = "stream"
    PROGRESS = "progress"
    CONTROL = "control"
    DLQ = "dlq"
    CALLBACKS = "callbacks"


def model_token(model: str) -> str:
    """``model`` as it names a topic and a stage: lower case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")


def prepared_topic(model: str) -> str:
    """Where the prepared requests for ``model`` wait for generate: [prepared] for the deployment's
    default model (``""``: events name no other), a topic of its own for each other model, so
    each model's requests are consumed, scaled and counted as a backlog on their own."""
    return f"{Topic.PREPARED}-{model_token(model)}" if model else Topic.PREPARED


def generate_group(model: str) -> str:
    """The generate stage (and consumer group) of ``model``'s requests, named as its topic is."""
    return f"generate-{model_token(model)}" if model else "generate"


def background_topic(topic: str) -> str:
    """Where the requests of positive priority (background work: a batch's) wait instead of
    ``topic``: the generate stage takes a few of them at a time, so they never stand in front of
    interactive requests, however many they are."""
    return f"background-{topic}"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """One immutable event. ``data`` is the JSON-encoded payload."""

    id: str
    type: str
    source: str
    request_id: str
    key: str
    data: bytes
    time: str = ""
    dataschema: str = ""
    tenant: str = "default"
    causation_id: str = ""
    attempt: int = 0
    deadline: float | None = None
    priority: int = 0
    model: str = ""
    model_version: str = ""
    model_license: str = ""
    traceparent: str = ""
    redrive: str = ""  # sent back from the dead-letter topic: only this stage handles it
    callback: str = ""  # the URL told of the request's outcome (stages/deliver.py), if any
    batch: str = ""  # a Batch API request's batch and line (batch_progress.py)
    # The blob holding ``data`` when it was too large for the log (log/claim_check.py): set only
    # between publishing and reading; an event read with it still set lost its payload.
    dataref: str = ""

    @property
    def subject(self) -> str:
        """The CloudEvents subject is the request the event belongs to."""
        return self.request_id

    def derive(self, *, type: str, source: str, payload: BaseModel, label: str) -> Envelope:
        """An output caused by this event: same request, key, tenant and trace; deterministic id."""
        # Spelled out rather than dataclasses.replace, which costs twice as much on every hop.
        return Envelope(
            id=derive_id(self.id, label),
            type=type,
            source=source,
            request_id=self.request_id,
            key=self.key,
            data=encode_payload(payload),
            time=now_rfc3339(),
            dataschema=schema_uri(type, payload),
            tenant=self.tenant,
            causation_id=self.id,
            attempt=0,
            deadline=self.deadline,
            priority=self.priority,
            model=self.model,
            model_version=self.model_version,
            model_license=self.model_license,
            traceparent=self.traceparent,
            callback=self.callback,
            batch=self.batch,
        )

    def to_headers(self) -> dict[str, str]:
        """CloudEvents binary-mode headers; attributes at their default value are left out
        (every header costs parsing on every hop)."""
        headers = {
            "ce-specversion": SPEC_VERSION,
            "ce-id": self.id,
            "ce-type": self.type,
            "ce-source": self.source,
            "ce-subject": self.request_id,
            "ce-time": self.time,
            "ce-dataschema": self.dataschema,
        }
        optional = {
            "ce-partitionkey": "" if self.key == self.request_id else self.key,
            "ce-tenant": "" if self.tenant == "default" else self.tenant,
            "ce-causationid": self.causation_id,
            "ce-attempt": str(self.attempt) if self.attempt else "",
            "ce-priority": str(self.priority) if self.priority else "",
            "ce-deadline": "" if self.deadline is None else repr(self.deadline),
            "ce-model": self.model,
            "ce-modelversion": self.model_version,
            "ce-modellicense": self.model_license,
            "traceparent": self.traceparent,
            "ce-redrive": self.redrive,
            "ce-callback": self.callback,
            "ce-batch": self.batch,
            "ce-dataref": self.dataref,
        }
        headers.update({k: v for k, v in optional.items() if v})
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None, body: bytes) -> Envelope:
        """Decode a wire event; raises InvalidEventError naming what is missing or wrong."""
        h = headers or {}
        missing = [k for k in ("ce-id", "ce-type", "ce-source", "ce-subject") if not h.get(k)]
        if missing:
            raise InvalidEventError(f"not a Conveyor event: missing headers {', '.join(missing)}")
        try:
            deadline = float(h["ce-deadline"]) if h.get("ce-deadline") else None
            return cls(
                id=h["ce-id"],
                type=h["ce-type"],
                source=h["ce-source"],
                request_id=h["ce-subject"],
                key=h.get("ce-partitionkey") or h["ce-subject"],
                data=body,
                time=h.get("ce-time", ""),
                dataschema=h.get("ce-dataschema", ""),
                tenant=h.get("ce-tenant") or "default",
                causation_id=h.get("ce-causationid", ""),
                attempt=int(h.get("ce-attempt") or 0),
                deadline=deadline,
                priority=int(h.get("ce-priority") or 0),
                model=h.get("ce-model", ""),
                model_version=h.get("ce-modelversion", ""),
                model_license=h.get("ce-modellicense", ""),
                traceparent=h.get("traceparent", ""),
                redrive=h.get("ce-redrive", ""),
                callback=h.get("ce-callback", ""),
                batch=h.get("ce-batch", ""),
                dataref=h.get("ce-dataref", ""),
            )
        except ValueError as exc:
            raise InvalidEventError(f"malformed event header: {exc}") from exc


_second: tuple[int, str] = (0, "")  # the last whole second formatted, and its text


def now_rfc3339() -> str:
    """UTC now, e.g. ``2026-11-27T07:49:16.848573Z``. Every event is stamped: the date and time
    of day are formatted once per second, not per call."""
    global _second
    whole, micros = divmod(time.time_ns() // 1000, 1_000_000)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{micros:06d}Z"


def encode_payload(payload: BaseModel) -> bytes:
    return orjson.dumps(payload.model_dump(mode="json"))


def schema_uri(type: str, payload: BaseModel) -> str:
    version = getattr(payload, "schema_version", 1)
    return f"urn:conveyor:schema:{type}:v{version}"


def new_event(
    *,
    type: str,
    source: str,
    payload: BaseModel,
    request_id: str | None = None,
    key: str | None = None,
    **attributes: Any,
) -> Envelope:
    """A new root event (no cause): a fresh time-sortable id."""
    event_id = new_id()
    rid = request_id or event_id
    return Envelope(
        id=event_id,
        type=type,
        source=source,
        request_id=rid,
        key=key or rid,
        data=encode_payload(payload),
        dataschema=schema_uri(type, payload),
        time=now_rfc3339(),
        **attributes,
    )
