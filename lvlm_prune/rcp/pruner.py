"""RCP cross-attention pruner and the mask operations around it (METHODS.md §3).

Everything here works on plain tensors; the engine supplies the hidden states and attention
statistics of a pruning layer and applies the masks.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of `values` over `dim` where `mask` is true; 0 where the mask is empty."""
    weights = mask.to(values.dtype)
    while weights.dim() < values.dim():
        weights = weights.unsqueeze(-1)
    total = (values * weights).sum(dim)
    count = weights.sum(dim).clamp_min(1.0)
    return total / count


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple) -> None:
    """Raise a ValueError unless `tensor` has `expected` shape (None = any size)."""
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
    if not ok:
        wanted = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} has shape {shape}, expected {wanted}")


class CrossAttentionPruner(nn.Module):
    """Keep-logit predictor of one RCP pruning layer.

    logit_i = [log q2v_i - mean_kept(log q2v)]        (the LLM's own attention as baseline)
            + cross-attention score_i                 (question-shifted learned queries)
            + mlp score_i                             (per token)
            + bias                                    (init `init_bias`: starts near keep-all)

    The cross-attention score is put on the same scale as the baseline: the head-averaged
    attention weights a_qi (B, queries, N) are combined over queries in log space by a Linear
    (num_queries -> 1, initialised uniform 1/num_queries), s_i = sum_q w_q log a_qi, and enter as
    s_i - mean_kept(s), a log ratio against the kept tokens. Being scale-free, it does not grow with
    N, and it is close to 0 at init (small random queries attend almost uniformly). Combining the
    weights themselves and taking the log afterwards is ill-posed: a learned combination can be
    <= 0, and a floored log then gives most tokens the same value (no gradient) and a few a huge
    one (measured on the embedded default: most tokens at -0.5, two or three at +13).
    The LLM baseline floors its probabilities at `attention_floor`.
    Attention and both means are restricted to tokens with keep_mask > 0.5; no gradient flows
    through keep_mask here (the straight-through masks reach the loss through the engine; on the
    soft path an earlier layer's mask also reaches this one's logits through q2v, whose attention
    it weighted).

    Parts switched off are not built, so they hold no parameters (no unused parameters under DDP).

    Args:
        hidden_size: width d of the base LLM's hidden states.
        bottleneck: width the visual tokens are projected to (split over `num_heads`).
        num_queries: learnable queries of the cross-attention.
        num_heads: attention heads of the cross-attention.
        mlp_hidden: hidden width of the per-token MLP score.
        init_bias: initial value of the learnable logit bias.
        use_llm_baseline: add the log-ratio of the LLM's question->visual attention.
        use_cross_attention: add the cross-attention score.
        use_mlp: add the per-token MLP score.
        attention_floor: floor applied to attention probabilities before the log.
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck: int = 512,
        num_queries: int = 16,
        num_heads: int = 4,
        mlp_hidden: int = 256,
        init_bias: float = 2.0,
        use_llm_baseline: bool = True,
        use_cross_attention: bool = True,
        use_mlp: bool = True,
        attention_floor: float = 1e-6,
    ) -> None:
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size), ("bottleneck", bottleneck), ("num_queries", num_queries),
            ("num_heads", num_heads), ("mlp_hidden", mlp_hidden),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if use_cross_attention and bottleneck % num_heads:
            raise ValueError(f"bottleneck={bottleneck} is not divisible by num_heads={num_heads}")
        if not attention_floor > 0:
            raise ValueError(f"attention_floor={attention_floor} must be > 0")
        self.hidden_size = hidden_size
        self.bottleneck = bottleneck
        self.num_queries = num_queries
        self.num_heads = num_heads
        self.use_llm_baseline = use_llm_baseline
        self.use_cross_attention = use_cross_attention
        self.use_mlp = use_mlp
        self.attention_floor = attention_floor

        if use_cross_attention or use_mlp:
            # The LLM's normed states keep per-channel gains with outliers; LayerNorm puts the
            # projected tokens on one scale for both learned scores.
            self.visual_proj = nn.Sequential(nn.Linear(hidden_size, bottleneck), nn.LayerNorm(bottleneck))
        if use_cross_attention:
            self.queries = nn.Parameter(torch.randn(num_queries, bottleneck) * 0.02)
            self.question_proj = nn.Linear(hidden_size, bottleneck)
            self.query_proj = nn.Linear(bottleneck, bottleneck)
            self.key_proj = nn.Linear(bottleneck, bottleneck)
            self.query_combine = nn.Linear(num_queries, 1)
            nn.init.constant_(self.query_combine.weight, 1.0 / num_queries)
            nn.init.zeros_(self.query_combine.bias)
        if use_mlp:
            self.mlp = nn.Sequential(
                nn.Linear(bottleneck, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, 1)
            )
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        # shape (1,), not 0-d: DeepSpeed's parameter broadcast cannot view a 0-d tensor as bytes
        self.bias = nn.Parameter(torch.full((1,), float(init_bias)))

    def _centered_log(self, probabilities: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        log_p = probabilities.clamp_min(self.attention_floor).log()
        return log_p - _masked_mean(log_p, kept, dim=1).unsqueeze(1)

    def _validate(
        self,
        visual: torch.Tensor,
        q2v: torch.Tensor | None,
        question: torch.Tensor | None,
        question_mask: torch.Tensor | None,
        keep_mask: torch.Tensor,
    ) -> None:
        _check_shape("visual", visual, (None, None, self.hidden_size))
        batch, num_visual = visual.shape[:2]
        _check_shape("keep_mask", keep_mask, (batch, num_visual))
        if self.use_llm_baseline:
            if q2v is None:
                raise ValueError("q2v is required when use_llm_baseline=True")
            _check_shape("q2v", q2v, (batch, num_visual))
        if self.use_cross_attention:
            if question is None or question_mask is None:
                raise ValueError("question and question_mask are required when use_cross_attention=True")
            _check_shape("question", question, (batch, None, self.hidden_size))
            _check_shape("question_mask", question_mask, (batch, question.shape[1]))

    def components(
        self,
        visual: torch.Tensor,
        q2v: torch.Tensor | None,
        question: torch.Tensor | None,
        question_mask: torch.Tensor | None,
        keep_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The enabled logit terms, each (B, N) (`bias` has shape (1,)); see `forward`."""
        self._validate(visual, q2v, question, question_mask, keep_mask)
        dtype = self.bias.dtype
        kept = keep_mask > 0.5 if keep_mask.dtype != torch.bool else keep_mask
        terms: dict[str, torch.Tensor] = {}
        if self.use_llm_baseline:
            terms["llm_baseline"] = self._centered_log(q2v.to(dtype), kept)
        if self.use_cross_attention or self.use_mlp:
            projected = self.visual_proj(visual.to(dtype))
        if self.use_cross_attention:
            terms["cross_attention"] = self._cross_attention_score(
                projected, question.to(dtype), question_mask, kept
            )
        if self.use_mlp:
            terms["mlp"] = self.mlp(projected).squeeze(-1)
        terms["bias"] = self.bias
        return terms

    def _cross_attention_score(
        self,
        projected: torch.Tensor,
        question: torch.Tensor,
        question_mask: torch.Tensor,
        kept: torch.Tensor,
    ) -> torch.Tensor:
        batch, num_visual, _ = projected.shape
        head_dim = self.bottleneck // self.num_heads
        question_state = _masked_mean(question, question_mask.bool(), dim=1)
        queries = self.queries.unsqueeze(0) + self.question_proj(question_state).unsqueeze(1)
        q = self.query_proj(queries).view(batch, self.num_queries, self.num_heads, head_dim).transpose(1, 2)
        k = self.key_proj(projected).view(batch, num_visual, self.num_heads, head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        # A finite fill keeps a row with no kept token finite (uniform) instead of NaN.
        scores = scores.masked_fill(~kept[:, None, None, :], torch.finfo(scores.dtype).min)
        log_weights = torch.logsumexp(scores.log_softmax(dim=-1), dim=1) - math.log(self.num_heads)
        log_weights = log_weights.masked_fill(~kept[:, None, :], 0.0)  # dropped tokens: finite, unused
        combined = self.query_combine(log_weights.transpose(1, 2)).squeeze(-1)
        return combined - _masked_mean(combined, kept, dim=1).unsqueeze(1)

    def forward(
        self,
        visual: torch.Tensor,
        q2v: torch.Tensor | None,
        question: torch.Tensor | None,
        question_mask: torch.Tensor | None,
        keep_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Keep logits of the visual tokens.

        Args:
            visual: (B, N, d) visual hidden states after the layer's input norm.
            q2v: (B, N) question->visual attention probabilities of the layer, averaged over heads
                and question rows. May be None when use_llm_baseline=False.
            question: (B, Q, d) question hidden states after the input norm. May be None when
                use_cross_attention=False.
            question_mask: (B, Q) bool, true at real question tokens.
            keep_mask: (B, N) bool or float running cumulative mask (1 = still present).

        Returns:
            (B, N) keep logits in the pruner's dtype; finite also at already-dropped tokens.
        """
        terms = self.components(visual, q2v, question, question_mask, keep_mask)
        logits = terms.pop("bias").expand(visual.shape[:2])
        for term in terms.values():
            logits = logits + term
        return logits


def gumbel_sigmoid(
    logits: torch.Tensor,
    temperature: float,
    noise: bool = True,
    hard: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relaxed Bernoulli keep decision with logistic noise and a straight-through hard mask.

    Args:
        logits: (B, N) keep logits.
        temperature: relaxation temperature (> 0).
        noise: add logistic noise log(u) - log(1 - u), u ~ U(0, 1).
        hard: make the second output a straight-through mask (exactly 0/1 forward, gradient of
            the soft value backward); if False it equals the soft value.
        generator: random generator for the noise (on the logits' device).

    Returns:
        (soft, mask): soft = sigmoid((logits + noise) / temperature), both (B, N) in the logits' dtype.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    # Noise and relaxation in at least float32: bf16 (DeepSpeed's bf16 casts the plug-in) has 8 bits of mantissa,
    # so uniform draws in bf16 give noise far from logistic (std 4.3 instead of 1.8, draws at -87).
    dtype = logits.dtype
    logits = logits.to(torch.promote_types(dtype, torch.float32))
    if noise:
        finfo = torch.finfo(logits.dtype)
        uniform = torch.rand(
            logits.shape, generator=generator, device=logits.device, dtype=logits.dtype
        ).clamp(finfo.tiny, 1.0 - finfo.eps)
        logits = logits + uniform.log() - torch.log1p(-uniform)
    soft = torch.sigmoid(logits / temperature)
    if not hard:
        soft = soft.to(dtype)
        return soft, soft
    # hard + (soft - soft.detach()) is exactly 0/1 forward; (1 - s) + s need not be.
    hard_mask = (soft > 0.5).to(soft.dtype)
    return soft.to(dtype), (hard_mask + (soft - soft.detach())).to(dtype)


def threshold_keep(logits: torch.Tensor, temperature: float = 1.0, threshold: float = 0.5) -> torch.Tensor:
    """Inference keep decision sigmoid(logit / temperature) > threshold.

    Args:
        logits: (B, N) keep logits.
        temperature: the final training temperature (> 0).
        threshold: probability threshold in (0, 1); tune per layer to hit a budget.

    Returns:
        (B, N) bool keep mask (combine with the running cumulative mask).
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold} must be in (0, 1)")
    # sigmoid(z) > t  <=>  z > logit(t): avoids saturation of sigmoid at large |z| / tau.
    return logits / temperature > math.log(threshold / (1.0 - threshold))


def layer_averaged_keep_fraction(
    cumulative_keep: list[torch.Tensor],
    start_layers: list[int],
    num_layers: int,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Realised kept fraction of visual tokens averaged over all decoder layers (METHODS §0).

    Layers before start_layers[0] keep every token; layer j >= start_layers[k] keeps the fraction
    of cumulative_keep[k] (the latest mask in force). Differentiable through straight-through masks.

    Args:
        cumulative_keep: per pruning layer, (B, N) cumulative keep masks.
        start_layers: for each mask, the index of the first decoder layer that runs without the
            dropped tokens (the engine's convention, e.g. pruning layer + 1), increasing.
        num_layers: number of decoder layers.
        valid_mask: optional (B, N) bool, true at real visual tokens (padding excluded).

    Returns:
        0-d tensor in [0, 1], the batch mean of the per-sample layer-averaged keep fraction.
    """
    if len(cumulative_keep) != len(start_layers) or not cumulative_keep:
        raise ValueError(
            f"cumulative_keep ({len(cumulative_keep)}) and start_layers ({len(start_layers)}) "
            "must be non-empty and of equal length"
        )
    if any(b <= a for a, b in zip(start_layers, start_layers[1:])):
        raise ValueError(f"start_layers={start_layers} must be strictly increasing")
    if not 0 <= start_layers[0] or not start_layers[-1] <= num_layers:
        raise ValueError(f"start_layers={start_layers} must lie in [0, num_layers={num_layers}]")
    masks = [mask.float() for mask in cumulative_keep]
    if valid_mask is None:
        valid_mask = torch.ones_like(masks[0], dtype=torch.bool)
    fractions = [_masked_mean(mask, valid_mask, dim=1) for mask in masks]
    ends = list(start_layers[1:]) + [num_layers]
    total = torch.full_like(fractions[0], float(start_layers[0]))
    for fraction, start, end in zip(fractions, start_layers, ends):
        total = total + fraction * (end - start)
    return (total / num_layers).mean()
