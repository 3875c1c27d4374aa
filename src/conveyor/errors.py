"""The exception tree of Conveyor.

    ConveyorError
    ├── RetryableError          transient: the runtime retries with backoff
    │   └── UnavailableError    a backend (log, store, model server) cannot be reached
    ├── PermanentError          retrying cannot help: the event goes to the dead-letter topic
    │   ├── InvalidEventError   an event that cannot be decoded or validated (also a ValueError)
    │   └── RejectedError       a policy refused the request (safety, limits); carries a code
    ├── NotFoundError           an unknown request id (also a KeyError)
    └── MissingExtraError       an optional backend whose extra is not installed (also an ImportError)

Handlers raise these; the runtime decides retry vs dead-letter from the class alone.
Any other exception escaping a handler counts as retryable: an unexpected bug in a
handler should not silently drop a request before its retries are spent.
"""

from __future__ import annotations


class ConveyorError(Exception):
    """Root of every error Conveyor raises on purpose."""


class RetryableError(ConveyorError):
    """A transient failure: the same input may succeed later."""


class UnavailableError(RetryableError):
    """A backend could not be reached."""


class DeferredError(RetryableError):
    """Try again later, from the broker: the event is handed back for redelivery in ``delay``
    seconds (None: the stage's backoff for its delivery count), and holds no worker meanwhile."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(ConveyorError):
    """The same input will fail again: dead-letter it with the reason."""


class InvalidEventError(PermanentError, ValueError):
    """An event whose envelope or payload does not decode or validate."""


class RejectedError(PermanentError):
    """A policy refused the request; ``code`` is machine-readable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NotFoundError(ConveyorError, KeyError):
    """No such request."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class MissingExtraError(ConveyorError, ImportError):
    """An optional backend is used without its extra installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(f"{module} is not installed: pip install 'conveyor[{extra}]'")
