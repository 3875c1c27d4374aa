"""Answers held to a JSON Schema, for the local engine: llama.cpp's grammar sampler beside its own.

The engine samples as always; only a token the grammar refuses costs more. A token is checked
alone (~15 µs), and only when the grammar refuses it are all the vocabulary's tokens masked
(~10 ms here) and one drawn again from those left. So a model that already writes the JSON asked
for pays almost nothing, and one that would write prose is steered at the few tokens where it
would stray.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

import numpy as np

from conveyor.errors import PermanentError

# llama_token_data: {int32 id; float logit; float p}
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)


def json_grammar(schema: dict[str, Any]) -> bytes:
    """The GBNF grammar of JSON text that matches ``schema``; PermanentError if it has none."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(json.dumps(schema))).encode()
    except Exception as exc:  # the converter raises whatever it meets: all mean "not this schema"
        raise PermanentError(f"response_format: this JSON Schema cannot be followed ({exc})") from exc


class Grammar:
    """One request's grammar state; used on the engine thread only (``check`` excepted)."""

    def __init__(self, llama: Any, vocab: Any, n_vocab: int, grammar: bytes) -> None:
        self._llama = llama
        self._sampler = llama.llama_sampler_init_grammar(vocab, grammar, b"root")
        if not self._sampler:
            raise PermanentError("response_format: llama.cpp could not build the grammar")
        self._n_vocab = n_vocab
        self._one = np.zeros(1, dtype=_TOKEN_DATA)

    @classmethod
    def check(cls, llama: Any, vocab: Any, grammar: bytes) -> None:
        """Raise PermanentError now, on the caller's thread, if ``grammar`` cannot be built."""
        cls(llama, vocab, 0, grammar).close()

    def allows(self, token: int) -> bool:
        self._one["id"], self._one["logit"] = token, 0.0
        self._apply(self._one)
        return bool(np.isfinite(self._one["logit"][0]))

    def mask(self, logits: Any) -> Any:
        """``logits`` with every token the grammar refuses at -inf."""
        every = np.empty(self._n_vocab, dtype=_TOKEN_DATA)
        every["id"] = np.arange(self._n_vocab)
        every["logit"] = logits
        self._apply(every)
        return every["logit"].copy()

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
