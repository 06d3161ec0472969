"""The interface every visual-token pruning method implements, and the contexts the engine hands it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lvlm_prune.engine.attention import attention_rows, layer_keys
from lvlm_prune.engine.state import SequenceState, gather_rows


@dataclass(frozen=True)
class ModelInfo:
    """What a method needs to know about the base model to plan its schedule.

    Args:
        num_layers: decoder layers.
        num_visual_tokens: N, the visual tokens of one image. Where images give different counts
            (`varying_visual_tokens`, LLaVA-NeXT) it is the most one image can give: a model-level constant, so
            module sizes and bind-time checks stay per model; each sample's own count is `num_visual` of the
            hook contexts, and budgets are computed from that.
        hidden_size: LLM width.
        vision_feature_layer: the vision layer(s) the projector reads.
        model_type: the model family (`config.model_type`: 'llava', 'llava_next'), for error messages.
        varying_visual_tokens: images give different numbers of visual tokens (LLaVA-NeXT's anyres packing).
    """

    num_layers: int
    num_visual_tokens: int
    hidden_size: int
    vision_feature_layer: int | list[int]
    model_type: str = "llava"
    varying_visual_tokens: bool = False


@dataclass
class PreLLMContext:
    """Inputs of a selection/merging step between the projector and the LLM.

    Args:
        model: the base LLaVA model.
        pixel_values: (B, 3, H, W) (LLaVA-NeXT: (B, crops, 3, H, W)).
        visual_features: (B, N, d) projected visual tokens; a merging method may write merged features here.
            Sample b's tokens are rows [0, num_visual[b]); where counts differ (LLaVA-NeXT) N is the batch's
            largest count and the rows after a sample's count are zero padding.
        text_embeds: (B, T, d) input embeddings of the prompt (visual positions hold the visual features).
        state: the sequence before the LLM.
        vision_hidden_states: the vision tower's hidden states (embeddings + each layer's output); () on
            LLaVA-NeXT, where they are per anyres crop.
    """

    model: Any
    pixel_values: torch.Tensor
    visual_features: torch.Tensor
    text_embeds: torch.Tensor
    state: SequenceState
    vision_hidden_states: tuple[torch.Tensor, ...] = ()

    @property
    def num_visual(self) -> torch.Tensor:
        """(B,) long: visual tokens of each sample (its image-token positions in the input)."""
        return (self.state.visual_index >= 0).sum(1)

    @property
    def visual_valid(self) -> torch.Tensor:
        """(B, N) bool: rows of `visual_features` that are real tokens of their sample (not padding)."""
        n = self.visual_features.shape[1]
        return torch.arange(n, device=self.visual_features.device)[None] < self.num_visual[:, None]

    def _vision_read_index(self) -> int:
        """Index into the vision hidden states of the output LLaVA reads (the last of several layers')."""
        layers = self.model.model.vision_tower.encoder.layers
        read = self.model.config.vision_feature_layer
        read = read[-1] if isinstance(read, (list, tuple)) else read
        index = read if read >= 0 else len(layers) + 1 + read
        if not 1 <= index <= len(layers) or len(self.vision_hidden_states) <= index:
            raise ValueError(f"vision_feature_layer={read} does not name an encoder layer's output")
        return index

    def vision_read_layer(self) -> tuple[torch.nn.Module, torch.Tensor]:
        """The vision encoder layer whose output LLaVA reads (`vision_feature_layer`) and that layer's input."""
        index = self._vision_read_index()
        return self.model.model.vision_tower.encoder.layers[index - 1], self.vision_hidden_states[index - 1]

    def vision_layer_after_read(self) -> tuple[torch.nn.Module, torch.Tensor] | None:
        """The vision encoder layer after the one LLaVA reads and its input, i.e. the very features LLaVA reads
        (LLaVA-1.5: layers[23], input = the penultimate layer's output); None where LLaVA reads the last layer.
        The stock tower has already run it, but a score needs only its `layer_norm1` and q/k projections."""
        index = self._vision_read_index()
        layers = self.model.model.vision_tower.encoder.layers
        if index >= len(layers):
            return None
        return layers[index], self.vision_hidden_states[index]

    def projector_input(self) -> torch.Tensor:
        """(B, N, C) the vision features LLaVA's projector reads, built as the stock `get_image_features` builds
        them: the hidden states of `vision_feature_layer` (several layers' concatenated along C), without [CLS]
        under the 'default' feature strategy. Row j is visual token j: `project` of it gives `visual_features`
        as the engine computed them, before any method changed them."""
        if not self.vision_hidden_states:
            raise ValueError("the vision tower's hidden states are not available (LLaVA-NeXT gives them per crop)")
        config = self.model.config
        read = config.vision_feature_layer
        rows = [self.vision_hidden_states[layer] for layer in (read if isinstance(read, (list, tuple)) else [read])]
        if getattr(config, "vision_feature_select_strategy", "default") == "default":
            rows = [hidden[:, 1:] for hidden in rows]
        return torch.cat(rows, -1)

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """(B, M, d): LLaVA's projector applied to (B, M, C) vision features (e.g. tokens merged before it)."""
        return self.model.model.multi_modal_projector(vision_features)


@dataclass
class LayerContext:
    """The input of decoder layer `layer_idx`, with helpers for attention-based scores.

    `attention_bias` is the (B, 1, T, T) additive mask the layer is about to use; `num_visual` (B,) the visual
    tokens each sample had before the LLM (its own count on LLaVA-NeXT), what per-sample budgets start from;
    `final_norm` the language model's output norm.
    """

    layer_idx: int
    layer: torch.nn.Module
    state: SequenceState
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_bias: torch.Tensor
    soft: bool
    num_visual: torch.Tensor
    final_norm: torch.nn.Module | None = None  # the language model's last norm (DART compares tokens after it)
    _normed: torch.Tensor | None = field(default=None, repr=False)
    _keys: torch.Tensor | None = field(default=None, repr=False)

    @property
    def normed(self) -> torch.Tensor:
        """(B, T, d) the layer's input after its input norm (what its attention projects)."""
        if self._normed is None:
            self._normed = self.layer.input_layernorm(self.state.hidden)
        return self._normed

    def last_prompt_index(self) -> torch.Tensor:
        """(B,) index of the last prompt token: the first answer-generation position, or, in a row that has none
        (a teacher-forced sample whose answer tokens are all ignored, e.g. cut away by truncation), its last real
        token, as for a prompt without labels."""
        answer = self.state.answer_mask
        return torch.where(answer.any(1), answer.float().argmax(1), self.state.last_real_index())

    def prompt_after_image(self) -> torch.Tensor:
        """(B, T) bool: the prompt tokens after the image, i.e. the question tokens and the last prompt token;
        never an answer token of a teacher-forced pass."""
        last = torch.zeros_like(self.state.question_mask)
        last[torch.arange(last.shape[0], device=last.device), self.last_prompt_index()] = True
        return self.state.question_mask | (last & self.state.key_valid & (self.state.visual_index < 0))

    def attention_probs(self, query_index: torch.Tensor) -> torch.Tensor:
        """(B, heads, Q, T) attention probabilities of rows `query_index` (B, Q) at this layer."""
        return attention_rows(self.layer, self.normed, self.position_embeddings, query_index, self.attention_bias,
                              keys=self.keys())

    def last_token_to_visual(self) -> torch.Tensor:
        """(B, T) head-averaged attention of the last prompt token to each present visual token (0 elsewhere)."""
        probs = self.attention_probs(self.last_prompt_index()[:, None]).mean(1)[:, 0]
        return probs * self.state.visual_mask

    def question_to_visual(self) -> torch.Tensor:
        """(B, T) attention to each present visual token, averaged over heads and question rows."""
        question = self.state.question_mask
        counts = question.sum(1)
        positions = torch.arange(question.shape[1], device=question.device).expand_as(question)
        index, row_valid = gather_rows(positions, question, min_width=1)
        probs = self.attention_probs(index).mean(1)  # (B, Q, T)
        probs = (probs * row_valid[..., None]).sum(1) / counts.clamp(min=1)[:, None]
        # no question token (e.g. an empty prompt): fall back to the last prompt token. Evaluated for every batch, not
        # only when needed: under ZeRO-3 a data-dependent call of the base's projections would leave the other ranks
        # waiting in its weight gather (the keys are shared, so it costs one query row)
        probs = torch.where((counts > 0)[:, None], probs, self.last_token_to_visual())
        return probs * self.state.visual_mask

    def keys(self) -> torch.Tensor:
        """(B, kv_heads, T, head_dim) RoPE'd keys of this layer (computed once per layer context)."""
        if self._keys is None:
            self._keys = layer_keys(self.layer, self.normed, self.position_embeddings)
        return self._keys


class PruningMethod:
    """Base class: keeps every visual token. Subclasses override the hooks they need.

    A method is told the model (`bind`) once, plans how many visual tokens each decoder layer sees for its
    prune ratio, and is then called by the engine: `before_llm` (selection/merging after the projector),
    `at_layer` for each layer in `prune_layers` (which present visual tokens to keep from that layer's input
    on), and `after_layer` (e.g. adapters). All hooks see whole batches.

    `handles_varying_visual_tokens`: the method budgets each sample from its own visual-token count
    (`num_visual` of the contexts) and needs nothing of LLaVA-1.5's fixed layout (the CLIP grid, [CLS]
    attention), so the engine runs it on LLaVA-NeXT. It is not inherited: a subclass declares it in its own
    body, because a subclass may plan from `info.num_visual_tokens`, which there is only an upper bound.
    """

    name = "full"
    prune_layers: tuple[int, ...] = ()
    handles_varying_visual_tokens = True

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.handles_varying_visual_tokens = cls.__dict__.get("handles_varying_visual_tokens", False)

    def __init__(self, prune_ratio: float = 0.0):
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"prune_ratio={prune_ratio} must be in [0, 1)")
        self.prune_ratio = prune_ratio
        self.info: ModelInfo | None = None

    def bind(self, info: ModelInfo) -> None:
        """Plan the schedule for this model; raise ValueError when the budget cannot be reached."""
        self.info = info

    def planned_visual_tokens(self) -> list[float]:
        """Visual tokens per decoder layer the schedule aims at (length num_layers)."""
        assert self.info is not None, "bind() first"
        return [float(self.info.num_visual_tokens)] * self.info.num_layers

    def before_llm(self, ctx: PreLLMContext) -> torch.Tensor | None:
        """(B, N) keep mask over the visual tokens (bool; float straight-through on the soft path), or None."""
        return None

    def at_layer(self, ctx: LayerContext) -> torch.Tensor | None:
        """(B, T) keep mask over the layer input's tokens (only visual entries matter), or None."""
        return None

    def after_layer(self, ctx: LayerContext, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output (B, T, d), possibly modified."""
        return hidden

    def plugin_flops(self, text_tokens: int) -> dict[str, float]:
        """FLOPs of the method's own modules per sample (scoring, pruners, adapters)."""
        return {}


class KeepWeightProbe(PruningMethod):
    """Soft keep weights (B, N) of the visual tokens before the first decoder layer, a leaf tensor: the gradient of a
    loss with respect to them is each token's saliency for that loss (at every weight 1 the pass is the full-token
    one). RCP's saliency target (`lvlm_prune/rcp`) and the selection oracles' (`scripts/selection_oracles.py`)."""

    name = "keep_weight_probe"

    def __init__(self, weights: torch.Tensor):
        super().__init__(0.0)
        self.weights = weights

    def before_llm(self, ctx: PreLLMContext) -> torch.Tensor:
        return self.weights


def per_sample(num_visual: torch.Tensor, count: Callable[[int], int]) -> torch.Tensor:
    """(B,) long: `count(n)` for each sample's visual-token count n. Evaluated on Python ints, so a sample gets
    exactly the integer the fixed-count plan gives for its n (on LLaVA-1.5 the same for every sample)."""
    values = {n: count(n) for n in set(num_visual.tolist())}
    return torch.tensor([values[n] for n in num_visual.tolist()], dtype=torch.long, device=num_visual.device)


def top_k_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """(B, T) bool: the k highest-scoring candidate positions per row (k may differ per row)."""
    # a candidate scored -inf is raised to the lowest finite value: tied with the masked non-candidates, one of them
    # before it in the row would take its rank (fewer than k kept)
    lowest = torch.finfo(torch.float).min
    masked = torch.where(candidates, scores.float().clamp_min(lowest),
                         torch.full_like(scores, float("-inf"), dtype=torch.float))
    order = masked.argsort(dim=1, descending=True, stable=True)
    if isinstance(k, int):
        k = torch.full((scores.shape[0],), k, device=scores.device)
    k = torch.minimum(k, candidates.sum(1))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (ranks < k[:, None]) & candidates
