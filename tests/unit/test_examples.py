"""The runnable examples in docs/examples still run and do what they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).parents[2] / "docs" / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_custom_stage_example() -> None:
    assert await load("custom_stage").main() == ["HELLO", "event.dead_lettered"]


async def test_batched_stage_example() -> None:
    texts, calls = await load("batched_stage").main()
    assert texts == sorted(f"hello world {i}" for i in range(12))
    assert sum(calls) == 12  # every event went through the model once
    assert max(calls) > 1  # in batches...
    assert max(calls) <= 8  # ...of at most the policy's size


async def test_callback_receiver_example() -> None:
    taken, forgery = await load("callback_receiver").main()
    assert taken == ["completed: Queues hum softly"]  # delivered twice, taken once
    assert forgery == 401
