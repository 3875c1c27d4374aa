"""Conveyor: event-driven orchestration for real-time generative AI.

The public API: declare stages, run them against an event log and a state store,
and use the in-memory backends in tests (see ``conveyor.testing``).
"""

from conveyor.errors import (
    ConveyorError,
    DeferredError,
    InvalidEventError,
    MissingExtraError,
    NotFoundError,
    PermanentError,
    RejectedError,
    RetryableError,
    UnavailableError,
)
from conveyor.events import Envelope, Topic, new_event
from conveyor.log.base import Delivery, EventLog, Subscription, Tailed
from conveyor.models.base import Embedder, Embedding, GenerationRequest, ModelBackend, ModelInfo, Token
from conveyor.pipeline import BatchPolicy, Output, Pipeline, RetryPolicy, Stage, StageContext
from conveyor.runtime.worker import StageWorker
from conveyor.store.base import Entry, Namespace, StateStore
from conveyor.view import RequestView

__version__ = "0.1.0"

__all__ = [
    "BatchPolicy",
    "ConveyorError",
    "DeferredError",
    "Delivery",
    "Embedder",
    "Embedding",
    "Entry",
    "Envelope",
    "EventLog",
    "GenerationRequest",
    "InvalidEventError",
    "MissingExtraError",
    "ModelBackend",
    "ModelInfo",
    "Namespace",
    "NotFoundError",
    "Output",
    "PermanentError",
    "Pipeline",
    "RejectedError",
    "RequestView",
    "RetryPolicy",
    "RetryableError",
    "Stage",
    "StageContext",
    "StageWorker",
    "StateStore",
    "Subscription",
    "Tailed",
    "Token",
    "Topic",
    "UnavailableError",
    "__version__",
    "new_event",
]
