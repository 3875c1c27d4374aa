"""What the model APIs' requests share: the model asked for, and the features refused by name.

Unknown fields are kept aside and ignored, as OpenAI- and Anthropic-compatible servers do, except
the features no backend here implements (``unsupported``, each with what asks for it). Their "off"
values are accepted, since some clients send them always; asking for one is refused rather than
answered as if it had not been.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


def given(value: Any) -> bool:
    return value is not None


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
