"""A node process: a stage that dies takes the process down instead of leaving it half alive."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conveyor.config import ModelSettings, Settings
from conveyor.errors import UnavailableError
from conveyor.log.memory import MemoryEventLog
from conveyor.node import run_node


async def test_a_stage_that_stops_on_its_own_stops_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: MemoryEventLog, topic: str, group: str) -> None:
        raise RuntimeError(f"cannot subscribe {group} to {topic}")

    monkeypatch.setattr(MemoryEventLog, "subscribe", broken)
    settings = Settings(
        port=0,
        data_dir=tmp_path,
        log_url="memory://",
        store_url="memory://",
        model=ModelSettings(backend="simulated"),
        stages=("finalize",),
    )
    with pytest.raises(UnavailableError, match="stage-finalize stopped: RuntimeError"):
        async with asyncio.timeout(30):
            await run_node(settings, asyncio.Event(), gateway=False)
