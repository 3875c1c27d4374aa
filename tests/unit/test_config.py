"""Settings: flags over environment over a config file over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.config import NAMES, ModelSettings, Settings


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
    settings = Settings(log_url="nats://x", store_url="nats://x", model=model)
    assert {name.removeprefix("CONVEYOR_") for name in settings.to_env()} <= NAMES
