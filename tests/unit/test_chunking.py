"""How generate cuts a model's tokens into durable chunk events."""

from __future__ import annotations

from conveyor.events import Envelope, Topic, new_event
from conveyor.models.simulated import SimulatedModel
from conveyor.payloads import EventType, RequestPrepared, TokenChunk, decode
from conveyor.stages import CancelWatch, ChunkPolicy, generate_stage
from conveyor.testing import MemoryEventLog, StageHarness

PROMPT = "a question that gets a long answer"


def prepared() -> Envelope:
    payload = RequestPrepared(prompt=PROMPT, max_tokens=24)
    return new_event(type=EventType.PREPARED, source="test", payload=payload)


async def chunks(model: SimulatedModel, policy: ChunkPolicy | None = None) -> list[TokenChunk]:
    log = MemoryEventLog()
    stage = generate_stage(model, CancelWatch(log), chunking=policy or ChunkPolicy())
    out = await StageHarness(stage, log=log).handle(prepared())
    return [decode(TokenChunk, e.data) for e in out[Topic.STREAM]]


async def test_an_instant_models_answer_is_one_chunk() -> None:
    (only,) = await chunks(SimulatedModel())
    assert only.final
    assert only.text == "".join(SimulatedModel().answer(PROMPT, 24)[0])


async def test_a_slow_first_token_leaves_alone_and_at_once() -> None:
    tokens, _ = SimulatedModel().answer(PROMPT, 24)
    # 50 ms to the first token, then a token every 1 ms: the first is sent by itself, the
    # rest coalesce into chunks of up to max_delay.
    got = await chunks(SimulatedModel(ttft=0.05, token_delay=0.001), ChunkPolicy(max_delay=1.0))
    assert got[0].text == tokens[0]
    assert len(got) == 2  # then the rest, within one max_delay
    assert "".join(c.text for c in got) == "".join(tokens)
    assert [c.offset for c in got] == [0, len(tokens[0])]
