"""Settings shared by every command: flags override ``CONVEYOR_*`` environment variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from conveyor.stages.prepare import DEFAULT_BLOCKLIST

STAGES = ("prepare", "generate", "finalize", "projector")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelSettings:
    name: str = "simulated"
    ttft: float = 0.0
    token_delay: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(".conveyor")
    log_url: str | None = None  # None: start the bundled NATS server in data_dir
    store_url: str | None = None  # None: the same NATS server's key-value store
    prefix: str = "conveyor"
    # Seconds before the broker redelivers an event whose worker went silent. Live workers
    # send heartbeats for long handlers, so this bounds recovery time after a crash.
    ack_wait: float = 10.0
    model: ModelSettings = ModelSettings()
    blocklist: tuple[str, ...] = DEFAULT_BLOCKLIST
    stages: tuple[str, ...] = STAGES

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def get(name: str) -> str | None:
            return env.get(f"CONVEYOR_{name}") or None

        base = cls()
        model = ModelSettings(
            name=get("MODEL") or base.model.name,
            ttft=float(get("MODEL_TTFT") or base.model.ttft),
            token_delay=float(get("MODEL_TOKEN_DELAY") or base.model.token_delay),
        )
        blocklist = get("BLOCKLIST")
        return cls(
            host=get("HOST") or base.host,
            port=int(get("PORT") or base.port),
            data_dir=Path(get("DATA_DIR") or base.data_dir),
            log_url=get("LOG_URL"),
            store_url=get("STORE_URL"),
            prefix=get("PREFIX") or base.prefix,
            ack_wait=float(get("ACK_WAIT") or base.ack_wait),
            model=model,
            blocklist=tuple(p.strip() for p in blocklist.split(",") if p.strip())
            if blocklist
            else base.blocklist,
        )
