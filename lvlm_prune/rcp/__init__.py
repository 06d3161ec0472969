"""RCP (Representation Consistency Pruner) plug-in modules, losses and schedules as plain tensor code.

The pruned-forward engine feeds these with a pruning layer's hidden states and attention statistics;
nothing here depends on a particular base model beyond its hidden size.
"""

from lvlm_prune.rcp.adapter import DelayedRepairAdapter, PrunedContextEncoder
from lvlm_prune.rcp.losses import (
    REPAIR_STATISTICS,
    answer_ce,
    repair_loss,
    saliency_ranking_loss,
    sparsity_loss,
)
from lvlm_prune.rcp.pruner import (
    CrossAttentionPruner,
    gumbel_sigmoid,
    layer_averaged_keep_fraction,
    threshold_keep,
)
from lvlm_prune.rcp.schedules import (
    RCPSchedule,
    RCPScheduleState,
    WarmupCosineLambda,
    gumbel_noise_enabled,
    gumbel_temperature,
    sparsity_target_keep,
    training_progress,
    warmup_cosine_lr_lambda,
)

__all__ = [
    "CrossAttentionPruner",
    "DelayedRepairAdapter",
    "PrunedContextEncoder",
    "REPAIR_STATISTICS",
    "RCPSchedule",
    "RCPScheduleState",
    "WarmupCosineLambda",
    "answer_ce",
    "gumbel_noise_enabled",
    "gumbel_sigmoid",
    "gumbel_temperature",
    "layer_averaged_keep_fraction",
    "repair_loss",
    "saliency_ranking_loss",
    "sparsity_loss",
    "sparsity_target_keep",
    "threshold_keep",
    "training_progress",
    "warmup_cosine_lr_lambda",
]
