"""Versioned payload schemas of the built-in pipeline and their registry.

Each event type maps to one pydantic model per schema version. The registry exports
JSON Schema (``conveyor schemas``); ``schemas/events.json`` holds the committed
snapshot and a test fails when a change would break readers of events already in
the log (a removed or retyped field, a new required field).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conveyor.errors import InvalidEventError


class Payload(BaseModel):
    """Base of every payload: immutable, unknown fields ignored so old readers accept newer writers."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    schema_version: ClassVar[int] = 1


class Usage(Payload):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those the model found already computed in its cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


FinishReason = Literal["stop", "length", "cancelled", "deadline", "tool_calls"]


class TopLogprob(Payload):
    token: str
    logprob: float


class TokenLogprob(Payload):
    """One generated token as the model weighed it: its log probability (the model's own, before
    sampling's adjustments) and, if asked for, the likeliest tokens it could have been."""

    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ToolCall(Payload):
    """The model asks the client to call function ``name`` with ``arguments`` (JSON text)."""

    id: str
    name: str
    arguments: str


class Tool(Payload):
    """A function the model may call; ``parameters`` is the JSON Schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


def checked_image_url(url: str) -> str:
    """``url`` if it can name an image for a model; ValueError saying why not."""
    if not url.startswith(("https://", "http://", "data:image/")):
        raise ValueError(f"an image URL must be https://… or data:image/…;base64,…, not {url[:40]!r}")
    if url.startswith("data:") and ";base64," not in url[:100]:
        raise ValueError("an inline image must be base64: data:image/TYPE;base64,DATA")
    return url


class ContentPart(Payload):
    """A piece of a turn that is more than text: its text, or an image by URL (``https:``, or a
    ``data:image/…;base64,`` URL that carries the image itself), as the client ordered them."""

    type: Literal["text", "image"]
    text: str = ""
    url: str = ""
    detail: Literal["auto", "low", "high"] | None = None  # how closely the model should look

    @classmethod
    def image(cls, url: str, detail: Literal["auto", "low", "high"] | None = None) -> ContentPart:
        return cls(type="image", url=checked_image_url(url), detail=detail)

    @classmethod
    def of_text(cls, text: str) -> ContentPart:
        return cls(type="text", text=text)


class ChatMessage(Payload):
    """One turn: an assistant turn may carry the calls it made, a ``tool`` turn answers one of them.
    A turn with images has them in ``parts``, between its pieces of text; ``content`` is its text."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    parts: list[ContentPart] = Field(default_factory=list)  # only for a turn with images

    @property
    def images(self) -> int:
        return sum(part.type == "image" for part in self.parts)


class Sampling(Payload):
    """How to pick tokens: temperature 0 is greedy. Above 0, ``seed`` picks the random draws: one
    seed and one request give one text; without it they follow from the request's id."""

    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    # OpenAI's penalties on tokens already generated: once for being there, and per occurrence.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Added to the logits of these token ids (the model's own), as OpenAI's logit_bias.
    logit_bias: dict[int, float] = Field(default_factory=dict)
    # The answer must be JSON text matching this JSON Schema ({"type": "object"}: any object).
    json_schema: dict[str, Any] | None = None
    # Functions the model may call instead of answering: "auto" lets it choose, "required" makes
    # it call one (``tool_name``, if set), "none" forbids it.
    tools: list[Tool] = Field(default_factory=list)
    tool_choice: Literal["auto", "none", "required"] = "auto"
    tool_name: str | None = None
    # Report each token's log probability and that of the ``logprobs`` likeliest (None: do not).
    logprobs: int | None = None


class RequestAccepted(Payload):
    """``request.accepted`` on [requests]: what the client asked for.

    ``prompt`` is the text to answer; a chat request also carries its ``messages`` (the
    prompt is then the last user message) and the model sees the whole conversation.
    """

    prompt: str
    max_tokens: int = 256
    metadata: dict[str, Any] = Field(default_factory=dict)
    messages: list[ChatMessage] = Field(default_factory=list)
    sampling: Sampling = Field(default_factory=Sampling)
    continuation: bool = False  # a text completion: see RequestPrepared
    embed: bool = False  # the prompt's embedding is asked for: see RequestPrepared


class RequestPrepared(Payload):
    """``request.prepared`` on [prepared]: the prompt after safety checks and redaction.

    ``continuation``: the model continues ``prompt`` as it is, without its chat template (a text
    completion), and its text is kept as it is. ``embed``: the model answers with the prompt's
    embedding (a vector) instead of text.
    """

    prompt: str
    max_tokens: int = 256
    redactions: dict[str, int] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    messages: list[ChatMessage] = Field(default_factory=list)
    sampling: Sampling = Field(default_factory=Sampling)
    continuation: bool = False
    embed: bool = False


class GenerationStarted(Payload):
    """``generation.started`` on [progress]: the model took the request, in process ``worker``
    (``host/pid``)."""

    worker: str = ""


class TokenChunk(Payload):
    """``token.chunk`` on [stream]: ``text`` starts at character ``offset`` of the generated text.

    Readers place chunks by offset, not by arrival: a generation redone after a
    crash may cut its chunks differently, and its chunks overlap the first run's.
    ``index`` counts the chunks of one run; the last one has ``final``.
    """

    index: int
    offset: int
    text: str
    final: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = Field(default_factory=list)  # of the tokens of ``text``, if asked for


class GenerationCompleted(Payload):
    """``generation.completed`` on [generated]: the full text, the calls the model made, and what
    it cost."""

    text: str
    finish_reason: FinishReason = "stop"
    usage: Usage = Field(default_factory=Usage)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # of every token of ``text``, if asked for
    continuation: bool = False  # the text continues the prompt: it is not post-processed
    embedding: list[float] | None = None  # the prompt's, when it was asked for (``text`` is empty)
    cached: bool = False  # the answer kept for an earlier request the same (the model did not run)


class RequestCompleted(Payload):
    """``request.completed`` on [completed]: the post-processed output, usage recorded."""

    output: str
    streamed_chars: int = Field(
        description="Length of the text streamed on [stream], before post-processing."
    )
    finish_reason: FinishReason = "stop"
    usage: Usage = Field(default_factory=Usage)
    generated_at: str | None = Field(
        default=None, description="When generation finished: the time of its generation.completed event."
    )
    tool_calls: list[ToolCall] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    embedding: list[float] | None = None  # the prompt's, when it was asked for
    cached: bool = False  # answered from the answer cache
    cost_usd: float | None = Field(
        default=None,
        description="What the request cost at its model's price when it was answered (None: no price set).",
    )


class RequestFailed(Payload):
    """``request.failed`` on [completed]: a policy or a stage refused or could not serve it."""

    code: str
    message: str
    stage: str


class CancelRequested(Payload):
    """``request.cancel_requested`` on [control]."""

    reason: str = "client"


class Attempt(Payload):
    attempt: int
    error: str
    at: str


class DeadLetter(Payload):
    """``event.dead_lettered`` on [dlq]: the original event and why it could not be handled."""

    stage: str
    topic: str
    error: str
    attempts: list[Attempt] = Field(default_factory=list)
    original_headers: dict[str, str] = Field(default_factory=dict)
    original_body: str = ""
    # The stage's refusal code, when it rejected the request (RejectedError): what the client is told.
    code: str = ""


P = TypeVar("P", bound=Payload)


class EventType:
    ACCEPTED = "request.accepted"
    PREPARED = "request.prepared"
    STARTED = "generation.started"
    TOKEN = "token.chunk"
    GENERATED = "generation.completed"
    COMPLETED = "request.completed"
    FAILED = "request.failed"
    CANCEL = "request.cancel_requested"
    DEAD_LETTER = "event.dead_lettered"


REGISTRY: dict[str, dict[int, type[Payload]]] = {
    EventType.ACCEPTED: {1: RequestAccepted},
    EventType.PREPARED: {1: RequestPrepared},
    EventType.STARTED: {1: GenerationStarted},
    EventType.TOKEN: {1: TokenChunk},
    EventType.GENERATED: {1: GenerationCompleted},
    EventType.COMPLETED: {1: RequestCompleted},
    EventType.FAILED: {1: RequestFailed},
    EventType.CANCEL: {1: CancelRequested},
    EventType.DEAD_LETTER: {1: DeadLetter},
}


def decode(model: type[P], data: bytes) -> P:
    """Validate a JSON body against ``model``; a permanent error says which field is wrong."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidEventError(f"invalid {model.__name__}: {problems}") from exc


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every registered schema as JSON Schema, keyed by event type then ``v<version>``."""
    return {
        event_type: {f"v{v}": model.model_json_schema() for v, model in sorted(versions.items())}
        for event_type, versions in sorted(REGISTRY.items())
    }
