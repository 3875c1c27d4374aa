"""Several models in one deployment: each named by its id, each waiting on a topic of its own."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import pytest

from conveyor.cli import command_line, settings_from
from conveyor.config import ModelSettings, Settings
from conveyor.embedded import free_port
from conveyor.errors import RejectedError
from conveyor.events import Envelope, Topic, generate_group, new_event, prepared_topic
from conveyor.gateway.backlog import Backlogs
from conveyor.gateway.core import GatewayCore
from conveyor.models.base import GenerationRequest, Token
from conveyor.models.simulated import SimulatedModel
from conveyor.payloads import DeadLetter, EventType, RequestAccepted, RequestFailed, RequestPrepared, decode
from conveyor.stages import CancelWatch, generate_stage, prepare_stage
from conveyor.testing import MemoryEventLog, MemoryStateStore, StageHarness
from tests.conftest import NodeFactory
from tests.helpers import sdk, submit, wait_final

FAST = ModelSettings(backend="simulated", name="fast", version="2", license="MIT")


def test_more_models_come_from_the_command_line_a_config_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = command_line()
    flags = settings_from(
        parser.parse_args(
            [
                "up",
                "--model",
                "simulated",
                "--add-model",
                "fast=simulated,version=2,license=MIT",
                "--add-model",
                "gpt=openai,upstream_url=http://127.0.0.1:9/v1,upstream_model=gpt-4o-mini,batch_max_wait=0.01",
                "--serve",
                "fast",
            ]
        )
    )
    assert [m.id for m in flags.served] == ["simulated", "fast", "gpt"]
    assert flags.models[0] == FAST
    assert (flags.models[1].upstream_model, flags.models[1].batch_max_wait) == ("gpt-4o-mini", 0.01)
    assert [m.id for m in flags.generated_here] == ["fast"]
    # What a worker process is handed is what it serves.
    assert Settings.from_env(flags.to_env()) == flags

    config = tmp_path / "conveyor.toml"
    config.write_text(
        'model = "simulated"\n\n[[models]]\nname = "fast"\nbackend = "simulated"\nversion = "2"\n'
    )
    from_file = Settings.load(config, env={})
    assert from_file.models == (ModelSettings(backend="simulated", name="fast", version="2"),)
    monkeypatch.setenv("CONVEYOR_MODELS", json.dumps([{"backend": "simulated", "name": "echo"}]))
    assert [m.id for m in settings_from(parser.parse_args(["up", "--model", "simulated"])).served] == [
        "simulated",
        "echo",
    ]


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--add-model", "simulated=simulated"], "distinct ids"),
        (["--add-model", "Fast=simulated", "--add-model", "fast!=simulated"], "distinct ids"),
        (["--add-model", "fast"], "expected ID=BACKEND"),
        (["--add-model", "!!=simulated"], "needs an id with a letter or a digit"),
        (["--add-model", "fast=simulated,slots=many"], "slots must be a int, not 'many'"),
        (["--add-model", "fast=simulated,colour=red"], "'colour=red' is not SETTING=VALUE"),
        (["--serve", "nobody"], "--serve names models not served here: ['nobody']"),
    ],
)
def test_a_wrong_model_list_is_refused_with_its_reason(argv: list[str], error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]")):
        settings_from(command_line().parse_args(["up", "--model", "simulated", *argv]))


async def test_prepare_routes_each_request_to_its_models_topic_and_fails_an_unknown_one() -> None:
    stage = prepare_stage(routes={"simulated": "", "fast": "fast"})
    harness = StageHarness(stage)

    def accepted(model: str) -> Envelope:
        return new_event(
            type=EventType.ACCEPTED, source="test", payload=RequestAccepted(prompt="hi"), model=model
        )

    for model, topic in [("", Topic.PREPARED), ("simulated", Topic.PREPARED), ("fast", "prepared-fast")]:
        out = await harness.handle(accepted(model))
        assert [t for t, events in out.items() if events] == [topic], model
    # Background work (positive priority) waits on its model's background topic.
    out = await harness.handle(dataclasses.replace(accepted("fast"), priority=5))
    assert [t for t, events in out.items() if events] == ["background-prepared-fast"]
    out = await harness.handle(accepted("retired"))
    failed = decode(RequestFailed, out[Topic.COMPLETED][0].data)
    assert failed.code == "model_not_found"
    assert "'retired' is not served here" in failed.message
    assert prepared_topic("Llama 3.1:8B") == "prepared-llama-3-1-8b"


async def test_each_model_answers_the_requests_that_name_it_through_every_api(node: NodeFactory) -> None:
    async with node(settings={"models": (FAST,)}) as http, sdk(str(http.base_url)) as client:
        listed = (await http.get("/v1/models")).json()
        assert [m["id"] for m in listed["data"]] == ["simulated", "fast"]
        default = await wait_final(http, await submit(http, "which model?"))
        named = await wait_final(http, await submit(http, "which model?", model="fast"))
        assert (default["model"], named["model"]) == ("simulated", "fast")
        assert default["output"] == named["output"]  # two simulated models answer alike
        unknown = await http.post("/v1/requests", json={"prompt": "hi", "model": "slow"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"

        chat = await client.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert chat.model == "fast"
        view = await wait_final(http, chat.id.removeprefix("chatcmpl-"))
        assert view["model"] == "fast"
        response = await client.responses.create(model="simulated", input="hi", max_output_tokens=8)
        assert (await wait_final(http, response.id.removeprefix("resp_")))["model"] == "simulated"


async def test_background_requests_of_every_model_complete_and_show_their_stages(node: NodeFactory) -> None:
    async with node(settings={"models": (FAST,)}) as http:
        for model in ("simulated", "fast"):
            view = await wait_final(http, await submit(http, "in the background", model=model, priority=5))
            assert (view["status"], view["model"]) == ("completed", model)
            assert "finished_at" in view["stages"]["prepare"]  # the projector reads those topics too


async def test_a_model_that_fails_hands_its_requests_to_its_fallback(node: NodeFactory) -> None:
    # The default model is an upstream that is down (nothing listens on its port): once its
    # retries are spent, each request goes to the fallback's topic and is answered there.
    down = ModelSettings(
        backend="openai",
        upstream_url=f"http://127.0.0.1:{free_port()}/v1",
        upstream_model="gpt",
        fallback="fast",
    )
    async with node(settings={"model": down, "models": (FAST,)}) as http, sdk(str(http.base_url)) as client:
        chat = await client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "are you there?"}], max_tokens=8
        )
        view = await wait_final(http, await submit(http, "and you?", priority=5))  # background work too
    assert chat.model == "gpt"  # what the client asked for
    assert chat.choices[0].message.content == "".join(SimulatedModel().answer("are you there?", 8)[0]).strip()
    assert (view["status"], view["model"]) == ("completed", "fast")  # who answered
    assert "dead_lettered_at" not in view["stages"].get("generate", {})


@pytest.mark.parametrize(
    ("fallbacks", "error"),
    [
        ({"simulated": "nobody"}, "a fallback names models not served here: ['nobody']"),
        ({"simulated": "simulated"}, "circle: simulated -> simulated"),
        ({"simulated": "fast", "fast": "simulated"}, "circle: simulated -> fast -> simulated"),
    ],
)
def test_fallbacks_must_name_served_models_and_end(fallbacks: dict[str, str], error: str) -> None:
    default = ModelSettings(backend="simulated", fallback=fallbacks.get("simulated", ""))
    fast = dataclasses.replace(FAST, fallback=fallbacks.get("fast", ""))
    with pytest.raises(ValueError, match=re.escape(error)):
        Settings(model=default, models=(fast,))


class Refusing(SimulatedModel):
    """Refuses every request as the client's own fault."""

    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncGenerator[Token, None]:
        for request in requests:
            yield Token(request.id, "", error=RejectedError("context_length_exceeded", "too long"))


async def test_a_request_refused_for_its_own_fault_is_not_passed_to_the_fallback() -> None:
    log = MemoryEventLog()
    stage = generate_stage(Refusing(), CancelWatch(log), fallback="fast")
    prepared = new_event(type=EventType.PREPARED, source="test", payload=RequestPrepared(prompt="hi"))
    out = await StageHarness(stage, log=log).handle(prepared)
    assert [decode(DeadLetter, e.data).code for e in out[Topic.DLQ]] == ["context_length_exceeded"]
    assert out.get(prepared_topic("fast"), []) == []


@pytest.mark.parametrize("routing", ["weight", "backlog"])
async def test_an_alias_spreads_its_requests_over_its_models(node: NodeFactory, routing: str) -> None:
    # By backlog, with both models idle between one-at-a-time requests: ties, drawn by weight.
    aliases = {"chat": (("simulated", 1.0), ("fast", 1.0)), "only-fast": (("fast", 1.0),)}
    async with (
        node(settings={"models": (FAST,), "aliases": aliases, "alias_routing": routing}) as http,
        sdk(str(http.base_url)) as client,
    ):
        listed = [m.id async for m in client.models.list()]
        assert listed == ["simulated", "fast", "chat", "only-fast"]
        views = [await wait_final(http, await submit(http, f"hello {i}", model="chat")) for i in range(40)]
        chat = await client.chat.completions.create(
            model="only-fast", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        answered = await wait_final(http, chat.id.removeprefix("chatcmpl-"))
    assert {v["model"] for v in views} == {"simulated", "fast"}  # both, at 1:1 (all 40 one way: 2^-39)
    assert (chat.model, answered["model"]) == ("only-fast", "fast")


def test_aliases_come_from_flags_files_and_the_environment_and_must_name_served_models(
    tmp_path: Path,
) -> None:
    parser = command_line()
    argv = [
        "up",
        "--model",
        "simulated",
        "--add-model",
        "fast=simulated",
        "--alias",
        "chat=simulated:90,fast:10",
        "--alias-routing",
        "backlog",
    ]
    flags = settings_from(parser.parse_args(argv))
    assert (flags.aliases, flags.alias_routing) == (
        {"chat": (("simulated", 90.0), ("fast", 10.0))},
        "backlog",
    )
    again = Settings.from_env(flags.to_env())
    assert (again.aliases, again.alias_routing) == (flags.aliases, "backlog")
    with pytest.raises(ValueError, match="alias routing is weight or backlog"):
        Settings(alias_routing="fastest")
    config = tmp_path / "conveyor.toml"
    config.write_text('model = "simulated"\n\n[aliases]\nchat = {simulated = 3}\n')
    assert Settings.load(config, env={}).aliases == {"chat": (("simulated", 3.0),)}
    for wrong, error in [
        (["--alias", "chat=nobody:1"], "give served models with weights above 0"),
        (["--alias", "chat=simulated:0"], "give served models with weights above 0"),
        (["--alias", "simulated=simulated:1"], "an alias needs a name of its own"),
        (["--alias", "chat=simulated:lots"], "expected NAME=ID:WEIGHT"),
    ]:
        with pytest.raises(ValueError, match=error):
            settings_from(parser.parse_args(["up", "--model", "simulated", *wrong]))


async def test_an_alias_routed_by_backlog_sends_requests_where_the_least_wait_per_weight() -> None:
    log = MemoryEventLog()
    backlogs = Backlogs(log)
    aliases = {"chat": (("simulated", 1.0), ("fast", 2.0))}  # fast has twice the capacity
    core = GatewayCore(
        log, MemoryStateStore(), models=("simulated", "fast"), aliases=aliases, backlogs=backlogs
    )

    async def waiting(route: str, count: int) -> None:
        """``count`` more prepared requests waiting for the generate stage of ``route``."""
        await log.subscribe(prepared_topic(route), generate_group(route))
        prepared = RequestPrepared(prompt="p")
        events = [new_event(type=EventType.PREPARED, source="t", payload=prepared) for _ in range(count)]
        await log.publish(prepared_topic(route), events)

    # No backlog known yet (no generate stage has subscribed): each request drawn by weight.
    await backlogs.refresh()
    assert {core.route("chat") for _ in range(200)} == {"", "fast"}  # "": the default model
    await waiting("", 3)
    await waiting("fast", 4)  # 2 per unit of weight against 3
    await backlogs.refresh()
    assert {core.route("chat") for _ in range(50)} == {"fast"}
    await waiting("fast", 4)  # 4 per unit of weight against 3
    await backlogs.refresh()
    assert {core.route("chat") for _ in range(50)} == {""}
