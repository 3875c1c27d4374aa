"""State store backends behind the ``StateStore`` protocol."""

from conveyor.store.base import Entry, Namespace, StateStore
from conveyor.store.memory import MemoryStateStore

__all__ = ["Entry", "MemoryStateStore", "Namespace", "StateStore"]
