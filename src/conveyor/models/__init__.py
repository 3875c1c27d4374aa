"""Model backends behind the ``ModelBackend`` protocol."""

from conveyor.models.base import Embedder, Embedding, GenerationRequest, ModelBackend, ModelInfo, Token
from conveyor.models.simulated import SimulatedModel
from conveyor.models.tools import PromptedTools
from conveyor.payloads import Tool, ToolCall

__all__ = [
    "Embedder",
    "Embedding",
    "GenerationRequest",
    "ModelBackend",
    "ModelInfo",
    "PromptedTools",
    "SimulatedModel",
    "Token",
    "Tool",
    "ToolCall",
]
