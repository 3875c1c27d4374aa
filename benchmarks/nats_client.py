"""What one JetStream message costs the Python client here: the floor under the pipeline's numbers.

Publishes 5,000 messages with nats-py's ``publish_async`` (all in flight, then all acks awaited),
with and without CloudEvents headers and the dedupe id, against a bundled nats-server on a free
loopback port. Run: ``.venv/bin/python benchmarks/nats_client.py``.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import nats

from conveyor.embedded import EmbeddedNats
from conveyor.events import new_event
from conveyor.payloads import RequestAccepted

COUNT = 5_000


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = await EmbeddedNats.start(Path(tmp))
        try:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await js.add_stream(name="BENCH", subjects=["bench.>"])
            event = new_event(type="request.accepted", source="bench", payload=RequestAccepted(prompt="p"))
            cases: list[tuple[str, dict[str, str] | None]] = [
                ("no headers", None),
                (f"CloudEvents headers ({len(event.to_headers())})", event.to_headers()),
                ("CloudEvents headers + Nats-Msg-Id", {**event.to_headers(), "Nats-Msg-Id": "x"}),
            ]
            print("| message | sent/s (no acks awaited) | published/s (acks awaited) | µs per message |")
            print("|---|---|---|---|")
            for label, headers in cases:
                start = time.perf_counter()
                acks = []
                for i in range(COUNT):
                    h = dict(headers) if headers else None
                    if h and "Nats-Msg-Id" in h:
                        h["Nats-Msg-Id"] = f"{label}-{i}"
                    acks.append(await js.publish_async(f"bench.k.{i}", event.data, headers=h))
                sent = time.perf_counter()
                await asyncio.gather(*acks)
                done = time.perf_counter()
                print(
                    f"| {label} | {COUNT / (sent - start):,.0f} | {COUNT / (done - start):,.0f} "
                    f"| {(done - start) / COUNT * 1e6:.0f} |"
                )
            await nc.close()
        finally:
            await server.stop()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
