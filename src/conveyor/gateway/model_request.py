"""What the model APIs' requests share: the model asked for, and the features refused by name.

Unknown fields are kept aside and ignored, as OpenAI- and Anthropic-compatible servers do, except
the features no backend here implements (``unsupported``, each with what asks for it). Their "off"
values are accepted, since some clients send them always; asking for one is refused rather than
answered as if it had not been.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError


def given(value: Any) -> bool:
    return value is not None


def what_is_wrong(exc: ValidationError) -> tuple[str, str]:
    """The field and the reason of a refused request body, the error that says most: of a union
    (text or a list of parts), the branch that got furthest, not the first one tried."""
    errors = exc.errors(include_url=False)
    telling = max(errors, key=lambda e: len(e["loc"]))  # the first of the deepest
    # The location without pydantic's names for the union's branches ("list[tagged-union[…]]").
    where = ".".join(str(p) for p in telling["loc"] if not (isinstance(p, str) and "[" in p))
    return where, telling["msg"].removeprefix("Value error, ")


class ModelRequest(BaseModel):
    """A request to one of the models this deployment serves."""

    model_config = ConfigDict(extra="allow")
    unsupported: ClassVar[dict[str, Callable[[Any], bool]]] = {}

    model: str

    def refused_field(self) -> str | None:
        """The first feature asked for that is not implemented here, if any."""
        extra = self.model_extra or {}
        return next(
            (name for name, asks in self.unsupported.items() if name in extra and asks(extra[name])), None
        )
