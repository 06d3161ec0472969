"""RCP Delayed Repair Adapter (DRA) and the context it reads (METHODS.md §3).

At each pruning layer, `PrunedContextEncoder` caches a small vector summarising what was dropped and
what is left; at the repair layers, `DelayedRepairAdapter` FiLM-modulates the residual stream at
answer-generation positions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lvlm_prune.rcp.pruner import _check_shape, _masked_mean


class PrunedContextEncoder(nn.Module):
    """Context of one pruning layer: what was pruned there, and which positions are still kept.

    context = Linear(LayerNorm(mean of the pruned tokens' hidden states))   (0 if none pruned)
            + Linear(num_positions -> context_dim)(keep_mask)

    The position term is a Linear over the 0/1 kept mask, i.e. the sum of one learned embedding per
    kept position plus a bias: it encodes both which positions and how many survive (a mean over
    kept positions would lose the count). The pruned-token term has no bias and its LayerNorm no
    shift, so it is exactly zero when nothing was pruned; the norm stops the residual stream's
    outlier channels from dominating the projection.

    Args:
        hidden_size: width d of the base LLM's hidden states.
        context_dim: width of the cached context.
        num_positions: number of visual tokens N (the length of keep_mask); keyword-only.
    """

    def __init__(self, hidden_size: int, context_dim: int = 512, *, num_positions: int) -> None:
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size), ("context_dim", context_dim), ("num_positions", num_positions),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        self.hidden_size = hidden_size
        self.context_dim = context_dim
        self.num_positions = num_positions
        self.pruned_norm = nn.LayerNorm(hidden_size, bias=False)
        self.pruned_proj = nn.Linear(hidden_size, context_dim, bias=False)
        self.position_embedding = nn.Linear(num_positions, context_dim)

    def forward(
        self, hidden: torch.Tensor, pruned_mask: torch.Tensor, keep_mask: torch.Tensor
    ) -> torch.Tensor:
        """Context vector of the pruning layer.

        Args:
            hidden: (B, N, d) hidden states of the visual tokens at the pruning layer.
            pruned_mask: (B, N) bool, true at tokens dropped at this layer.
            keep_mask: (B, N) bool or float, tokens still present after this layer.

        Returns:
            (B, context_dim) context in the encoder's dtype.
        """
        _check_shape("hidden", hidden, (None, self.num_positions, self.hidden_size))
        batch = hidden.shape[0]
        _check_shape("pruned_mask", pruned_mask, (batch, self.num_positions))
        _check_shape("keep_mask", keep_mask, (batch, self.num_positions))
        dtype = self.position_embedding.weight.dtype
        pruned_mean = _masked_mean(hidden.to(dtype), pruned_mask.bool(), dim=1)
        # LayerNorm maps the all-zero mean (nothing pruned) to zero, and the Linear has no bias.
        pruned_term = self.pruned_proj(self.pruned_norm(pruned_mean))
        kept = (keep_mask > 0.5) if keep_mask.dtype != torch.bool else keep_mask
        return pruned_term + self.position_embedding(kept.to(dtype))


class DelayedRepairAdapter(nn.Module):
    """FiLM bottleneck adapter on the residual stream of a repair layer, at answer positions only.

    out = x + alpha * Up(gamma * GELU(Down(n(x))) + beta)    where answer_mask, else out = x exactly
    gamma = 1 + W_gamma(cond), beta = W_beta(cond), cond = context + proj(n(x))

    n is a LayerNorm (the residual stream's scale grows with depth and has outlier channels).
    W_gamma and W_beta start at zero (no modulation). Up starts small, N(0, up_init_std) with a zero
    bias, rather than zero: the adapter is then almost, not exactly, the identity at answer
    positions, and Down, W_gamma, W_beta and alpha get a gradient from the first step (proj from the
    second, once W_gamma and W_beta are non-zero); up_init_std=0 gives an exact identity at init
    instead, at the cost of a first step that trains Up alone.

    Args:
        hidden_size: width d of the base LLM's hidden states.
        context_dim: width of the cached pruning context.
        bottleneck: width of Down/Up.
        alpha_init: initial value of the learnable output scale alpha.
        up_init_std: standard deviation of Up's initial weights (0 = zeros).
    """

    def __init__(
        self,
        hidden_size: int,
        context_dim: int = 512,
        bottleneck: int = 64,
        alpha_init: float = 0.1,
        up_init_std: float = 1e-3,
    ) -> None:
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size), ("context_dim", context_dim), ("bottleneck", bottleneck),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if up_init_std < 0:
            raise ValueError(f"up_init_std={up_init_std} must be >= 0")
        self.hidden_size = hidden_size
        self.context_dim = context_dim
        self.norm = nn.LayerNorm(hidden_size)
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        self.cond_proj = nn.Linear(hidden_size, context_dim)
        self.film_gamma = nn.Linear(context_dim, bottleneck)
        self.film_beta = nn.Linear(context_dim, bottleneck)
        # shape (1,), not 0-d: DeepSpeed's parameter broadcast cannot view a 0-d tensor as bytes
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        nn.init.normal_(self.up.weight, std=up_init_std)
        nn.init.zeros_(self.up.bias)
        for layer in (self.film_gamma, self.film_beta):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """Repair the residual stream at answer-generation positions.

        Args:
            x: (B, L, d) residual-stream output of the repair layer.
            context: (B, context_dim) pruning context (sum or mean of the cached contexts).
            answer_mask: (B, L) bool, true at answer-generation positions (last prompt token and
                answer tokens).

        Returns:
            (B, L, d) in x's dtype; equal to x wherever answer_mask is false.
        """
        _check_shape("x", x, (None, None, self.hidden_size))
        batch, length = x.shape[:2]
        _check_shape("context", context, (batch, self.context_dim))
        _check_shape("answer_mask", answer_mask, (batch, length))
        answer_mask = answer_mask.bool()
        # Only the few answer positions are computed (prompts are long, answers short).
        batch_index, position_index = answer_mask.nonzero(as_tuple=True)
        dtype = self.alpha.dtype
        selected = x[batch_index, position_index].to(dtype)
        normed = self.norm(selected)
        cond = context.to(dtype)[batch_index] + self.cond_proj(normed)
        gamma = 1.0 + self.film_gamma(cond)
        beta = self.film_beta(cond)
        delta = self.alpha * self.up(gamma * F.gelu(self.down(normed)) + beta)
        repaired = x.index_put((batch_index, position_index), (selected + delta).to(x.dtype))
        return repaired
