"""Test helpers that are part of the product.

* ``StageHarness``: one stage with the real runtime on in-memory backends.
* ``MemoryEventLog``, ``MemoryStateStore``: the in-memory doubles of the seams.
* ``UpProcess``: ``conveyor up`` as a subprocess on free ports, cleaned up by PID.
"""

from conveyor.log.memory import MemoryEventLog
from conveyor.store.memory import MemoryStateStore
from conveyor.testing.harness import StageHarness
from conveyor.testing.process import UpProcess

__all__ = ["MemoryEventLog", "MemoryStateStore", "StageHarness", "UpProcess"]
