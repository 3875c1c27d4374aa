"""The built-in stages of DESIGN.md §2."""

from conveyor.stages.deliver import deliver_stage
from conveyor.stages.finalize import finalize_stage
from conveyor.stages.generate import CancelWatch, ChunkPolicy, generate_stage
from conveyor.stages.prepare import SafetyPolicy, prepare_stage

__all__ = [
    "CancelWatch",
    "ChunkPolicy",
    "SafetyPolicy",
    "deliver_stage",
    "finalize_stage",
    "generate_stage",
    "prepare_stage",
]
