"""What each tenant used of each model over a time window: the bill, read from the log.

The usage ledger is written once per request (create-only, by finalize); every such write comes
from a generation whose ``request.completed`` is on [completed], with the same counts. So the
window's completions, each request's first one, add up to what the ledger holds for requests that
finished in that window, without reading the ledger key by key. Cancelled requests and those past
their deadline count too (their tokens were made); failed ones made no usage record and do not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from conveyor.events import Topic
from conveyor.history import Window, each_request
from conveyor.log.base import EventLog
from conveyor.payloads import EventType, RequestCompleted, Usage, decode


@dataclasses.dataclass(frozen=True, slots=True)
class Price:
    """A model's price in USD per million tokens; cached prompt tokens at ``cached`` (None: as the
    others)."""

    prompt: float = 0.0
    completion: float = 0.0
    cached: float | None = None

    def cost(self, usage: Usage) -> float:
        cached = usage.cached_tokens * (self.prompt if self.cached is None else self.cached)
        fresh = (usage.prompt_tokens - usage.cached_tokens) * self.prompt
        return (cached + fresh + usage.completion_tokens * self.completion) / 1_000_000


@dataclasses.dataclass(slots=True)
class Tally:
    """One tenant's use of one model."""

    tenant: str
    model: str
    requests: int = 0
    from_cache: int = 0  # of requests, those answered from the answer cache (the model did not run)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those read from the model's cache
    completion_tokens: int = 0
    cost_usd: float = 0.0  # at each model's price when the request was answered

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        # Rounded to a billionth of a dollar: a sum of floats is not exact below that.
        return {
            **dataclasses.asdict(self),
            "total_tokens": self.total_tokens,
            "cost_usd": round(self.cost_usd, 9),
        }


async def usage(log: EventLog, window: Window) -> list[Tally]:
    """Per tenant and model, the requests that completed in ``window`` and their tokens, sorted."""
    tallies: dict[tuple[str, str], Tally] = {}
    async for event in each_request(log, Topic.COMPLETED, EventType.COMPLETED, window):
        completed = decode(RequestCompleted, event.data)
        counts = completed.usage
        key = (event.tenant, event.model or "")
        tally = tallies.get(key) or tallies.setdefault(key, Tally(*key))
        tally.requests += 1
        tally.from_cache += completed.cached
        tally.prompt_tokens += counts.prompt_tokens
        tally.cached_tokens += counts.cached_tokens
        tally.completion_tokens += counts.completion_tokens
        tally.cost_usd += completed.cost_usd or 0.0
    return [tallies[key] for key in sorted(tallies)]
