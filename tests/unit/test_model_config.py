"""Models are named and versioned in configuration; every event a model produced says which."""

from __future__ import annotations

import pytest

from conveyor.cli import command_line, settings_from
from conveyor.config import ModelSettings, Settings
from conveyor.events import Topic, new_event
from conveyor.models.simulated import SimulatedModel
from conveyor.node import model_info
from conveyor.payloads import EventType, RequestPrepared
from conveyor.stages import CancelWatch, generate_stage
from conveyor.testing import MemoryEventLog, StageHarness
from tests.conftest import NodeFactory
from tests.helpers import submit, wait_final


def test_settings_name_version_and_license_override_the_backends_own() -> None:
    model = SimulatedModel()
    assert model_info(ModelSettings(backend="simulated"), model) == model.info
    named = ModelSettings(backend="simulated", name="acme-chat", version="2026-11", license="MIT")
    info = model_info(named, model)
    assert (info.name, info.version, info.license) == ("acme-chat", "2026-11", "MIT")
    assert named.id == "acme-chat"
    assert ModelSettings(backend="openai", upstream_model="llama-3").id == "llama-3"


def test_model_settings_survive_the_trip_to_a_worker_process() -> None:
    settings = Settings(
        model=ModelSettings(
            backend="simulated",
            name="acme-chat",
            version="7",
            license="MIT",
            batch_max_size=4,
            batch_max_wait=0.02,
            batch_target_latency=0.5,
            slots=4,
            context=512,
            prefix_cache=False,
            weights="f16",
        )
    )
    assert Settings.from_env(settings.to_env()).model == settings.model


def test_the_local_engine_is_sized_by_flags_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_MODEL_SLOTS", "8")
    monkeypatch.setenv("CONVEYOR_MODEL_CONTEXT", "2048")
    parser = command_line()
    from_env = settings_from(parser.parse_args(["up"])).model
    assert (from_env.slots, from_env.context, from_env.prefix_cache) == (8, 2048, True)
    assert from_env.weights == "q8_0"
    monkeypatch.setenv("CONVEYOR_MODEL_WEIGHTS", "f16")
    flags = settings_from(parser.parse_args(["up", "--model-slots", "4", "--no-prefix-cache"])).model
    assert (flags.slots, flags.context, flags.prefix_cache, flags.weights) == (4, 2048, False, "f16")
    flags = settings_from(parser.parse_args(["up", "--model-weights", "shipped"])).model
    assert flags.weights == "shipped"
    monkeypatch.setenv("CONVEYOR_MODEL_WEIGHTS", "q3")
    with pytest.raises(ValueError, match="unknown model weights 'q3'; available: q8_0, f16, shipped"):
        Settings.from_env()
    monkeypatch.setenv("CONVEYOR_MODEL_WEIGHTS", "q8_0")
    monkeypatch.setenv("CONVEYOR_PREFIX_CACHE", "maybe")
    with pytest.raises(ValueError, match="expected true or false, got 'maybe'"):
        Settings.from_env()


async def test_every_event_the_model_produced_carries_its_name_version_and_license() -> None:
    log = MemoryEventLog()
    info = model_info(ModelSettings(name="acme-chat", version="7", license="MIT"), SimulatedModel())
    stage = generate_stage(SimulatedModel(token_delay=0.06), CancelWatch(log), info=info)
    prepared = new_event(
        type=EventType.PREPARED, source="test", payload=RequestPrepared(prompt="tell me more", max_tokens=8)
    )
    out = await StageHarness(stage, log=log).handle(prepared)
    produced = out[Topic.STREAM] + out[Topic.PROGRESS] + out[Topic.GENERATED]
    assert len(out[Topic.STREAM]) > 1  # several chunks, and so a progress event too
    assert {(e.model, e.model_version, e.model_license) for e in produced} == {("acme-chat", "7", "MIT")}


async def test_the_configured_name_is_what_clients_see_and_ask_for(node: NodeFactory) -> None:
    async with node(name="acme-chat", version="7") as http:
        listed = (await http.get("/v1/models")).json()
        assert [m["id"] for m in listed["data"]] == ["acme-chat"]
        view = await wait_final(http, await submit(http, "hello there"))
        assert view["model"] == "acme-chat"
        chat = await http.post(
            "/v1/chat/completions",
            json={"model": "acme-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        )
        assert chat.status_code == 200
        assert chat.json()["model"] == "acme-chat"
        refused = await http.post(
            "/v1/chat/completions",
            json={"model": "simulated", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert refused.status_code == 404
