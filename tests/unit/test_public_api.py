"""The curated public API: what ``__all__`` promises is there, documented, and nothing private leaks."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "conveyor",
    "conveyor.log",
    "conveyor.store",
    "conveyor.client",
    "conveyor.models",
    "conveyor.runtime",
    "conveyor.testing",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_exist_are_public_and_documented(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == sorted(exported, key=str.lower) or exported == sorted(exported)
    for attr in exported:
        value = getattr(module, attr)
        assert not attr.startswith("_") or attr == "__version__"
        if callable(value):
            assert value.__doc__, f"{name}.{attr} has no docstring"


def test_the_top_level_package_exposes_the_seams_and_the_stage_api() -> None:
    import conveyor

    for seam in ("EventLog", "StateStore", "ModelBackend", "Stage", "Pipeline", "StageWorker", "Envelope"):
        assert seam in conveyor.__all__
