"""The stage runtime: consumer loop, key-ordered concurrency, retries, dead letters."""

from conveyor.runtime.worker import StageWorker

__all__ = ["StageWorker"]
