"""Answers kept for requests asked again, so a repeat costs no model time.

Only deterministic answers are kept: greedy (temperature 0) or seeded requests, whose answer is a
function of the model and the request alone. The key is a digest of the model's name and version
and everything of the prepared request that shapes the answer (the prompt as redacted, the
conversation, sampling, tools, max_tokens, whether an embedding or a continuation is asked for), so
another model version or any other option is another key. Answers stay ``keep`` seconds; the store
forgets them after a week at most (``Namespace.CACHE``).
"""

from __future__ import annotations

import hashlib
import time

import orjson

from conveyor.models.base import ModelInfo
from conveyor.payloads import GenerationCompleted, RequestPrepared
from conveyor.store.base import Namespace, StateStore

_NOT_KEPT = ("cancelled", "deadline")  # cut short: not the answer to the request


class AnswerCache:
    def __init__(self, info: ModelInfo, keep: float) -> None:
        self._model = f"{info.name}\x00{info.version}"
        self._keep = keep

    def key(self, prepared: RequestPrepared) -> str | None:
        """The request's key, or None if its answer is not deterministic (sampled without a seed)."""
        if prepared.sampling.temperature > 0 and prepared.sampling.seed is None:
            return None
        shaping = prepared.model_dump(mode="json", exclude={"metadata", "redactions"})
        digest = hashlib.blake2b(self._model.encode() + orjson.dumps(shaping, option=orjson.OPT_SORT_KEYS))
        return digest.hexdigest()[:48]

    async def get(self, store: StateStore, key: str) -> GenerationCompleted | None:
        entry = await store.get(Namespace.CACHE, key)
        if entry is None:
            return None
        kept = orjson.loads(entry.value)
        if time.time() - float(kept["at"]) > self._keep:
            return None
        return GenerationCompleted.model_validate(kept["answer"]).model_copy(update={"cached": True})

    async def put(self, store: StateStore, key: str, answer: GenerationCompleted) -> None:
        if answer.finish_reason in _NOT_KEPT:
            return
        await store.put(
            Namespace.CACHE, key, orjson.dumps({"at": time.time(), "answer": answer.model_dump(mode="json")})
        )
