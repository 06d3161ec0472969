"""Training-free visual-token pruning baselines, all on the same engine and the same layer-averaged budget.

Budget convention (METHODS.md section 0): `prune_ratio` r is the fraction of visual tokens removed,
averaged over all decoder layers. Each method turns r into its own schedule; a schedule that cannot reach
r on the given model raises ValueError with the largest reachable ratio.

Model families: random, FastV, PyramidDrop and DART budget each sample from its own visual-token count N_i (a
sample's schedule is the plan for a model with N_i tokens), so they also run on LLaVA-NeXT, whose images give
different counts. Pool and VisionZip need LLaVA-1.5's single CLIP grid and its [CLS] attention; the engine
refuses them on LLaVA-NeXT with a ValueError naming the method and the family.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from lvlm_prune.accm.vision_pruning import cls_attention_to_visual_tokens
from lvlm_prune.engine.methods import LayerContext, ModelInfo, PreLLMContext, PruningMethod, per_sample, top_k_mask


def scaled_layer(layer_of_32: int, num_layers: int) -> int:
    """A layer index given for 32-layer models (LLaVA-1.5-7B), scaled to `num_layers` (at least 1). Ties round to
    the even index, as Python's `round` does: K = 2 scales to 2 on 24 (1.5) and 40 layers (2.5, LLaVA-1.5-13B), and
    to 4 on 56 (3.5)."""
    return max(1, round(layer_of_32 * num_layers / 32))


def pre_llm_keep_count(prune_ratio: float, num_visual: int, name: str = "pruning") -> int:
    """Visual tokens a pre-LLM method keeps for `prune_ratio`; a budget that rounds to no token is refused, as the
    in-LLM methods refuse theirs (keeping one anyway would realise a lower ratio than the one asked for)."""
    keep = round((1.0 - prune_ratio) * num_visual)
    if keep < 1:
        raise ValueError(f"{name}: prune_ratio={prune_ratio} keeps no visual token of {num_visual} (largest "
                         f"reachable ratio {1 - 1 / num_visual:.4f}); lower the ratio")
    return keep


def single_stage_keep_count(prune_ratio: float, info: ModelInfo, layer: int, name: str) -> int:
    """Tokens to keep from `layer` on so that the layer average is (1 - r) N (layers before see all N)."""
    n, depth = info.num_visual_tokens, info.num_layers
    keep = ((1.0 - prune_ratio) * n * depth - layer * n) / (depth - layer)
    if keep < 0.5:
        reachable = 1.0 - (layer * n + (depth - layer)) / (depth * n)
        raise ValueError(
            f"{name}: prune_ratio={prune_ratio} cannot be reached when the first {layer} of {depth} layers see all "
            f"{n} visual tokens (largest reachable ratio {reachable:.3f}); lower the ratio or prune earlier"
        )
    return min(n, max(1, round(keep)))


class RandomPruning(PruningMethod):
    """Keeps a random subset of the visual tokens before the LLM (max(1, round((1 - r) N_i)) per sample).

    Each image's subset is drawn from a generator seeded by `seed` and the image's pixel values (its projected
    features when the engine gets precomputed visual inputs instead of pixels): it does not
    depend on the batch the image is in, its place there, or how many batches came before (a generator seeded once
    per call would give the same positions to the j-th image of every batch)."""

    name = "random"
    handles_varying_visual_tokens = True

    def __init__(self, prune_ratio: float = 0.0, seed: int = 0):
        super().__init__(prune_ratio)
        self.seed = seed

    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        self.keep = pre_llm_keep_count(self.prune_ratio, info.num_visual_tokens, self.name)

    def planned_visual_tokens(self) -> list[float]:
        return [float(self.keep)] * self.info.num_layers

    def image_generator(self, pixels: torch.Tensor) -> torch.Generator:
        digest = hashlib.blake2b(pixels.detach().float().cpu().numpy().tobytes(), digest_size=8,
                                 key=str(self.seed).encode())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "big") >> 1)

    def before_llm(self, ctx: PreLLMContext) -> torch.Tensor:
        b, n, _ = ctx.visual_features.shape
        # precomputed visual inputs come without pixels: the image's features key its draw instead
        keys = ctx.pixel_values if ctx.pixel_values is not None else ctx.visual_features
        scores = torch.stack([torch.rand(n, generator=self.image_generator(keys[i])) for i in range(b)])
        keep = per_sample(ctx.num_visual, lambda count: pre_llm_keep_count(self.prune_ratio, count, self.name))
        return top_k_mask(scores.to(ctx.visual_features.device), ctx.visual_valid, keep)


class PoolPruning(PruningMethod):
    """Average-pools the visual grid to about the budget (h x w cells, h * w closest to the budget); each pooled
    token takes the slot (and position id) of the grid token nearest its cell centre. LLaVA-1.5 only: needs one
    square grid per image (the engine raises ValueError on LLaVA-NeXT)."""

    name = "pool"

    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        side = math.isqrt(info.num_visual_tokens)
        if side * side != info.num_visual_tokens:
            raise ValueError(f"pool: {info.num_visual_tokens} visual tokens do not form a square grid")
        keep = pre_llm_keep_count(self.prune_ratio, info.num_visual_tokens, self.name)
        # the grid nearest the budget, then the squarest (7 of 64: 1 x 7; 32: 4 x 8, not the 5 x 6 near sqrt)
        self.rows, self.cols = min(((h, w) for h in range(1, side + 1) for w in range(1, side + 1)),
                                   key=lambda hw: (abs(hw[0] * hw[1] - keep), abs(hw[0] - hw[1]), hw[0]))
        self.side = side

    def planned_visual_tokens(self) -> list[float]:
        return [float(self.rows * self.cols)] * self.info.num_layers

    def before_llm(self, ctx: PreLLMContext) -> torch.Tensor:
        b, n, d = ctx.visual_features.shape
        grid = ctx.visual_features.transpose(1, 2).reshape(b, d, self.side, self.side)
        pooled = F.adaptive_avg_pool2d(grid, (self.rows, self.cols)).flatten(2).transpose(1, 2)
        centre_rows = [min(self.side - 1, int((i + 0.5) * self.side / self.rows)) for i in range(self.rows)]
        centre_cols = [min(self.side - 1, int((j + 0.5) * self.side / self.cols)) for j in range(self.cols)]
        slots = torch.tensor([r * self.side + c for r in centre_rows for c in centre_cols], device=grid.device)
        features = ctx.visual_features.clone()
        features[:, slots] = pooled.to(features.dtype)
        ctx.visual_features = features
        keep = torch.zeros(b, n, dtype=torch.bool, device=grid.device)
        keep[:, slots] = True
        return keep


class FastV(PruningMethod):
    """FastV (ECCV'24): after decoder layer K, keep the visual tokens the last prompt token attends to most
    (heads averaged) in layer K-1's attention; K = 2 for 32 layers, scaled with depth by default. The budget is
    per sample, from its own visual-token count (runs on LLaVA-NeXT)."""

    name = "fastv"
    handles_varying_visual_tokens = True

    def __init__(self, prune_ratio: float = 0.0, layer: int | None = None):
        super().__init__(prune_ratio)
        self.layer = layer

    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        self.k_layer = self.layer if self.layer is not None else scaled_layer(2, info.num_layers)
        if not 1 <= self.k_layer < info.num_layers:
            raise ValueError(f"fastv: layer={self.k_layer} must be in [1, {info.num_layers - 1}]")
        self.prune_layers = (self.k_layer - 1, self.k_layer)
        self.keep = self._keep(info.num_visual_tokens)

    def _keep(self, num_visual: int) -> int:
        return single_stage_keep_count(self.prune_ratio, replace(self.info, num_visual_tokens=num_visual),
                                       self.k_layer, self.name)

    def planned_visual_tokens(self) -> list[float]:
        n = self.info.num_visual_tokens
        return [float(n)] * self.k_layer + [float(self.keep)] * (self.info.num_layers - self.k_layer)

    def at_layer(self, ctx: LayerContext) -> torch.Tensor | None:
        if ctx.layer_idx == self.k_layer - 1:
            self._scores = ctx.last_token_to_visual()
            return None
        keep = per_sample(ctx.num_visual, self._keep)
        return top_k_mask(self._scores, ctx.state.visual_mask, keep) | (ctx.state.visual_index < 0)


class PyramidDrop(PruningMethod):
    """PyramidDrop (CVPR'25): stages end at layers L/4, L/2, 3L/4 (8/16/24 of 32); at each stage end keep a
    fraction lambda of the remaining visual tokens by the last prompt token's attention at that layer;
    lambda is solved from the layer-averaged budget. Stage counts are per sample, round(N_i lambda^s) (runs on
    LLaVA-NeXT)."""

    name = "pdrop"
    handles_varying_visual_tokens = True

    def __init__(self, prune_ratio: float = 0.0, stage_ends: tuple[int, ...] | None = None):
        super().__init__(prune_ratio)
        self.stage_ends = stage_ends

    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        depth, n = info.num_layers, info.num_visual_tokens
        ends = self.stage_ends or tuple(max(1, round(depth * q / 4)) for q in (1, 2, 3))
        if list(ends) != sorted(set(ends)) or ends[0] < 1 or ends[-1] >= depth:
            raise ValueError(f"pdrop: stage_ends={ends} must be increasing layers in [1, {depth - 1}]")
        self.prune_layers = tuple(ends)
        spans = [b - a for a, b in zip((0, *ends), (*ends, depth))]

        def average(lam: float) -> float:
            return sum(span * lam**i for i, span in enumerate(spans)) / depth

        target = 1.0 - self.prune_ratio
        # every stage after the first keeps at least one token (as FastV and DART do after their layer)
        fewest = (spans[0] * n + sum(spans[1:])) / (depth * n)
        if fewest > target + 1e-9:
            raise ValueError(
                f"pdrop: prune_ratio={self.prune_ratio} cannot be reached with stage ends {ends} of {depth} layers "
                f"and {n} visual tokens (largest reachable ratio {1 - fewest:.3f}); give earlier stage_ends"
            )
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if average(mid) < target else (lo, mid)
        self.ratio = (lo + hi) / 2
        self.counts = [self._stage_count(n, i) for i in range(len(ends))]

    def _stage_count(self, num_visual: int, stage: int) -> int:
        return max(1, round(num_visual * self.ratio ** (stage + 1)))

    def planned_visual_tokens(self) -> list[float]:
        counts, current = [], float(self.info.num_visual_tokens)
        for layer in range(self.info.num_layers):
            if layer in self.prune_layers:
                current = float(self.counts[self.prune_layers.index(layer)])
            counts.append(current)
        return counts

    def at_layer(self, ctx: LayerContext) -> torch.Tensor:
        stage = self.prune_layers.index(ctx.layer_idx)
        keep = per_sample(ctx.num_visual, lambda count: self._stage_count(count, stage))
        return top_k_mask(ctx.last_token_to_visual(), ctx.state.visual_mask, keep) | (ctx.state.visual_index < 0)


class VisionZip(PruningMethod):
    """VisionZip (CVPR'25), before the LLM, as the authors' code does it.

    Dominant tokens: the patches with the highest [CLS] attention at the vision layer LLaVA reads. Contextual
    tokens: the remaining tokens, in order, give C targets at the step (remaining // C); every other remaining
    token joins the target most similar to it (cosine of that layer's keys, averaged over heads); a contextual
    token is its target's vision feature plus the mean of the tokens that joined it (a target nobody joined stays
    itself), merged at the vision layer LLaVA reads and then passed through the projector. The split follows the
    paper's 54 + 10 of 64. LLaVA-1.5 only: needs the [CLS] attention of one CLIP grid per image (the engine raises
    ValueError on LLaVA-NeXT)."""

    name = "visionzip"

    def __init__(self, prune_ratio: float = 0.0, dominant_fraction: float = 54 / 64):
        super().__init__(prune_ratio)
        if not 0.0 < dominant_fraction <= 1.0:
            raise ValueError(f"visionzip: dominant_fraction={dominant_fraction} must be in (0, 1]")
        self.dominant_fraction = dominant_fraction

    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        self.keep = pre_llm_keep_count(self.prune_ratio, info.num_visual_tokens, self.name)
        self.dominant = max(1, round(self.keep * self.dominant_fraction)) if self.keep > 1 else 1
        self.contextual = self.keep - self.dominant

    def planned_visual_tokens(self) -> list[float]:
        return [float(self.keep)] * self.info.num_layers

    def before_llm(self, ctx: PreLLMContext) -> torch.Tensor:
        layer, layer_input = ctx.vision_read_layer()
        features = ctx.visual_features
        b, n, d = features.shape
        cls_attention = cls_attention_to_visual_tokens(layer, layer_input, n)  # (B, N)
        all_tokens = torch.ones(b, n, dtype=torch.bool, device=features.device)
        dominant = top_k_mask(cls_attention, all_tokens, self.dominant)
        if self.contextual == 0:
            return dominant
        keys = head_averaged_keys(layer, layer_input)[:, -n:]  # the visual tokens' rows ([CLS] only under 'full')
        targets, merged, joined = merge_contextual_tokens(ctx.projector_input(), keys, ~dominant, self.contextual)
        at_targets = features.gather(1, targets[..., None].expand(-1, -1, d))
        # a target nobody joined keeps the engine's own projection of it, bit for bit
        contextual = torch.where(joined[..., None], ctx.project(merged).to(features.dtype), at_targets)
        ctx.visual_features = features.scatter(1, targets[..., None].expand(-1, -1, d), contextual)
        return dominant.scatter(1, targets, True)


def head_averaged_keys(layer: torch.nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, head_dim) a CLIP layer's keys (k_proj of its normed input), averaged over its heads."""
    attention = layer.self_attn
    keys = attention.k_proj(layer.layer_norm1(layer_input))
    return keys.view(*keys.shape[:2], -1, attention.head_dim).mean(2)


def merge_contextual_tokens(vision_features: torch.Tensor, keys: torch.Tensor, remaining: torch.Tensor,
                            num_targets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's contextual merge over the `remaining` tokens (B, N) bool, the same count in every row.

    Targets: the remaining tokens at positions 0, s, 2s, ... (s = remaining // num_targets) of their order, the
    first `num_targets` of them. Every other remaining token joins the target whose key is most similar (cosine).

    Returns:
        targets (B, C) long token indices; merged (B, C, F) = the target's `vision_features` + the mean of the
        tokens that joined it (the target alone when none did), in `vision_features`' dtype; joined (B, C) bool,
        some token joined the target.
    """
    counts = remaining.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"visionzip: every sample needs the same number of remaining tokens, got {counts.tolist()}")
    count = int(counts[0])
    order = torch.sort((~remaining).to(torch.int8), dim=1, stable=True).indices[:, :count]  # remaining, in order
    step = max(1, count // num_targets)
    targets = order[:, torch.arange(0, count, step, device=order.device)[:num_targets]]
    others = remaining.scatter(1, targets, False)
    keys = F.normalize(keys.float(), dim=-1)
    target_keys = keys.gather(1, targets[..., None].expand(-1, -1, keys.shape[-1]))
    closest = torch.einsum("bnh,bth->bnt", keys, target_keys).argmax(-1)  # (B, N)
    membership = F.one_hot(closest, targets.shape[1]).float() * others[..., None].float()  # (B, N, C)
    members = membership.sum(1)  # (B, C)
    features = vision_features.float()
    others_mean = torch.einsum("bnt,bnf->btf", membership, features) / members.clamp(min=1)[..., None]
    at_targets = features.gather(1, targets[..., None].expand(-1, -1, features.shape[-1]))
    return targets, (at_targets + others_mean).to(vision_features.dtype), members > 0


class DART(PruningMethod):
    """DART (EMNLP'25): prunes at layer K's input (K = 2 of 32, scaled) by duplication, with no attention map.

    As the authors' code does: pivots are the image tokens and the prompt tokens after the image (the question and
    the last prompt token, never answer tokens of a teacher-forced pass) with the largest L1 key norm at layer
    K - 1 (keys of all heads concatenated; 4 + 4 per 576 image tokens, scaled with N); then each pivot in
    turn adds the image tokens least similar (cosine, hidden states after the language model's final norm) to it
    among those not taken yet, budget // pivots each, and what is kept is the image pivots and the tokens added,
    filled up to the budget (when it does not divide) by the lowest highest-similarity to any pivot. Budget and
    pivot counts are per sample, from its own visual-token count (runs on LLaVA-NeXT)."""

    name = "dart"
    handles_varying_visual_tokens = True

    def __init__(self, prune_ratio: float = 0.0, layer: int | None = None, num_pivots: int | None = None,
                 num_text_pivots: int | None = None):
        super().__init__(prune_ratio)
        self.layer = layer
        self.num_pivots = num_pivots
        self.num_text_pivots = num_text_pivots

    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        self.k_layer = self.layer if self.layer is not None else scaled_layer(2, info.num_layers)
        if not 1 <= self.k_layer < info.num_layers:
            raise ValueError(f"dart: layer={self.k_layer} must be in [1, {info.num_layers - 1}]")
        self.prune_layers = (self.k_layer - 1, self.k_layer)
        self.keep, self.pivots = self._budget(info.num_visual_tokens)
        self._key_norm: torch.Tensor | None = None

    def _budget(self, num_visual: int) -> tuple[int, int]:
        """(tokens kept, image pivots among them) for a sample with `num_visual` visual tokens."""
        keep = single_stage_keep_count(self.prune_ratio, replace(self.info, num_visual_tokens=num_visual),
                                       self.k_layer, self.name)
        return keep, min(self.num_pivots or max(1, round(4 * num_visual / 576)), keep)

    def _text_pivots(self, num_visual: int) -> int:
        return self.num_text_pivots if self.num_text_pivots is not None else max(1, round(4 * num_visual / 576))

    def planned_visual_tokens(self) -> list[float]:
        n = self.info.num_visual_tokens
        return [float(n)] * self.k_layer + [float(self.keep)] * (self.info.num_layers - self.k_layer)

    def at_layer(self, ctx: LayerContext) -> torch.Tensor | None:
        if ctx.layer_idx == self.k_layer - 1:  # the previous layer's keys rank the pivots
            keys = ctx.keys().float()
            self._key_norm = keys.abs().sum(-1).sum(1)  # L1 over heads x head_dim, (B, T)
            return None
        visual = ctx.state.visual_mask
        keep = per_sample(ctx.num_visual, lambda count: self._budget(count)[0])
        image_pivots = top_k_mask(self._key_norm, visual, per_sample(ctx.num_visual, lambda c: self._budget(c)[1]))
        queries = ctx.prompt_after_image()
        text_pivots = top_k_mask(self._key_norm, queries,
                                 per_sample(ctx.num_visual, self._text_pivots).minimum(queries.sum(1)))
        hidden = ctx.final_norm(ctx.state.hidden) if ctx.final_norm is not None else ctx.normed
        hidden = F.normalize(hidden.float(), dim=-1)
        similarity = torch.einsum("btd,bsd->bts", hidden, hidden)  # (B, T, T)
        return dart_selection(similarity, visual, image_pivots, text_pivots, keep) | (ctx.state.visual_index < 0)


def dart_selection(similarity: torch.Tensor, visual: torch.Tensor, image_pivots: torch.Tensor,
                   text_pivots: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, the visual tokens DART keeps: the image pivots, then for each pivot in sequence order its
    (keep - image pivots) // pivots least similar visual tokens not taken yet, then (a budget the pivots do not
    divide) the tokens whose highest similarity to any pivot is lowest. `similarity` (B, T, T) cosine."""
    taken = image_pivots.clone()
    pivots = image_pivots | text_pivots
    length = pivots.shape[1]
    per_pivot = ((keep - image_pivots.sum(1)) // pivots.sum(1).clamp(min=1)).clamp(min=0)
    order = torch.where(pivots, torch.arange(length, device=pivots.device), length).sort(1).values
    for rank in range(int(pivots.sum(1).max())):
        pivot = order[:, rank]  # each sample's rank-th pivot (length: it has fewer)
        row = similarity.gather(1, pivot.clamp(max=length - 1)[:, None, None].expand(-1, 1, length))[:, 0]
        taken |= top_k_mask(-row, visual & ~taken, torch.where(pivot < length, per_pivot, 0))
    highest = similarity.masked_fill(~pivots[:, None, :], float("-inf")).max(-1).values
    return taken | top_k_mask(-highest, visual & ~taken, (keep - taken.sum(1)).clamp(min=0))


TRAINING_FREE_METHODS: dict[str, type[PruningMethod]] = {
    "full": PruningMethod,
    "random": RandomPruning,
    "pool": PoolPruning,
    "fastv": FastV,
    "pdrop": PyramidDrop,
    "visionzip": VisionZip,
    "dart": DART,
}


def build_method(name: str, prune_ratio: float, **kwargs) -> PruningMethod:
    """A training-free method by short name (see TRAINING_FREE_METHODS)."""
    if name not in TRAINING_FREE_METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known: {sorted(TRAINING_FREE_METHODS)}")
    if name == "full":
        if prune_ratio != 0.0:
            raise ValueError(f"method 'full' keeps every token; prune_ratio={prune_ratio} must be 0")
        return PruningMethod(0.0)
    return TRAINING_FREE_METHODS[name](prune_ratio, **kwargs)
