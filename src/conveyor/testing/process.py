"""``conveyor up`` (or ``worker``, ``gateway``, ``projector``) as a subprocess, for end-to-end
tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from conveyor.embedded import STATE_FILE, terminate


class UpProcess:
    """Starts ``conveyor up --port 0`` (or another ``command``: the port is given to those that
    serve HTTP) and learns its URLs from its banner."""

    def __init__(
        self, data_dir: Path, *args: str, command: str = "up", env: Mapping[str, str] | None = None
    ) -> None:
        self.data_dir, self.args, self.command = data_dir, args, command
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_url = ""
        self.metrics_urls: list[str] = []
        self.output: list[str] = []
        self._more_output = threading.Condition()
        self.started = False

    def start(self, timeout: float = 30) -> UpProcess:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conveyor",
                self.command,
                # a free port for whatever serves HTTP
                *(("--port", "0") if self.command in ("up", "gateway") else ()),
                "--data-dir",
                str(self.data_dir),
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        self.output.clear()
        self.started = False
        ready = threading.Event()
        threading.Thread(target=self._read_output, args=(self.process, ready), daemon=True).start()
        if not ready.wait(timeout) or not self.started:
            self.cleanup()
            raise RuntimeError(f"conveyor {self.command} did not start:\n" + "".join(self.output))
        return self

    def _read_output(self, process: subprocess.Popen[bytes], ready: threading.Event) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            with self._more_output:
                self.output.append(line)
                self._more_output.notify_all()
            if found := re.search(r"gateway (http://\S+) ", line):
                self.url = found.group(1)
            if found := re.search(r"worker metrics: (.+)$", line):
                self.metrics_urls = found.group(1).split()
            if found := re.search(r"log:? (\w+://[^\s;]+)", line):
                self.log_url = found.group(1)
            if "Ctrl-C drains" in line:  # the last line of the banner
                self.started = True
                ready.set()
        ready.set()  # exited: let start() report the output

    def wait_for(self, pattern: str, timeout: float = 30) -> str:
        """The first line of its output (both streams, its workers' too) that ``pattern`` is found
        in, waiting up to ``timeout`` seconds for it (TimeoutError)."""
        with self._more_output:
            found = self._more_output.wait_for(
                lambda: next((line for line in self.output if re.search(pattern, line)), None), timeout
            )
        if found is None:
            raise TimeoutError(f"no line matching {pattern!r} within {timeout} s:\n" + "".join(self.output))
        return found

    @property
    def nats_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads((self.data_dir / "nats" / STATE_FILE).read_text())["pid"])
        return None

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        """SIGTERM (what Ctrl-C does): drains, stops the bundled server; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise

    def cleanup(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.kill9()
            if self.process.stdout is not None:
                self.process.stdout.close()
        pid = self.nats_pid
        if pid is not None:
            terminate(pid, grace=2)
