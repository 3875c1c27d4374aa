"""Process-local metrics in the Prometheus text format (served at ``/metrics``).

Deliberately small: counters and histograms with fixed label sets, no client
library on the hot path. Each process exports its own; a scraper aggregates.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import resource
import threading
import time
from collections import defaultdict
from pathlib import Path

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
Labels = tuple[tuple[str, str], ...]
_STARTED = time.time()  # near enough: this module is imported as the process starts


def _fmt(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{v}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self._values: dict[Labels, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._values[tuple(sorted(labels.items()))] += amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_fmt(k)} {v}" for k, v in sorted(self._values.items())]
        return lines


class Gauge:
    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self._values: dict[Labels, float] = {}

    def set(self, value: float, **labels: str) -> None:
        self._values[tuple(sorted(labels.items()))] = value

    def value(self, **labels: str) -> float | None:
        return self._values.get(tuple(sorted(labels.items())))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        lines += [f"{self.name}{_fmt(k)} {v}" for k, v in sorted(self._values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = _BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = defaultdict(float)

    def count(self, **labels: str) -> int:
        return sum(self._counts.get(tuple(sorted(labels.items())), ()))

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sums[key] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, counts in sorted(self._counts.items()):
            running = 0
            for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                bucket = _fmt(key, 'le="' + le + '"')
                lines.append(f"{self.name}_bucket{bucket} {running}")
            lines.append(f"{self.name}_sum{_fmt(key)} {self._sums[key]}")
            lines.append(f"{self.name}_count{_fmt(key)} {running}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, help: str) -> Counter:
        with self._lock:
            metric = self._metrics.setdefault(name, Counter(name, help))
        assert isinstance(metric, Counter), f"{name} is not a counter"
        return metric

    def gauge(self, name: str, help: str) -> Gauge:
        with self._lock:
            metric = self._metrics.setdefault(name, Gauge(name, help))
        assert isinstance(metric, Gauge), f"{name} is not a gauge"
        return metric

    def histogram(self, name: str, help: str, buckets: tuple[float, ...] = _BUCKETS) -> Histogram:
        with self._lock:
            metric = self._metrics.setdefault(name, Histogram(name, help, buckets))
        assert isinstance(metric, Histogram), f"{name} is not a histogram"
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines += metric.render()
        return "\n".join(lines + _process()) + "\n"


def _process() -> list[str]:
    """What every Prometheus client library reports of its process, under the same names (so a
    dashboard made for them works), and which Conveyor this is."""
    from conveyor import __version__  # the package imports this module: not at import time

    usage = resource.getrusage(resource.RUSAGE_SELF)
    lines = [
        "# HELP process_cpu_seconds_total User and system CPU time spent, in seconds.",
        "# TYPE process_cpu_seconds_total counter",
        f"process_cpu_seconds_total {usage.ru_utime + usage.ru_stime}",
        "# HELP process_start_time_seconds Start time of the process since the epoch, in seconds.",
        "# TYPE process_start_time_seconds gauge",
        f"process_start_time_seconds {_STARTED}",
        "# HELP conveyor_build_info The Conveyor version this process runs (always 1).",
        "# TYPE conveyor_build_info gauge",
        f'conveyor_build_info{{version="{__version__}"}} 1',
    ]
    with contextlib.suppress(OSError):  # Linux's /proc; elsewhere these two are left out
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        fds = len(os.listdir("/proc/self/fd"))
        lines += [
            "# HELP process_resident_memory_bytes Resident memory size in bytes.",
            "# TYPE process_resident_memory_bytes gauge",
            f"process_resident_memory_bytes {pages * resource.getpagesize()}",
            "# HELP process_open_fds Number of open file descriptors.",
            "# TYPE process_open_fds gauge",
            f"process_open_fds {fds}",
        ]
    return lines


REGISTRY = Registry()

EVENTS_HANDLED = REGISTRY.counter("conveyor_events_total", "Events consumed by a stage, by outcome.")
HANDLE_SECONDS = REGISTRY.histogram("conveyor_handle_seconds", "Time a stage spent handling one event.")
RETRIES = REGISTRY.counter("conveyor_retries_total", "Handler attempts that failed and were retried.")
DEAD_LETTERS = REGISTRY.counter("conveyor_dead_letters_total", "Events sent to the dead-letter topic.")
REQUESTS_ACCEPTED = REGISTRY.counter("conveyor_requests_accepted_total", "Requests accepted by the gateway.")
USAGE_TOKENS = REGISTRY.counter("conveyor_usage_tokens_total", "Tokens recorded in the usage ledger.")
BATCH_SIZE = REGISTRY.histogram(
    "conveyor_batch_size", "Events per batch handed to a batching stage.", (1, 2, 4, 8, 16, 32, 64, 128, 256)
)
BATCH_WAIT = REGISTRY.histogram(
    "conveyor_batch_queue_wait_seconds", "Time an event waited for its batch to leave."
)
BATCH_LIMIT = REGISTRY.gauge(
    "conveyor_batch_limit", "The batch size limit in force (adapts with a latency target)."
)
PROMPT_TOKENS = REGISTRY.counter(
    "conveyor_model_prompt_tokens_total",
    "Prompt tokens the local model read, by source: computed, or cached (found in a slot's KV cache).",
)
ADMISSION_BACKLOG = REGISTRY.gauge(
    "conveyor_gateway_backlog", "Events on requests not yet acknowledged by prepare, as admission saw it."
)
ADMISSION_OVERLOADED = REGISTRY.gauge(
    "conveyor_gateway_overloaded", "1 while admission control refuses new submits (503 overloaded), else 0."
)
REQUESTS_REFUSED = REGISTRY.counter(
    "conveyor_gateway_refused_total", "Requests the gateway turned away before the log, by error code."
)
BLOB_BYTES = REGISTRY.counter(
    "conveyor_blob_bytes_total",
    "Event payloads over the log's size limit, in bytes: written to the blob store, or read back.",
)
# Requests last from milliseconds (a cached answer) to minutes (a long answer from a slow model).
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
REQUEST_SECONDS = REGISTRY.histogram(
    "conveyor_request_seconds",
    "From a request's acceptance to its end, by model and final status (counted by the projector).",
    _REQUEST_BUCKETS,
)
FIRST_TOKEN_SECONDS = REGISTRY.histogram(
    "conveyor_time_to_first_token_seconds",
    "From a completed request's acceptance to its first text generated, by model.",
    _REQUEST_BUCKETS,
)
