"""Settings: flags over environment over a config file over defaults."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from conveyor.cli import command_line, settings_from
from conveyor.config import NAMES, ModelSettings, Settings
from conveyor.gateway.ratelimit import Rate
from conveyor.node import gateway_options


def test_a_config_file_is_overridden_by_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "conveyor.toml"
    config.write_text(
        'log_url = "kafka://127.0.0.1:9092"\n'
        'store_url = "redis://127.0.0.1:6379/0"\n'
        'model = "simulated"\n'
        "batch_max_size = 4\n"
        'blocklist = ["forbidden words", "other"]\n'
        "port = 9000\n"
    )
    settings = Settings.load(config, env={"CONVEYOR_PORT": "9100"})
    assert settings.log_url == "kafka://127.0.0.1:9092"
    assert settings.store_url == "redis://127.0.0.1:6379/0"
    assert settings.model.backend == "simulated"
    assert settings.model.batch_max_size == 4
    assert settings.blocklist == ("forbidden words", "other")
    assert settings.port == 9100  # the environment wins
    via_env = Settings.load(env={"CONVEYOR_CONFIG": str(config)})
    assert via_env.port == 9000


def test_an_unknown_setting_in_the_file_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "conveyor.toml"
    config.write_text('log_ulr = "nats://127.0.0.1:4222"\n')
    with pytest.raises(ValueError, match=r"unknown settings \['log_ulr'\]"):
        Settings.load(config, env={})
    config.write_text("port = \n")
    with pytest.raises(ValueError, match="cannot read the config file"):
        Settings.load(config, env={})


def test_every_setting_a_process_passes_on_has_a_known_name() -> None:
    model = ModelSettings(batch_target_latency=1.0)
    settings = Settings(
        log_url="nats://x",
        store_url="nats://x",
        model=model,
        api_keys_file=Path("keys.txt"),
        rate_limit=2.5,
        rate_burst=10,
        max_backlog=1000,
        token_limit=5000,
        max_parallel=8,
        budget=100.0,
    )
    assert {name.removeprefix("CONVEYOR_") for name in settings.to_env()} <= NAMES
    assert Settings.from_env(settings.to_env()) == settings


def test_the_gateway_settings_come_from_the_environment_and_bad_ones_stop_the_start(
    tmp_path: Path,
) -> None:
    env = {
        "CONVEYOR_API_KEYS_FILE": str(tmp_path / "keys.txt"),
        "CONVEYOR_RATE_LIMIT": "5",
        "CONVEYOR_MAX_BACKLOG": "200",
        "CONVEYOR_MAX_PARALLEL": "16",
    }
    settings = Settings.from_env(env)
    assert (settings.api_keys_file, settings.rate_limit, settings.rate_burst, settings.max_backlog) == (
        tmp_path / "keys.txt",
        5.0,
        None,
        200,
    )
    with pytest.raises(ValueError, match="cannot read the API keys file"):
        gateway_options(settings)
    (tmp_path / "keys.txt").write_text("sk-1=acme,rate=1\n")
    limits, keys = gateway_options(settings)
    assert (limits.rate, limits.max_backlog) == (Rate(5.0, 5.0), 200)  # burst: a second's worth
    assert limits.max_parallel == 16
    assert keys is not None
    assert keys.tenant("sk-1") == "acme"
    for wrong, error in [
        ({"rate_burst": 3.0, "rate_limit": None}, "--rate-burst needs --rate-limit"),
        ({"rate_limit": -1.0}, "above 0"),
        ({"max_backlog": -1}, "--max-backlog must be 0 or more"),
        ({"max_parallel": 0}, "--max-parallel must be 1 or more"),
        ({"budget": 0.0}, "--budget must be above 0 USD a month"),
    ]:
        with pytest.raises(ValueError, match=error):
            gateway_options(dataclasses.replace(settings, **wrong))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("command", "foreign"),
    [
        (["lag"], ["--model", "local"]),
        (["dlq"], ["--port", "9000"]),
        (["projector"], ["--model-slots", "4"]),
        (["worker", "generate"], ["--api-keys-file", "keys.txt"]),
    ],
)
def test_each_command_takes_only_the_options_it_uses(
    command: list[str], foreign: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = command_line()
    where = ["--data-dir", "/srv/conveyor", "--log-url", "nats://127.0.0.1:4333"]
    settings = settings_from(parser.parse_args([*command, *where]))
    assert (settings.data_dir, settings.log_url) == (Path("/srv/conveyor"), "nats://127.0.0.1:4333")
    with pytest.raises(SystemExit):
        parser.parse_args([*command, *foreign])
    assert f"unrecognized arguments: {' '.join(foreign)}" in capsys.readouterr().err


def test_conveyor_up_takes_every_option() -> None:
    args = ["up", "--port", "9000", "--model", "simulated", "--model-slots", "4", "--ack-wait", "3"]
    settings = settings_from(command_line().parse_args([*args, "--max-backlog", "7"]))
    assert (settings.port, settings.model.backend, settings.model.slots) == (9000, "simulated", 4)
    assert (settings.ack_wait, settings.max_backlog) == (3.0, 7)


def test_every_flag_of_conveyor_up_has_its_environment_variable() -> None:
    # What the README says: CONVEYOR_ and the flag's name in capitals, but for the flags listed.
    commands = next(a for a in command_line()._actions if isinstance(a, argparse._SubParsersAction))
    up = commands.choices["up"]
    named_otherwise = {
        "no_prefix_cache": "PREFIX_CACHE",
        "blocklist_file": "BLOCKLIST",
        "add_model": "MODELS",
        "alias": "ALIASES",
    }
    not_settings = {"help", "config", "workers"}
    flags = {action.dest for action in up._actions} - not_settings
    missing = {flag for flag in flags if named_otherwise.get(flag, flag.upper()) not in NAMES}
    assert missing == set()
