"""prepare: validate the request, apply the safety policy, redact PII."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence

from conveyor.events import Envelope, Topic, background_topic, prepared_topic
from conveyor.payloads import ChatMessage, EventType, RequestAccepted, RequestFailed, RequestPrepared, decode
from conveyor.pipeline import Output, Stage, StageContext
from conveyor.stages.deliver import settled
from conveyor.stages.redact import redact

# A deliberately small default; real deployments pass their own list (--blocklist-file).
DEFAULT_BLOCKLIST = ("build a bomb", "make a bomb", "synthesize nerve agent", "credit card dump")


@dataclasses.dataclass(frozen=True, slots=True)
class SafetyPolicy:
    """Rejects prompts containing a blocked phrase (case-insensitive, on word boundaries)."""

    blocklist: tuple[str, ...] = DEFAULT_BLOCKLIST
    _patterns: tuple[tuple[str, re.Pattern[str]], ...] = dataclasses.field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        patterns = []
        for phrase in self.blocklist:
            if words := r"\s+".join(re.escape(w) for w in phrase.split()):
                patterns.append((phrase, re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)))
        object.__setattr__(self, "_patterns", tuple(patterns))  # compiled once, not per prompt

    def violation(self, prompt: str) -> str | None:
        return next((phrase for phrase, pattern in self._patterns if pattern.search(prompt)), None)


# A prompt longer than this (characters) is screened on a thread: the patterns take about half a
# second of CPU per million characters, which the worker's other events and heartbeats must not wait.
_ON_A_THREAD = 256 * 1024


def _screened(
    request: RequestAccepted, policy: SafetyPolicy
) -> str | tuple[str, dict[str, int], list[ChatMessage]]:
    """The blocked phrase ``request`` contains; else its prompt and turns with PII redacted, and how
    many of each kind were found."""
    texts = [request.prompt, *(m.content for m in request.messages)]
    blocked = next((b for t in texts if (b := policy.violation(t)) is not None), None)
    if blocked is not None:
        return blocked
    prompt, redactions = redact(request.prompt)

    def redacted(text: str) -> str:
        text, found = redact(text)
        for kind, n in found.items():
            redactions[kind] = redactions.get(kind, 0) + n
        return text

    messages = []
    for message in request.messages:
        # An earlier call's arguments are part of the prompt too.
        calls = [
            call.model_copy(update={"arguments": redacted(call.arguments)}) for call in message.tool_calls
        ]
        # A turn with images: its text is its text parts, each redacted once.
        parts = [
            part.model_copy(update={"text": redacted(part.text)}) if part.type == "text" else part
            for part in message.parts
        ]
        content = "".join(p.text for p in parts) if parts else redacted(message.content)
        messages.append(message.model_copy(update={"content": content, "tool_calls": calls, "parts": parts}))
    return prompt, redactions, messages


def prepare_stage(policy: SafetyPolicy = SafetyPolicy(), *, routes: Mapping[str, str] | None = None) -> Stage:
    """``routes``: what the events of a request for each model served name as its model, by the
    model's id (``""`` for the default one); a request naming another fails. None: no check, every
    request goes by the model it names."""
    # A request names its model by route, or by id (the default one's too).
    lookup = None if routes is None else {**{r: r for r in routes.values()}, **routes}

    async def handle(ctx: StageContext, event: Envelope) -> Sequence[Output]:
        request = decode(RequestAccepted, event.data)
        route = event.model if lookup is None else lookup.get(event.model)
        if route is None:
            # Accepted for a model no longer served (the gateway checks those it serves).
            served = sorted(routes or ())
            failed = RequestFailed(
                code="model_not_found",
                message=f"the model {event.model!r} is not served here; served: {served}",
                stage=ctx.stage,
            )
            return settled(ctx.derive(event, type=EventType.FAILED, payload=failed))
        screen = functools.partial(_screened, request, policy)
        long = len(request.prompt) + sum(len(m.content) for m in request.messages) > _ON_A_THREAD
        screened = await asyncio.to_thread(screen) if long else screen()
        if isinstance(screened, str):
            failed = RequestFailed(
                code="safety_blocked",
                message=f"the prompt was refused by the safety policy (matched {screened!r})",
                stage=ctx.stage,
            )
            return settled(ctx.derive(event, type=EventType.FAILED, payload=failed))
        prompt, redactions, messages = screened
        prepared = RequestPrepared(
            prompt=prompt,
            max_tokens=request.max_tokens,
            redactions=redactions,
            metadata=request.metadata,
            messages=messages,
            sampling=request.sampling,
            continuation=request.continuation,
            embed=request.embed,
        )
        out = ctx.derive(event, type=EventType.PREPARED, payload=prepared)
        topic = prepared_topic(route)
        return [Output(background_topic(topic) if event.priority > 0 else topic, out)]

    return Stage(
        name="prepare",
        consumes=(Topic.REQUESTS,),
        handler=handle,
        accepts=frozenset({EventType.ACCEPTED}),
        dedupe=False,  # deterministic and side-effect free: a rerun republishes the same ids
    )
