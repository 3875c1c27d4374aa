"""Answers held to a JSON Schema, for the local engine: llama.cpp's grammar sampler beside its own.

The engine samples as always and checks the token drawn (tens of µs); only a token the grammar
refuses costs more. Checking the whole vocabulary takes 4-9 ms here, so a greedy request looks for
the likeliest allowed token among its 1,024 likeliest first (exact: none outside them is likelier),
and a sampled one draws again a few times (rejection, also exact) before the whole vocabulary is
masked. A model that already writes the JSON asked for pays almost nothing; one that would write
prose is steered at the few tokens where it would stray (benchmarks/structured_output.py).
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

import numpy as np

from conveyor.errors import RejectedError

# llama_token_data: {int32 id; float logit; float p}
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)


def json_grammar(schema: dict[str, Any]) -> bytes:
    """The GBNF grammar of JSON text that matches ``schema``; RejectedError if it has none."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(json.dumps(schema))).encode()
    except Exception as exc:  # the converter raises whatever it meets: all mean "not this schema"
        raise RejectedError(
            "invalid_request", f"response_format: this JSON Schema cannot be followed ({exc})"
        ) from exc


class Grammar:
    """One request's grammar state; used on the engine thread only (``check`` excepted)."""

    def __init__(self, llama: Any, vocab: Any, grammar: bytes) -> None:
        self._llama = llama
        self._sampler = llama.llama_sampler_init_grammar(vocab, grammar, b"root")
        if not self._sampler:
            raise RejectedError("invalid_request", "response_format: llama.cpp could not build the grammar")

    @classmethod
    def check(cls, llama: Any, vocab: Any, grammar: bytes) -> None:
        """Raise RejectedError now, on the caller's thread, if ``grammar`` cannot be built."""
        cls(llama, vocab, grammar).close()

    def allows(self, token: int) -> bool:
        return bool(self.allowed(np.array([token])).size)

    def allowed(self, tokens: Any) -> Any:
        """Those of ``tokens`` (ids, an array) the grammar allows next, in their order."""
        data = np.zeros(len(tokens), dtype=_TOKEN_DATA)
        data["id"] = tokens
        self._apply(data)
        return data["id"][np.isfinite(data["logit"])]

    def accept(self, token: int) -> None:
        self._llama.llama_sampler_accept(self._sampler, token)

    def close(self) -> None:
        self._llama.llama_sampler_free(self._sampler)

    def _apply(self, data: Any) -> None:
        llama = self._llama
        candidates = llama.llama_token_data_array(
            data=data.ctypes.data_as(llama.llama_token_data_p), size=len(data), selected=-1, sorted=False
        )
        llama.llama_sampler_apply(self._sampler, ctypes.byref(candidates))
