"""What one llama.cpp decode step costs by batch size: the ceiling of batching on this machine.

The continuous-batching engine of ``conveyor.models.local`` runs one ``llama_decode`` per step with
one token of every running sequence (per-sequence KV streams, as the engine sets them up). Here that
step is timed alone, with no Conveyor and no Python sampling, for 1-16 sequences and several weight
types re-quantized from the shipped Q4_1 file. ``16 steps / step(16)`` over ``1 / step(1)`` is the
most tokens/s that 16 concurrent requests can gain over one at a time on this CPU, before any
prompt is prefilled. Run: ``.venv/bin/python benchmarks/decode_steps.py [--types Q8_0,F16,...]``
(~20 s per type; any ``LLAMA_FTYPE_MOSTLY_*`` name, e.g. Q4_K_M, Q6_K, IQ4_NL, BF16).
"""

from __future__ import annotations

import ctypes
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from conveyor.models.local import _llama, shipped_gguf

SEQUENCES = 16
CONTEXT = 100  # tokens already in each sequence's cache: a chat prompt and some output
STEPS = 30
TYPES = ("Q8_0", "Q4_0", "F16")  # Q8_0 is what the engine runs


def weights(llama: Any, ftype: str, cache: Path) -> Path:
    target = cache / f"model.{ftype}.gguf"
    params = llama.llama_model_quantize_default_params()
    params.ftype = getattr(llama, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    if llama.llama_model_quantize(str(shipped_gguf()).encode(), str(target).encode(), ctypes.byref(params)):
        raise RuntimeError(f"quantizing to {ftype} failed")
    return target


def step_times(llama: Any, path: Path, threads: int = 2) -> dict[int, float]:
    """Median seconds of one decode step carrying one token for each of n sequences."""
    model = llama.llama_model_load_from_file(str(path).encode(), llama.llama_model_default_params())
    params = llama.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = SEQUENCES * 1024, 512, 512
    params.n_seq_max, params.kv_unified = SEQUENCES, False
    params.n_threads = params.n_threads_batch = threads
    ctx = llama.llama_init_from_model(model, params)
    batch = llama.llama_batch_init(512, 0, 1)
    position = [0] * SEQUENCES

    def decode(sequences: range, tokens: int = 1) -> float:
        batch.n_tokens = 0
        for seq in sequences:
            for j in range(tokens):
                i = batch.n_tokens
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = 100 + seq + j, position[seq], 1
                batch.seq_id[i][0], batch.logits[i] = seq, j == tokens - 1
                batch.n_tokens = i + 1
                position[seq] += 1
        started = time.perf_counter()
        if llama.llama_decode(ctx, batch):
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - started

    for seq in range(SEQUENCES):
        decode(range(seq, seq + 1), CONTEXT)
    out = {n: statistics.median(decode(range(n)) for _ in range(STEPS)) for n in (1, 2, 4, 8, 16)}
    llama.llama_batch_free(batch)
    llama.llama_free(ctx)
    llama.llama_model_free(model)
    return out


def main(types: list[str]) -> None:
    llama = _llama()
    llama.llama_backend_init()
    print("| weights | sequences per step | ms per step | tokens/s | vs 1 sequence |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for ftype in types:
            times = step_times(llama, weights(llama, ftype, Path(tmp)))
            for n, seconds in times.items():
                gain = n * times[1] / seconds
                row = f"| {ftype} | {n} | {seconds * 1000:.1f} | {n / seconds:.0f} | {gain:.2f}x |"
                print(row, flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(TYPES), help="weight types, comma-separated")
    main(parser.parse_args().types.split(","))
