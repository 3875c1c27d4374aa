"""Run ``conveyor up`` as a real subprocess on free ports; always clean up by PID."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conveyor.testing import UpProcess

ConveyorFactory = Callable[..., UpProcess]


@pytest.fixture
def conveyor(tmp_path: Path) -> Iterator[ConveyorFactory]:
    """Makes UpProcess objects (data dir under tmp_path) and kills whatever they left running."""
    made: list[UpProcess] = []

    def make(
        *args: str,
        data_dir: Path = tmp_path / "data",
        model: str = "simulated",
        env: dict[str, str] | None = None,
    ) -> UpProcess:
        made.append(UpProcess(data_dir, "--model", model, *args, env=env))
        return made[-1]

    yield make
    for proc in made:
        proc.cleanup()
