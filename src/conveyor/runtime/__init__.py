"""The stage runtime: consumer loop, key-ordered concurrency, retries, dead letters."""

from conveyor.runtime.worker import HandlerContext, StageWorker

__all__ = ["HandlerContext", "StageWorker"]
