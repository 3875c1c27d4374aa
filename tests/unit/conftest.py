"""An in-process node (gateway + stages on in-memory backends) over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest

from conveyor.config import ModelSettings, Settings
from conveyor.node import run_node

NodeFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def node(tmp_path: Path) -> NodeFactory:
    @contextlib.asynccontextmanager
    async def start(*, token_delay: float = 0.0) -> AsyncIterator[httpx.AsyncClient]:
        model = ModelSettings(name="simulated", token_delay=token_delay)
        settings = Settings(
            port=0, data_dir=tmp_path, log_url="memory://", store_url="memory://", model=model
        )
        stop = asyncio.Event()
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(run_node(settings, stop, on_ready=lambda url, *_: ready.set_result(url)))
        try:
            async with asyncio.timeout(10):
                url = await asyncio.wait_for(ready, 10)
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                yield client
        finally:
            stop.set()
            await task

    return start
