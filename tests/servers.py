"""Real servers for tests, started from pip-installed binaries on free loopback ports."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path

from conveyor.embedded import find_binary, free_port, port_accepts, terminate


@dataclasses.dataclass
class NatsServer:
    process: subprocess.Popen[bytes]
    port: int
    store_dir: Path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, store_dir: Path, port: int | None = None) -> NatsServer:
        port = port or free_port()
        process = subprocess.Popen(
            [find_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not port_accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                terminate(process.pid)
                raise RuntimeError(f"nats-server did not start on {port}")
            time.sleep(0.01)
        return cls(process, port, store_dir)

    def stop(self) -> None:
        terminate(self.process.pid)
        self.process.wait()
