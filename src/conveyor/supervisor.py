"""Stage worker processes started and watched by ``conveyor up``.

The gateway stays in the parent; the stages run in children (``conveyor worker``), so
the two use separate cores. A child that dies is restarted with backoff. Children
ask the kernel to kill them when the parent dies (PR_SET_PDEATHSIG), so ``kill -9``
of ``conveyor up`` never leaves stage workers behind; their unacknowledged events
are redelivered to the next run. Ctrl-C in a terminal reaches the children too;
they drain on their own while the parent waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Sequence

from conveyor.cli import READY
from conveyor.embedded import free_port
from conveyor.errors import UnavailableError

logger = logging.getLogger("conveyor.supervisor")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Called first thing in a worker started by ``conveyor up``: follow the parent's death."""
    parent = os.environ.get("CONVEYOR_PARENT_PID")
    if not parent:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(1)


class WorkerProcesses:
    def __init__(self, count: int, stages: Sequence[str], env: dict[str, str]) -> None:
        self._count, self._stages, self._env = count, tuple(stages), env
        # Each worker serves its own /metrics (a Prometheus target per process).
        self.metrics_ports = [free_port() for _ in range(count)]
        self._processes: list[asyncio.subprocess.Process | None] = [None] * count
        self._stopping = False
        self._ready = [asyncio.Event() for _ in range(count)]
        self._failure = ""
        self._readers: set[asyncio.Task[None]] = set()

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        env = {
            **os.environ,
            **self._env,
            "CONVEYOR_PARENT_PID": str(os.getpid()),
            "CONVEYOR_METRICS_PORT": str(self.metrics_ports[index]),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "conveyor",
            "worker",
            *self._stages,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,  # their banner tells when they are ready; it is not shown
        )
        self._processes[index] = process
        reader = asyncio.create_task(self._watch_banner(index, process))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        return process

    async def _watch_banner(self, index: int, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:  # read to the end, so a child never blocks on the pipe
            if line.decode(errors="replace").rstrip("\n") == READY:
                self._ready[index].set()

    async def ready(self) -> None:
        """Returns once every worker has subscribed to its topics; raises if one exits first."""
        await asyncio.gather(*(event.wait() for event in self._ready))
        if self._failure:
            raise UnavailableError(self._failure)

    async def run(self) -> None:
        """Start every worker and keep them running until ``stop``."""
        await asyncio.gather(*(self._keep(i) for i in range(self._count)))

    async def _keep(self, index: int) -> None:
        backoff = 0.5
        while not self._stopping:
            code = await (await self._spawn(index)).wait()
            if self._stopping:
                return
            if not self._ready[index].is_set():  # it never started: a restart will not help
                self._failure = f"worker process {index} ({' '.join(self._stages)}) exited with {code}"
                for event in self._ready:
                    event.set()
                return
            logger.error(
                "worker %d (%s) exited with %s; restarting in %.1fs", index, self._stages, code, backoff
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def stop(self, grace: float = 30.0) -> None:
        """SIGTERM (the workers drain), then SIGKILL whatever is left after ``grace``."""
        self._stopping = True
        live = [p for p in self._processes if p is not None and p.returncode is None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in live:
            try:
                async with asyncio.timeout(grace):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
