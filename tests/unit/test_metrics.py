"""What /metrics says of the process itself, under the names every Prometheus client uses."""

from __future__ import annotations

import re
import time

from conveyor import __version__
from conveyor.observability.metrics import REGISTRY


def value(page: str, name: str) -> float:
    (found,) = re.findall(rf"^{name} (\S+)$", page, re.MULTILINE)
    return float(found)


def test_a_process_reports_its_cpu_memory_descriptors_start_and_version() -> None:
    before = REGISTRY.render()
    spin = time.process_time() + 0.05
    while time.process_time() < spin:  # CPU spent between the two pages
        pass
    after = REGISTRY.render()
    assert value(after, "process_cpu_seconds_total") >= value(before, "process_cpu_seconds_total") + 0.05
    assert value(after, "process_resident_memory_bytes") > 10_000_000  # a Python process, at least
    assert value(after, "process_open_fds") >= 3
    assert value(after, "process_start_time_seconds") <= time.time()
    assert f'conveyor_build_info{{version="{__version__}"}} 1' in after.splitlines()
    assert "# TYPE process_cpu_seconds_total counter" in after
