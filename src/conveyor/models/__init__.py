"""Model backends behind the ``ModelBackend`` protocol."""

from conveyor.models.base import GenerationRequest, ModelBackend, ModelInfo, Token
from conveyor.models.simulated import SimulatedModel

__all__ = ["GenerationRequest", "ModelBackend", "ModelInfo", "SimulatedModel", "Token"]
