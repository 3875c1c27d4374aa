"""What one JetStream message costs the Python client here: the floor under the pipeline's numbers.

Publishes 5,000 messages (all in flight, then all acks awaited) against a bundled nats-server on a
free loopback port, with and without CloudEvents headers and the dedupe id: through nats-py's
``publish_async``, and through ``conveyor.jetstream.Replies``, which the NATS event log and key-value
store use (one wildcard inbox, a future per message). Reported: messages/s and CPU µs of this
process per message. Run: ``.venv/bin/python benchmarks/nats_client.py``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats

from conveyor.embedded import EmbeddedNats
from conveyor.events import new_event
from conveyor.jetstream import Replies, stored
from conveyor.payloads import RequestAccepted

COUNT = 5_000
Publish = Callable[[str, bytes, dict[str, str] | None], Awaitable[Awaitable[object]]]


async def run(label: str, publish: Publish, headers: dict[str, str] | None, body: bytes) -> str:
    wall, cpu = time.perf_counter(), time.process_time()
    acks = []
    for i in range(COUNT):
        h = dict(headers) if headers else None
        if h and "Nats-Msg-Id" in h:
            h["Nats-Msg-Id"] = f"{label}-{i}"
        acks.append(await publish(f"bench.k.{i}", body, h))
    for ack in acks:
        await ack
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return f"| {label} | {COUNT / wall:,.0f} | {cpu / COUNT * 1e6:.0f} |"


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = await EmbeddedNats.start(Path(tmp))
        try:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await js.add_stream(name="BENCH", subjects=["bench.>"])
            replies = Replies(nc, timeout=10)
            event = new_event(type="request.accepted", source="bench", payload=RequestAccepted(prompt="p"))

            async def with_nats_py(subject: str, body: bytes, h: dict[str, str] | None) -> Awaitable[object]:
                return await js.publish_async(subject, body, headers=h)

            async def with_replies(subject: str, body: bytes, h: dict[str, str] | None) -> Awaitable[object]:
                reply = await replies.request(subject, body, h)

                async def ack() -> int:
                    return stored(await reply)

                return ack()

            cases: list[tuple[str, dict[str, str] | None]] = [
                ("no headers", None),
                (f"CloudEvents headers ({len(event.to_headers())})", event.to_headers()),
                ("CloudEvents headers + Nats-Msg-Id", {**event.to_headers(), "Nats-Msg-Id": "x"}),
            ]
            print("| client, message | published/s (acks awaited) | CPU µs per message |")
            print("|---|---|---|")
            for client, publish in (("nats-py publish_async", with_nats_py), ("Replies", with_replies)):
                for label, headers in cases:
                    print(await run(f"{client}, {label}", publish, headers, event.data), flush=True)
            await replies.close()
            await nc.close()
        finally:
            await server.stop()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
