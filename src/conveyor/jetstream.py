"""What the NATS event log and the NATS key-value store share: one connection and its health."""

from __future__ import annotations

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from conveyor.errors import UnavailableError


async def connect(url: str, *, name: str = "conveyor") -> Client:
    """Connect with unbounded reconnects: a restarting server must not kill the process."""
    try:
        return await nats.connect(
            servers=[url],
            name=name,
            connect_timeout=2,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
        )
    except (OSError, nats.errors.Error) as exc:
        raise UnavailableError(f"cannot reach NATS at {url}: {exc}") from exc


class JetStreamBackend:
    """Base of the NATS adapters: owns the connection, answers ``ping`` and ``close``."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(timeout=10)

    async def ping(self) -> None:
        try:
            await self._js.account_info()
        except (nats.errors.Error, TimeoutError) as exc:
            raise UnavailableError(f"JetStream unavailable: {exc!r}") from exc

    async def close(self) -> None:
        if not self._nc.is_closed:
            await self._nc.close()
