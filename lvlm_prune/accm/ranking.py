"""ACCM's self-supervised ranking of caption candidates.

The frozen LVLM is run teacher-forced on the answer twice: with all visual tokens (the reference)
and with the pruned tokens plus a candidate caption. A candidate is as good as the answer
distribution it restores: its score is the mean KL(reference || pruned + caption) over the answer
positions. The lowest-KL candidate is the pseudo-label; the KL margin (mean - min) says how much
the choice matters and weights the sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def answer_kl(
    reference_logits: torch.Tensor,
    candidate_logits: torch.Tensor,
    answer_mask: torch.Tensor,
) -> torch.Tensor:
    """Mean KL(reference || candidate) over the answer positions, in float32.

    Both logit tensors hold, at column j, the prediction of the same answer token j (the caller
    gathers them from runs whose prompts have different lengths).

    Args:
        reference_logits: (B, L, V) full-token run.
        candidate_logits: (B, M, L, V), or (B * M, L, V) sample-major, pruned + caption runs.
        answer_mask: (B, L) True at answer positions (EOS included).

    Returns:
        (B, M) mean KL per candidate; 0 for a sample with no answer position.
    """
    batch, length, vocab = reference_logits.shape
    if candidate_logits.dim() == 3:
        if candidate_logits.shape[0] % batch:
            raise ValueError(
                f"candidate_logits batch {candidate_logits.shape[0]} is not a multiple of the reference batch {batch}"
            )
        # the candidate count explicitly: with no answer position (length 0) -1 cannot be inferred
        candidate_logits = candidate_logits.reshape(batch, candidate_logits.shape[0] // batch, length, vocab)
    if candidate_logits.dim() != 4 or candidate_logits.shape[0] != batch or candidate_logits.shape[2:] != (length, vocab):
        raise ValueError(
            f"candidate_logits shape {tuple(candidate_logits.shape)} does not fit reference {(batch, length, vocab)}"
        )
    if answer_mask.shape != (batch, length):
        raise ValueError(f"answer_mask shape {tuple(answer_mask.shape)} != {(batch, length)}")
    reference_logp = torch.log_softmax(reference_logits.float(), -1)[:, None]
    candidate_logp = torch.log_softmax(candidate_logits.float(), -1)
    per_position = F.kl_div(candidate_logp, reference_logp, log_target=True, reduction="none").sum(-1)
    mask = answer_mask.bool()[:, None].to(per_position.dtype)
    return (per_position * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def pseudo_labels(kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best candidate and margin weight per sample.

    Args:
        kl: (B, M) candidate KLs.

    Returns:
        best (B,) index of the lowest KL, and margin (B,) = mean - min KL, detached.
    """
    kl = kl.detach()
    best = kl.argmin(-1)
    margin = kl.mean(-1) - kl.min(-1).values
    return best, margin


def preference_pairs(kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen (lowest KL) and rejected (highest KL) candidate per sample, for DPO.

    Args:
        kl: (B, M) candidate KLs.

    Returns:
        chosen (B,) and rejected (B,) indices.
    """
    kl = kl.detach()
    return kl.argmin(-1), kl.argmax(-1)


def caption_and_selector_losses(
    caption_nll: torch.Tensor,
    selector_scores: torch.Tensor,
    kl: torch.Tensor,
    eps: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """Margin-weighted pseudo-label losses for the caption model and the selector.

    Each sample is weighted by its KL margin w = mean - min; both losses are the weighted mean
    sum_b w_b * loss_b / sum_b w_b. Normalising by the weight sum keeps the loss scale independent
    of how large KLs are in a batch (it only decides which samples count more); a batch where every
    margin is 0 (all candidates equally good) gives 0 with zero gradient.

    Args:
        caption_nll: (B, M) mean token NLL of every candidate under the caption model.
        selector_scores: (B, M) selector scores (-inf allowed for masked candidates).
        kl: (B, M) candidate KLs (no gradient is taken through them).
        eps: floor of the weight sum.

    Returns:
        {"caption": scalar CE of the best candidate, "selector": scalar CE of the selector toward it}.
    """
    if not caption_nll.shape == selector_scores.shape == kl.shape:
        raise ValueError(
            f"caption_nll {tuple(caption_nll.shape)}, selector_scores {tuple(selector_scores.shape)} "
            f"and kl {tuple(kl.shape)} must have the same (B, M) shape"
        )
    best, margin = pseudo_labels(kl)
    weights = margin.to(caption_nll.dtype)
    total = weights.sum().clamp_min(eps)
    caption = caption_nll.gather(1, best[:, None]).squeeze(1)
    selector = F.cross_entropy(selector_scores.float(), best, reduction="none")
    return {
        "caption": (weights * caption).sum() / total,
        "selector": (weights.float() * selector).sum() / total.float(),
    }


def gate_loss(gate_logits: torch.Tensor, kl_caption: torch.Tensor, kl_no_caption: torch.Tensor,
              eps: float = 1e-8) -> torch.Tensor:
    """Weighted logistic loss of the caption gate: target 1 where the caption that would be spliced restores the
    reference better than no caption (lower KL), each sample weighted by |KL difference| and normalised by the weight
    sum. The minimiser's decision (logit > 0) is then "splice where the caption lowers the KL in expectation", not
    "where it lowers it more often than not"; a batch where nothing differs gives 0.

    Args:
        gate_logits: (B,) gate logits.
        kl_caption: (B,) KL with the caption that would be spliced (no gradient is taken through it).
        kl_no_caption: (B,) KL of the pruned prompt without a caption.
        eps: floor of the weight sum.
    """
    if not gate_logits.shape == kl_caption.shape == kl_no_caption.shape or gate_logits.dim() != 1:
        raise ValueError(f"gate_logits {tuple(gate_logits.shape)}, kl_caption {tuple(kl_caption.shape)} and "
                         f"kl_no_caption {tuple(kl_no_caption.shape)} must have the same (B,) shape")
    difference = (kl_no_caption - kl_caption).detach().float()
    losses = F.binary_cross_entropy_with_logits(gate_logits.float(), (difference > 0).float(), reduction="none")
    weights = difference.abs()
    return (weights * losses).sum() / weights.sum().clamp_min(eps)


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    reference_chosen_logp: torch.Tensor,
    reference_rejected_logp: torch.Tensor,
    beta: float = 0.1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Direct preference optimisation loss, -log sigmoid(beta * (policy margin - reference margin)).

    Args:
        policy_chosen_logp: (B,) summed log-prob of the chosen caption under the trained model.
        policy_rejected_logp: (B,) same for the rejected caption.
        reference_chosen_logp: (B,) chosen caption under the frozen reference caption model.
        reference_rejected_logp: (B,) rejected caption under the reference.
        beta: inverse temperature of the implicit reward.
        weights: (B,) optional sample weights (e.g. the KL margin); the loss is their weighted mean.

    Returns:
        scalar loss (log 2 when the policy equals the reference).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logits = beta * ((policy_chosen_logp - reference_chosen_logp)
                     - (policy_rejected_logp - reference_rejected_logp))
    losses = -F.logsigmoid(logits)
    if weights is None:
        return losses.mean()
    weights = weights.detach().to(losses.dtype)
    return (weights * losses).sum() / weights.sum().clamp_min(1e-8)
