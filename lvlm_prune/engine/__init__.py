"""The pruned-forward engine: a LLaVA-family model run with a visual-token schedule (no Lightning)."""

from lvlm_prune.engine.engine import EngineOutput, PrunedLlava
from lvlm_prune.engine.methods import (
    KeepWeightProbe,
    LayerContext,
    ModelInfo,
    PreLLMContext,
    PruningMethod,
    per_sample,
    top_k_mask,
)
from lvlm_prune.engine.state import SequenceState, gather_rows

__all__ = ["EngineOutput", "KeepWeightProbe", "LayerContext", "ModelInfo", "PreLLMContext", "PrunedLlava",
           "PruningMethod", "SequenceState", "gather_rows", "per_sample", "top_k_mask"]
