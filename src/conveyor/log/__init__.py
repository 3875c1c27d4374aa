"""Event log backends behind the ``EventLog`` protocol."""

from conveyor.log.base import Delivery, EventLog, Subscription, Tailed
from conveyor.log.memory import MemoryEventLog

__all__ = ["Delivery", "EventLog", "MemoryEventLog", "Subscription", "Tailed"]
