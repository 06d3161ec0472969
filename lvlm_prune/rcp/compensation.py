"""RCP on the engine: cumulative learned pruning + delayed repair, trained against a full-token teacher."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lvlm_prune.compensation import Compensation
from lvlm_prune.data import answer_generation_mask
from lvlm_prune.engine import (
    KeepWeightProbe,
    LayerContext,
    ModelInfo,
    PrunedLlava,
    PruningMethod,
    gather_rows,
    top_k_mask,
)
from lvlm_prune.flops import module_flops
from lvlm_prune.rcp.adapter import DelayedRepairAdapter, PrunedContextEncoder
from lvlm_prune.rcp.losses import answer_ce, repair_loss, saliency_ranking_loss, sparsity_loss
from lvlm_prune.rcp.pruner import CrossAttentionPruner, gumbel_sigmoid, layer_averaged_keep_fraction, threshold_keep
from lvlm_prune.rcp.schedules import RCPSchedule

# The paper's layers for 32-layer LLaVA-1.5-7B; scaled with depth for other models.
PAPER_PRUNING_LAYERS = {"high": (1, 13, 25), "default": (4, 14, 24)}
PAPER_REPAIR_LAYERS = (22, 29)


def scale_layers(layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    scaled = tuple(min(num_layers - 1, round(layer * num_layers / 32)) for layer in layers)
    return tuple(dict.fromkeys(scaled))


def visual_view(values: torch.Tensor, visual_index: torch.Tensor, num_visual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, ...) sequence values -> (B, N, ...) in original visual order, and (B, N) presence."""
    b = values.shape[0]
    present = visual_index >= 0
    out = values.new_zeros(b, num_visual, *values.shape[2:])
    batch_index = torch.arange(b, device=values.device)[:, None].expand_as(visual_index)
    out[batch_index[present], visual_index[present]] = values[present]
    mask = torch.zeros(b, num_visual, dtype=torch.bool, device=values.device)
    mask[batch_index[present], visual_index[present]] = True
    return out, mask


class RCPPruning(PruningMethod):
    """One forward's worth of RCP decisions (the modules live in `RCPCompensation`).

    Args:
        plugin: the trained modules.
        training: soft Gumbel-sigmoid straight-through masks (engine's soft path) or thresholded inference; with
            `keep_counts` the forward keeps the top-k and the gradient is the relaxation's.
        temperature: Gumbel temperature (training) / final temperature (inference).
        noise: logistic noise on (training).
        keep_counts: inference with a budget: tokens kept at each pruning layer (the k highest keep logits
            among the tokens still present); None keeps where sigmoid(logit / temperature) > 0.5.
    """

    name = "rcp"

    def __init__(self, plugin: "RCPCompensation", training: bool, temperature: float, noise: bool = False,
                 keep_counts: list[int] | None = None, prune_ratio: float = 0.0):
        super().__init__(prune_ratio)
        self.plugin = plugin
        self.training = training
        self.temperature = temperature
        self.noise = noise
        self.keep_counts = keep_counts
        # deciding layers, plus (spec timing) the next layer, at whose input the decision is applied
        self.prune_layers = tuple(sorted({*plugin.pruning_layers, *plugin.drop_layers}))
        self._pending: torch.Tensor | None = None
        self.cumulative: list[torch.Tensor] = []
        self.contexts: list[tuple[int, torch.Tensor]] = []  # (pruning layer, context of the tokens it pruned)
        self.scores: list[tuple[torch.Tensor, torch.Tensor]] = []  # per pruning layer: (keep logits, present)
        self._start: torch.Tensor | None = None

    def bind(self, info: ModelInfo) -> None:
        # the engine binds once per forward: decisions and context of an earlier forward must not carry over
        super().bind(info)
        self._pending, self.cumulative, self.contexts, self.scores, self._start = None, [], [], [], None

    def planned_visual_tokens(self) -> list[float]:
        """Every token before the first drop, then each pruning layer's count; under the trained threshold the
        count is each sample's own, and the plan is the target ratio's average in every layer."""
        n, depth = self.info.num_visual_tokens, self.info.num_layers
        if self.keep_counts is None:
            return [(1.0 - self.prune_ratio) * n] * depth
        plan = [float(n)] * depth
        for drop, count in zip(self.plugin.drop_layers, self.keep_counts):
            plan[drop:] = [float(count)] * (depth - drop)
        return plan

    def at_layer(self, ctx: LayerContext) -> torch.Tensor | None:
        plugin, n = self.plugin, self.info.num_visual_tokens
        if ctx.layer_idx not in plugin.pruning_layers:  # spec timing: the decision of the layer before goes now
            pending, self._pending = self._pending, None
            return pending
        position = plugin.pruning_layers.index(ctx.layer_idx)
        state = ctx.state
        visual, _ = visual_view(ctx.normed, state.visual_index, n)
        raw, _ = visual_view(state.hidden, state.visual_index, n)
        # not padding, not hidden by the attention mask, not removed (weight > 0.5 on the soft path)
        present = visual_view(state.visual_mask[..., None], state.visual_index, n)[0][..., 0]
        if not self.cumulative:
            self._start = present
        previous = self.cumulative[-1] if self.cumulative else present.to(visual.dtype)
        q2v, _ = visual_view(ctx.question_to_visual(), state.visual_index, n)
        question, question_mask = gather_rows(ctx.normed, state.question_mask, min_width=1)
        logits = plugin.pruners[position](visual, q2v, question, question_mask, previous)
        self.scores.append((logits, previous > 0.5))
        if self.training and self.keep_counts is not None:
            # straight-through top-k: forward keeps exactly the inference budget, backward is the soft relaxation's
            soft, _ = gumbel_sigmoid(logits, self.temperature, noise=False, hard=False)
            hard = top_k_mask(logits, previous > 0.5, self.keep_counts[position]).to(soft.dtype)
            layer_mask = hard + (soft - soft.detach())
        elif self.training:
            _, layer_mask = gumbel_sigmoid(logits, self.temperature, noise=self.noise)
        elif self.keep_counts is not None:
            layer_mask = top_k_mask(logits, previous > 0.5, self.keep_counts[position]).to(visual.dtype)
        else:
            layer_mask = threshold_keep(logits, self.temperature).to(visual.dtype)
        current = previous * layer_mask
        pruned_here = present & (current <= 0.5)
        if str(position) in plugin.context_encoders:  # a pruning layer no adapter reads keeps no context
            self.contexts.append((ctx.layer_idx, plugin.context_encoders[str(position)](raw, pruned_here, current)))
        self.cumulative.append(current)
        per_token = layer_mask if self.training else current
        sequence_mask = per_token.gather(1, state.visual_index.clamp(min=0))
        sequence_mask = sequence_mask if self.training else sequence_mask > 0.5
        if plugin.drop_after_pruning_layer:  # the pruning layer itself still runs on every token
            self._pending = sequence_mask
            return None
        return sequence_mask

    def context_for(self, layer: int) -> torch.Tensor | None:
        """The repair context of `layer`: the pruning layers up to it, summed. Decoding steps run after the whole
        prefill, so every pruning layer's context is there by then; a repair layer still reads only those before
        it, as in training and in the prefill."""
        seen = [context for pruning_layer, context in self.contexts if pruning_layer <= layer]
        return sum(seen[1:], seen[0]) if seen else None

    def after_layer(self, ctx: LayerContext, hidden: torch.Tensor) -> torch.Tensor:
        plugin = self.plugin
        if ctx.layer_idx not in plugin.repair_layers or not plugin.use_adapter:
            return hidden
        context = self.context_for(ctx.layer_idx)
        if context is None:
            return hidden
        adapter = plugin.adapters[plugin.repair_layers.index(ctx.layer_idx)]
        return adapter(hidden, context, ctx.state.answer_mask)

    def keep_fraction(self) -> torch.Tensor:
        """Layer-averaged kept fraction of the batch (differentiable on the soft path)."""
        return layer_averaged_keep_fraction(self.cumulative, list(self.plugin.drop_layers), self.info.num_layers,
                                            valid_mask=self._start)

    def plugin_flops(self, text_tokens: int) -> dict[str, float]:
        return self.plugin.flops_per_sample(text_tokens)


class RCPCompensation(Compensation):
    """Representation Consistency Pruner (METHODS.md section 3) as a plug-in of a frozen base.

    Args:
        target_prune_ratio: layer-averaged ratio r* the sparsity loss drives towards.
        pruning_layers: decoder layers whose input a pruner filters; None = the paper's (1/13/25 for
            r* > 0.8, else 4/14/24 of 32 layers) scaled with depth (layer 0 allowed: on shallow models
            the budget is unreachable otherwise).
        repair_layers: layers whose output the repair adapter modulates; None = 22/29 of 32, scaled.
        bottleneck: pruner cross-attention width.
        num_queries: pruner learnable queries.
        init_bias: initial keep-logit bias of every pruner (+2: training starts near keep-all).
        context_dim: width of the cached pruned-token context.
        adapter_bottleneck: width of the adapter's Down/Up.
        ce_weight: weight of the answer cross entropy.
        repair_weight: weight of the repair loss.
        variance_weight: weight of the second-moment term inside the repair loss.
        repair_statistic: 'mean_var' (paper) or 'mean_std'.
        sparsity_weight: weight lambda_s of |r_bar - r*|.
        temperature_start: Gumbel temperature at the start.
        temperature_end: temperature after annealing (and at inference).
        use_adapter: ablation switch for the delayed repair adapter.
        use_repair_loss: ablation switch for the repair loss.
        use_learned_score: ablation switch: False keeps only the LLM-attention baseline + bias.
        noise_free_keep: what the hard mask keeps once the noise is off (the last 20 % of training): 'threshold'
            (the paper: sigmoid(logit / tau) > 0.5) or 'budget' (each pruning layer keeps the k highest-scoring
            tokens that inference with a ratio keeps for `target_prune_ratio`, straight-through). Without noise the
            threshold's keep fraction can fall far below the target (a pruner trained with noise keeps tokens whose
            logits sit below 0); 'budget' trains the last phase on the token counts it is evaluated at.
        saliency_weight: weight of a ranking loss (an addition to METHODS.md; 0, the paper, turns it off) that
            teaches every pruner to rank first the tokens whose keep weight most lowers the full-token teacher's
            answer loss (-dCE/dw at every weight 1, computed in the teacher pass, which then runs with gradients
            to its keep weights: about one more backward through the base per step, and its activations held).
            Each layer's target is the top-k of the tokens present there, k its share of `target_prune_ratio`.
            The straight-through answer gradient carries the same information but vanishes once the logits
            saturate (docs/findings.md); this target stays dense.
        drop_after_pruning_layer: when the pruned tokens go. False (the engine's convention for every in-LLM
            method): at the pruning layer's input, right after the pruner scores them, so that layer already runs on
            the kept tokens. True (METHODS.md's wording): after the pruning layer, which still runs on every token;
            pruning layers must then be at least 2 apart. Either way the pruner reads the pruning layer's input and
            attention; the budget counts the layers before the first drop as full.
    """

    name = "rcp"

    def __init__(
        self,
        target_prune_ratio: float = 0.889,
        pruning_layers: list[int] | None = None,
        repair_layers: list[int] | None = None,
        bottleneck: int = 512,
        num_queries: int = 16,
        init_bias: float = 2.0,
        context_dim: int = 512,
        adapter_bottleneck: int = 64,
        ce_weight: float = 1.5,
        repair_weight: float = 3.0,
        variance_weight: float = 3.0,
        repair_statistic: str = "mean_var",
        sparsity_weight: float = 200.0,
        temperature_start: float = 1.5,
        temperature_end: float = 0.2,
        use_adapter: bool = True,
        use_repair_loss: bool = True,
        use_learned_score: bool = True,
        noise_free_keep: str = "threshold",
        drop_after_pruning_layer: bool = False,
        saliency_weight: float = 0.0,
    ):
        super().__init__()
        # the constructor's arguments and nothing else: read before any other local exists
        self._config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if not 0.0 <= target_prune_ratio < 1.0:
            raise ValueError(f"rcp target_prune_ratio={target_prune_ratio} must be in [0, 1)")
        if noise_free_keep not in ("threshold", "budget"):
            raise ValueError(f"rcp noise_free_keep={noise_free_keep!r}; choose 'threshold' or 'budget'")
        self.noise_free_keep = noise_free_keep
        if not saliency_weight >= 0:
            raise ValueError(f"rcp saliency_weight={saliency_weight} must be >= 0")
        self.saliency_weight = saliency_weight
        self.drop_after_pruning_layer = drop_after_pruning_layer
        if repair_statistic not in ("mean_var", "mean_std"):
            raise ValueError(f"rcp repair_statistic={repair_statistic!r}; choose 'mean_var' or 'mean_std'")
        self.target_prune_ratio = target_prune_ratio
        for name, layers in (("pruning_layers", pruning_layers), ("repair_layers", repair_layers)):
            if layers is not None and not list(layers):
                hint = "; to train without the adapter set use_adapter: false" if name == "repair_layers" else ""
                raise ValueError(f"rcp {name}=[] is empty: give at least one layer, or null for the defaults{hint}")
        self.requested_pruning_layers = tuple(pruning_layers) if pruning_layers else None
        self.requested_repair_layers = tuple(repair_layers) if repair_layers else None
        self.bottleneck, self.num_queries, self.context_dim = bottleneck, num_queries, context_dim
        self.init_bias = init_bias
        self.adapter_bottleneck = adapter_bottleneck
        self.ce_weight, self.repair_weight, self.variance_weight = ce_weight, repair_weight, variance_weight
        self.repair_statistic = repair_statistic
        self.sparsity_weight = sparsity_weight
        if not (temperature_start > 0 and temperature_end > 0):
            raise ValueError(f"rcp temperature_start={temperature_start} and temperature_end={temperature_end} must "
                             "both be > 0")
        self.schedule = RCPSchedule(1.0 - target_prune_ratio, temperature_start, temperature_end)
        self.use_adapter, self.use_repair_loss, self.use_learned_score = use_adapter, use_repair_loss, use_learned_score

    def export_config(self) -> dict[str, Any]:
        return dict(self._config)

    def attach(self, engine: PrunedLlava, tokenizer: Any = None) -> None:
        info: ModelInfo = engine.info
        self.info = info
        key = "high" if self.target_prune_ratio > 0.8 else "default"
        self.pruning_layers = self.requested_pruning_layers or scale_layers(PAPER_PRUNING_LAYERS[key], info.num_layers)
        self.repair_layers = self.requested_repair_layers or scale_layers(PAPER_REPAIR_LAYERS, info.num_layers)
        for name, layers in (("pruning_layers", self.pruning_layers), ("repair_layers", self.repair_layers)):
            if any(not 0 <= layer < info.num_layers for layer in layers) or list(layers) != sorted(set(layers)):
                raise ValueError(f"rcp {name}={list(layers)} must be increasing layers in [0, {info.num_layers - 1}]")
        if self.drop_after_pruning_layer:
            if any(b - a < 2 for a, b in zip(self.pruning_layers, self.pruning_layers[1:])) or \
                    self.pruning_layers[-1] >= info.num_layers - 1:
                raise ValueError(f"rcp pruning_layers={list(self.pruning_layers)} with drop_after_pruning_layer: tokens "
                                 f"go at the next layer's input, so pruning layers must be at least 2 apart and below "
                                 f"{info.num_layers - 1}")
        self.drop_layers = tuple(p + int(self.drop_after_pruning_layer) for p in self.pruning_layers)
        if self.use_adapter and self.repair_layers[0] < self.drop_layers[0]:
            raise ValueError(f"rcp repair_layers={list(self.repair_layers)} start before the first pruned layer "
                             f"{self.drop_layers[0]}: an adapter there has nothing pruned to repair and never trains")
        d, n = info.hidden_size, info.num_visual_tokens
        self.pruners = nn.ModuleList(
            CrossAttentionPruner(d, bottleneck=self.bottleneck, num_queries=self.num_queries, init_bias=self.init_bias,
                                 use_cross_attention=self.use_learned_score, use_mlp=self.use_learned_score)
            for _ in self.pruning_layers
        )
        # Only pruning layers some adapter reads get an encoder: one without a reader would hold parameters that never
        # get a gradient (plain DDP fails on them) and count in the FLOPs. Keyed by pruning position ("0", "1", ...),
        # which are ModuleList's names too.
        read = [str(position) for position, layer in enumerate(self.pruning_layers)
                if self.use_adapter and layer <= self.repair_layers[-1]]
        self.context_encoders = nn.ModuleDict(
            {position: PrunedContextEncoder(d, self.context_dim, num_positions=n) for position in read}
        )
        self.adapters = nn.ModuleList(
            DelayedRepairAdapter(d, self.context_dim, self.adapter_bottleneck) for _ in self.repair_layers
        ) if self.use_adapter else nn.ModuleList()

    # ------------------------------------------------------------------ training
    def training_losses(self, engine: PrunedLlava, batch: dict[str, Any], progress: float) -> dict[str, torch.Tensor]:
        schedule = self.schedule(progress)
        inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["position_ids"])
        budget = None
        if not schedule.noise and self.noise_free_keep == "budget":
            budget = self.keep_counts(self.target_prune_ratio)
        method = engine.bind(RCPPruning(self, training=True, temperature=schedule.temperature, noise=schedule.noise,
                                        keep_counts=budget))
        capture = self.repair_layers if self.use_repair_loss else ()
        student = engine(*inputs, labels=batch["labels"], method=method, soft=True, capture_layers=capture)
        losses = {"ce": answer_ce(student.logits, batch["labels"])}
        teacher = None
        if self.saliency_weight > 0:
            teacher, saliency = self.teacher_with_saliency(engine, inputs, batch["labels"], capture)
            counts = self.keep_counts(self.target_prune_ratio)
            losses["saliency"] = torch.stack([
                saliency_ranking_loss(logits, present, saliency, keep)
                for (logits, present), keep in zip(method.scores, counts)
            ]).mean()
        if self.use_repair_loss:
            if teacher is None:
                with torch.no_grad():
                    teacher = engine(*inputs, labels=batch["labels"], capture_layers=capture, logits="none")
            mask = answer_generation_mask(batch["labels"])
            losses["repair"] = torch.stack([
                repair_loss(student.captured[layer], teacher.captured[layer], mask, self.variance_weight,
                            self.repair_statistic)
                for layer in capture
            ]).mean()
        keep = method.keep_fraction()
        losses["sparsity"] = sparsity_loss(keep, schedule.target_keep_fraction)
        total = self.ce_weight * losses["ce"] + self.sparsity_weight * losses["sparsity"]
        if self.use_repair_loss:
            total = total + self.repair_weight * losses["repair"]
        if self.saliency_weight > 0:
            total = total + self.saliency_weight * losses["saliency"]
        losses["loss"] = total
        losses["keep_fraction"] = keep.detach()
        losses["target_keep_fraction"] = torch.tensor(schedule.target_keep_fraction)
        losses["temperature"] = torch.tensor(schedule.temperature)
        return losses

    def teacher_with_saliency(self, engine: PrunedLlava, inputs: tuple, labels: torch.Tensor,
                              capture: tuple[int, ...]) -> tuple[Any, torch.Tensor]:
        """The full-token teacher pass, run on the soft path with every keep weight 1 (log(1 + 1e-6) in the
        attention: the full-token pass up to rounding) so that its answer loss's gradient with respect to the weights
        is each visual token's saliency, (B, N) = -dCE/dw. Its captured states come back detached."""
        n = self.info.num_visual_tokens
        weights = torch.ones(labels.shape[0], n, device=labels.device, requires_grad=True)
        with torch.enable_grad():
            teacher = engine(*inputs, labels=labels, method=KeepWeightProbe(weights), soft=True,
                             capture_layers=capture, logits="all")
            (gradient,) = torch.autograd.grad(answer_ce(teacher.logits, labels), weights)
        teacher.captured = {layer: states.detach() for layer, states in teacher.captured.items()}
        return teacher, -gradient

    # ------------------------------------------------------------------ inference
    def inference_method(self, prune_ratio: float | None = None) -> RCPPruning:
        """Pruning with the trained modules. With a ratio: each pruning layer keeps its k highest-scoring tokens,
        the counts k_i = N * lam^(i+1) solved so that the layer average is exactly (1 - r) N (per-layer
        thresholds at the k-th logit of each sample: a single logit offset cannot hit a budget when a layer's
        logits are nearly tied). Without: the trained threshold sigmoid(logit / tau_end) > 0.5."""
        if prune_ratio is None:
            return RCPPruning(self, training=False, temperature=self.schedule.temperature_end,
                              prune_ratio=self.target_prune_ratio)
        return RCPPruning(self, training=False, temperature=self.schedule.temperature_end,
                          keep_counts=self.keep_counts(prune_ratio), prune_ratio=prune_ratio)

    def keep_counts(self, prune_ratio: float) -> list[int]:
        """Tokens kept at each pruning layer for a layer-averaged `prune_ratio` (geometric over the stages)."""
        n, depth = self.info.num_visual_tokens, self.info.num_layers
        spans = [b - a for a, b in zip(self.drop_layers, (*self.drop_layers[1:], depth))]
        full = self.drop_layers[0]  # layers before the first drop see every token

        def average(lam: float) -> float:
            return (full + sum(span * lam ** (i + 1) for i, span in enumerate(spans))) / depth

        target = 1.0 - prune_ratio
        if average(0.0) > target + 1e-9:
            raise ValueError(f"rcp: prune_ratio={prune_ratio} cannot be reached with pruning layers "
                             f"{list(self.pruning_layers)} of {depth} (largest reachable ratio {1 - average(0.0):.3f})")
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if average(mid) < target else (low, mid)
        lam = (low + high) / 2
        return [max(1, round(n * lam ** (i + 1))) for i in range(len(spans))]

    def flops_per_sample(self, text_tokens: int) -> dict[str, float]:
        """Exact FLOPs of pruners (at full N, an upper bound), context encoders (once per pruning layer) and adapters
        (on one answer position). Computed once:
        the question enters the pruners through a masked mean, which has no matmul, so the count does not depend on
        `text_tokens` (checked: 3 and 40 question tokens give the same count)."""
        if not hasattr(self, "_flops_cache"):
            d, n = self.info.hidden_size, self.info.num_visual_tokens
            device = next(self.parameters()).device
            pruner_flops = 0
            for pruner in self.pruners:
                pruner_flops += module_flops(pruner, torch.randn(1, n, d, device=device), torch.rand(1, n, device=device),
                                             torch.randn(1, max(1, text_tokens), d, device=device),
                                             torch.ones(1, max(1, text_tokens), dtype=torch.bool, device=device),
                                             torch.ones(1, n, device=device))
            adapter_flops = sum(
                module_flops(adapter, torch.randn(1, 1, d, device=device), torch.randn(1, self.context_dim, device=device),
                             torch.ones(1, 1, dtype=torch.bool, device=device))
                for adapter in self.adapters
            )
            pruned = torch.zeros(1, n, dtype=torch.bool, device=device)
            pruned[0, : n // 2] = True  # the count does not depend on how many were pruned (a masked mean)
            context_flops = sum(module_flops(encoder, torch.randn(1, n, d, device=device), pruned, ~pruned)
                                for encoder in self.context_encoders.values())
            self._flops_cache = {"rcp_pruners": float(pruner_flops), "rcp_adapters": float(adapter_flops),
                                 "rcp_context": float(context_flops)}
        return dict(self._flops_cache)

