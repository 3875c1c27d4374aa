"""Event log backends behind the ``EventLog`` protocol."""

from conveyor.log.base import Delivery, EventLog, Lag, Subscription, Tailed
from conveyor.log.memory import MemoryEventLog

__all__ = ["Delivery", "EventLog", "Lag", "MemoryEventLog", "Subscription", "Tailed"]
