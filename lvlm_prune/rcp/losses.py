"""RCP training objectives (METHODS.md §3): answer CE, repair loss, sparsity loss.

All losses are computed in float32 and return 0-d tensors. Where there is nothing to average
(no answer token), they return a zero that is still connected to the student's graph, so a step
with such a batch runs backward like any other (and DDP sees every parameter used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lvlm_prune.engine.methods import top_k_mask
from lvlm_prune.rcp.pruner import _check_shape

REPAIR_STATISTICS = ("mean_var", "mean_std")


def repair_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    variance_weight: float = 3.0,
    statistic: str = "mean_var",
    std_eps: float = 1e-6,
) -> torch.Tensor:
    """Match first- and second-order feature statistics of student and teacher at masked positions.

    loss = mse(mean_s, mean_t) + variance_weight * mse(spread_s, spread_t), where mean and the
    biased variance are per feature over all masked positions of the batch, and spread is the
    variance ("mean_var") or sqrt(variance + std_eps) ("mean_std"). The teacher is detached.
    Average this over repair layers in the caller.

    Args:
        student: (B, L, d) hidden states of the pruned student (after repair).
        teacher: (B, L, d) hidden states of the full-token teacher at the same positions.
        mask: (B, L) bool, true at answer-generation positions.
        variance_weight: weight of the second-order term (>= 0).
        statistic: "mean_var" or "mean_std".
        std_eps: added to the variance before the square root ("mean_std"), so that a single
            position (variance 0) has a finite gradient.

    Returns:
        0-d float32 tensor; a graph-connected zero when the mask is empty.
    """
    if statistic not in REPAIR_STATISTICS:
        raise ValueError(f"statistic={statistic!r} must be one of {REPAIR_STATISTICS}")
    if variance_weight < 0:
        raise ValueError(f"variance_weight={variance_weight} must be >= 0")
    if student.dim() != 3:
        raise ValueError(f"student has shape {tuple(student.shape)}, expected (B, L, d)")
    _check_shape("teacher", teacher, tuple(student.shape))
    _check_shape("mask", mask, tuple(student.shape[:2]))
    mask = mask.bool()
    selected_student = student[mask].float()
    if selected_student.shape[0] == 0:
        return selected_student.sum() * 0.0
    selected_teacher = teacher.detach()[mask].float()
    mean_s = selected_student.mean(dim=0)
    mean_t = selected_teacher.mean(dim=0)
    var_s = selected_student.var(dim=0, unbiased=False)
    var_t = selected_teacher.var(dim=0, unbiased=False)
    if statistic == "mean_std":
        var_s = (var_s + std_eps).sqrt()
        var_t = (var_t + std_eps).sqrt()
    return F.mse_loss(mean_s, mean_t) + variance_weight * F.mse_loss(var_s, var_t)


def sparsity_loss(realised_keep_fraction: torch.Tensor, target_keep_fraction: float) -> torch.Tensor:
    """Budget loss |r_bar - r*|, written on the kept fraction.

    On the kept fraction k = 1 - r it has the same value and gradient magnitude as on the prune
    ratio: |(1 - k_bar) - (1 - k*)| = |k_bar - k*|. The schedule (`sparsity_target_keep`) anneals
    the target kept fraction k* from 1 down to 1 - r.

    Args:
        realised_keep_fraction: 0-d tensor, layer-averaged kept fraction of visual tokens.
        target_keep_fraction: target kept fraction in [0, 1].

    Returns:
        0-d float32 tensor.
    """
    if not 0.0 <= target_keep_fraction <= 1.0:
        raise ValueError(f"target_keep_fraction={target_keep_fraction} must be in [0, 1]")
    if realised_keep_fraction.dim() != 0:
        raise ValueError(
            f"realised_keep_fraction has shape {tuple(realised_keep_fraction.shape)}, expected a 0-d tensor"
        )
    return (realised_keep_fraction.float() - target_keep_fraction).abs()


def answer_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Causal-LM cross-entropy averaged over answer tokens: logits[:, t] predicts labels[:, t + 1].

    Args:
        logits: (B, L, V) next-token logits.
        labels: (B, L) token ids, `ignore_index` where no loss is taken (prompt, padding).
        ignore_index: label value to skip.

    Returns:
        0-d float32 tensor; a graph-connected zero when no label is set.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits has shape {tuple(logits.shape)}, expected (B, L, V)")
    _check_shape("labels", labels, tuple(logits.shape[:2]))
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=ignore_index, reduction="sum")
    count = (shifted_labels != ignore_index).sum().clamp_min(1)
    return total / count


def saliency_ranking_loss(logits: torch.Tensor, present: torch.Tensor, saliency: torch.Tensor,
                          keep: int) -> torch.Tensor:
    """Listwise ranking of a pruner's keep logits against the answer's saliency (an addition to METHODS.md).

    Per sample, the target is uniform over the `keep` present tokens of highest saliency (fewer when fewer are
    present), and the loss is the cross-entropy of the softmax of the logits over the present tokens against it,
    minus its minimum log(k): 0 when the pruner's scores rank exactly those tokens first, by an unbounded margin.
    Shift-invariant, so it leaves the level of the logits, and with it the kept fraction, to the sparsity loss.

    Args:
        logits: (B, N) keep logits of one pruning layer.
        present: (B, N) bool, tokens still present at that layer (only they are ranked).
        saliency: (B, N) how much keeping each token lowers the answer loss (e.g. -dCE/d(keep weight)); no
            gradient flows into it.
        keep: tokens the layer keeps at the training budget.

    Returns:
        0-d float32 tensor, the mean over samples with a present token; a graph-connected zero when there is none.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits has shape {tuple(logits.shape)}, expected (B, N)")
    _check_shape("present", present, tuple(logits.shape))
    _check_shape("saliency", saliency, tuple(logits.shape))
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1")
    present = present.bool()
    counts = present.sum(1)
    rows = counts > 0
    if not rows.any():
        return logits.float().sum() * 0.0
    k = counts.clamp(max=keep)
    target = top_k_mask(saliency.detach(), present, keep)
    log_p = logits.float().masked_fill(~present, float("-inf")).log_softmax(dim=1)
    chosen = torch.where(target, log_p, torch.zeros_like(log_p)).sum(1)
    per_sample = -chosen / k.clamp_min(1) - k.clamp_min(1).float().log()
    return per_sample[rows].mean()
