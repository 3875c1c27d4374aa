"""The SSE sequence is a pure function of a request's history, whatever order it arrives in."""

from __future__ import annotations

import itertools

from conveyor.gateway.sse import Sequencer, format_event
from conveyor.payloads import TokenChunk, TokenLogprob
from conveyor.view import RequestView

DONE = RequestView(
    id="r",
    status="completed",
    output="Hello world",
    streamed_chars=12,
    stages={"prepare": {"finished_at": "t"}, "generate": {"started_at": "t"}},
)


def chunks(*pieces: str) -> list[TokenChunk]:
    out, offset = [], 0
    for i, piece in enumerate(pieces):
        out.append(TokenChunk(index=i, offset=offset, text=piece, final=i == len(pieces) - 1))
        offset += len(piece)
    return out


def play(items: list[TokenChunk | RequestView], last_id: int = 0) -> list[str]:
    seq = Sequencer("r", last_id)
    frames: list[str] = []
    for item in items:
        events = seq.on_view(item) if isinstance(item, RequestView) else seq.on_chunk(item)
        frames += [format_event(*event) for event in events]
    assert seq.done
    return frames


def text(frames: list[str]) -> str:
    return "".join(f.split('"text":"')[1].split('"')[0] for f in frames if "event: token" in f)


def test_any_arrival_order_gives_the_same_frames() -> None:
    history: list[TokenChunk | RequestView] = [*chunks("Hello", " wor", "ld!"), DONE]
    expected = play(history)
    assert text(expected) == "Hello world!"
    for order in itertools.permutations(history):
        assert play(list(order)) == expected


def test_a_redone_generation_with_other_chunk_boundaries_sends_each_character_once() -> None:
    first_run = chunks("Hel", "lo w")  # the worker died here
    second_run = chunks("Hello", " world", "!")
    frames = play([*first_run, *second_run, DONE])
    assert text(frames) == "Hello world!"


def test_a_redone_chunk_overlapping_what_was_sent_sends_only_the_rest_of_its_logprobs() -> None:
    def weighed(*tokens: str) -> list[TokenLogprob]:
        return [TokenLogprob(token=t, logprob=-0.5) for t in tokens]

    first_run = TokenChunk(index=0, offset=0, text="Hello", logprobs=weighed("Hel", "lo"))
    second_run = TokenChunk(
        index=0, offset=0, text="Hello world!", logprobs=weighed("Hel", "lo", " world", "!")
    )
    seq = Sequencer("r", 0)
    events = seq.on_chunk(first_run) + seq.on_chunk(second_run) + seq.on_view(DONE)
    tokens = [data for _, kind, data in events if kind == "token"]
    assert [t["text"] for t in tokens] == ["Hello", " world!"]
    assert [[e["token"] for e in t["logprobs"]] for t in tokens] == [["Hel", "lo"], [" world", "!"]]


def test_resuming_after_any_frame_gives_exactly_the_rest() -> None:
    history: list[TokenChunk | RequestView] = [*chunks("Hello", " wor", "ld!"), DONE]
    frames = play(history)
    for i, frame in enumerate(frames):
        last_id = int(frame.split("\n")[0].removeprefix("id: "))
        assert play(history, last_id) == frames[i + 1 :]
