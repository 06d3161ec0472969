"""The pruned forward: a LLaVA-family model run layer by layer with a visual-token schedule.

Instance-scoped: the engine wraps a model object without changing its class or its modules, so a pruned
student and an unpruned teacher can use the same weights in one process. Each decoder layer is the stock
module, called with an additive (B, 1, T, T) mask that the engine builds itself, so the model keeps its own
attention implementation (SDPA or eager).

Families (`families.py`): LLaVA-1.5 gives every sample the same N visual tokens, LLaVA-NeXT gives each sample
its own count. The engine carries the visual features padded to the batch's largest count together with each
sample's count (`num_visual`); from the scatter into the image-token positions on, both run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from lvlm_prune.data import IGNORE_INDEX, answer_generation_mask
from lvlm_prune.engine.families import visual_family
from lvlm_prune.engine.methods import LayerContext, ModelInfo, PreLLMContext, PruningMethod
from lvlm_prune.engine.state import SequenceState
from lvlm_prune.modeling.compat import cache_argument

_SOFT_EPS = 1e-6  # log(w + eps): exact post-softmax mask-and-renormalise up to 1e-6, finite gradient at w = 0


@dataclass
class EngineOutput:
    """Result of one engine forward.

    Args:
        logits: (B, T_in, V) at the input's positions (zeros where a token was removed), or (B, V) for
            `logits="last"`.
        visual_tokens_per_layer: (B, num_layers) visual tokens each sample had in each decoder layer.
        captured: layer index -> (B, T_in, d) residual output of that layer (after `after_layer`), at input
            positions (zeros where removed).
        state: the sequence after the last layer.
    """

    logits: torch.Tensor
    visual_tokens_per_layer: torch.Tensor
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    state: SequenceState | None = None


@dataclass
class _DecodeState:
    cache: DynamicCache
    layer_key_valid: list[torch.Tensor]
    next_position: torch.Tensor
    num_visual: torch.Tensor


class PrunedLlava:
    """Runs `model` (a `LlavaForConditionalGeneration` or a `LlavaNextForConditionalGeneration`) with a
    `PruningMethod`.

    `info.num_visual_tokens` is N on LLaVA-1.5 and, on LLaVA-NeXT, the most visual tokens one image can give under
    the config's grid pinpoints (a per-model constant, so plug-in sizes and bind-time checks do not depend on the
    batch); each sample's own count is its number of image tokens in `input_ids`, handed to the method's hooks as
    `num_visual`.

    Args:
        model: the base model; never modified.
    """

    def __init__(self, model: torch.nn.Module):
        attention = getattr(model.config.get_text_config(), "_attn_implementation", None)
        if attention is not None and attention.startswith("flash_attention"):
            raise ValueError(f"the engine cannot run a language model with attn_implementation={attention!r}: it "
                             "passes every layer a (B, 1, T, T) additive mask (pruned and softly masked tokens), which "
                             "the flash-attention path does not take; load the base with 'sdpa' or 'eager'")
        self.model = model
        self.llava = model.model
        self.language_model = self.llava.language_model
        self.layers = self.language_model.layers
        self.config = model.config
        self.image_token_id = self.config.image_token_id
        self.family = visual_family(model)
        self.info = ModelInfo(
            num_layers=len(self.layers),
            num_visual_tokens=self.family.max_visual_tokens(),
            hidden_size=self.config.get_text_config().hidden_size,
            vision_feature_layer=self.config.vision_feature_layer,
            model_type=self.config.model_type,
            varying_visual_tokens=self.family.varying_visual_tokens,
        )

    def bind(self, method: PruningMethod | None) -> PruningMethod:
        method = method if method is not None else PruningMethod()
        if self.info.varying_visual_tokens and not method.handles_varying_visual_tokens:
            raise ValueError(
                f"{method.name}: not supported on {self.info.model_type}, whose images give different numbers of "
                "visual tokens (anyres crops packed with newline tokens): the method assumes LLaVA-1.5's fixed layout "
                "(one CLIP grid with its [CLS] attention, one budget for every sample); use a method that budgets "
                "per sample (training-free: random, fastv, pdrop, dart)"
            )
        method.bind(self.info)  # methods that scale their layers with depth (FastV, PyramidDrop, DART) set them here
        for layer in method.prune_layers:
            if not 0 <= layer < self.info.num_layers:
                raise ValueError(
                    f"{method.name}: pruning layer {layer} is outside the model's {self.info.num_layers} decoder layers"
                )
        return method

    # ------------------------------------------------------------------ inputs
    def visual_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(B, N, d) projected visual tokens, exactly as the stock forward computes them, and the vision
        tower's hidden states (embeddings + every layer's output, each (B, 1 + N, C)).

        LLaVA-NeXT: `image_sizes` (B, 2) is required; sample b's tokens are rows [0, N_b) (N_b: its image tokens
        in `input_ids`), zero-padded to the largest N_b; the hidden states are () (they are per anyres crop)."""
        tokens = self.family.encode(pixel_values, image_sizes)
        return tokens.features, tokens.vision_hidden_states

    def _visual_inputs(
        self,
        pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | None,
        visual_inputs: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None,
        num_visual: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if visual_inputs is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or precomputed visual_inputs")
            tokens = self.family.encode(pixel_values, image_sizes)
            if tokens.counts.shape != num_visual.shape or not torch.equal(tokens.counts, num_visual):
                raise ValueError(
                    f"the images give {tokens.counts.tolist()} visual tokens but input_ids hold {num_visual.tolist()} "
                    f"image tokens (id {self.image_token_id}): one image per sample, its <image> expanded by this "
                    "model's processor (for llava_next, pass the image_sizes that processor returned)"
                )
            return tokens.features, tokens.vision_hidden_states
        features, vision_hidden = visual_inputs
        expected = (num_visual.shape[0], int(num_visual.max()), self.info.hidden_size)
        if tuple(features.shape) != expected:
            raise ValueError(f"visual_inputs features have shape {tuple(features.shape)}, expected {expected}")
        return features, tuple(vision_hidden)

    def initial_state(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
    ) -> SequenceState:
        is_image = input_ids == self.image_token_id
        n_visual = is_image.sum(1)
        if not self.info.varying_visual_tokens and (n_visual != self.info.num_visual_tokens).any():
            raise ValueError(
                f"each sample needs exactly {self.info.num_visual_tokens} image tokens (id {self.image_token_id}) "
                f"in input_ids, got {n_visual.tolist()}: the processor's image_seq_length does not match the model"
            )
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        visual_index = torch.where(is_image, is_image.long().cumsum(1) - 1, torch.full_like(input_ids, -1))
        last_image = torch.where(is_image, torch.arange(input_ids.shape[1], device=input_ids.device), -1).max(1).values
        after_image = torch.arange(input_ids.shape[1], device=input_ids.device)[None] > last_image[:, None]
        real = attention_mask.bool() | is_image  # hidden visual tokens are still part of the sequence
        last_real = (real.long() * torch.arange(input_ids.shape[1], device=input_ids.device)).argmax(1)
        ends_with_image = is_image.gather(1, last_real[:, None]).squeeze(1)
        if ends_with_image.any():
            # a pruning method may drop that token, and the next-token logits would be read off another one
            raise ValueError(f"sample(s) {ends_with_image.nonzero().flatten().tolist()} of the batch end with an image "
                             "token: a prompt needs text after its image (LLaVA's ends with 'ASSISTANT:')")
        if labels is not None:
            answer_mask = answer_generation_mask(labels)
            in_answer = labels != IGNORE_INDEX
        else:
            answer_mask = torch.zeros_like(is_image)
            answer_mask[torch.arange(input_ids.shape[0]), last_real] = True
            in_answer = torch.zeros_like(is_image)
        # the first turn's question only: at generation time later turns do not exist yet
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        first_answer = torch.where(answer_mask, positions, input_ids.shape[1]).min(1).values
        question_mask = after_image & real & ~in_answer & ~answer_mask & (positions[None] < first_answer[:, None])
        return SequenceState(
            hidden=inputs_embeds,
            position_ids=position_ids,
            key_valid=attention_mask.bool(),
            visual_index=visual_index,
            question_mask=question_mask,
            answer_mask=answer_mask,
            source_index=torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids).clone(),
        )

    # ------------------------------------------------------------------ masks
    def attention_bias(self, state: SequenceState) -> torch.Tensor:
        """(B, 1, T, T) additive mask: causal by index, invalid keys masked, soft visual weights as log(w)."""
        dtype = state.hidden.dtype
        t = state.hidden.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=state.hidden.device).tril()
        allowed = causal[None] & state.key_valid[:, None, :]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=state.hidden.device)
        if state.key_weight is not None:
            bias = bias + torch.log(state.key_weight + _SOFT_EPS).to(dtype)[:, None, :]
        bias = bias.masked_fill(~allowed, torch.finfo(dtype).min)
        return bias[:, None]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        method: PruningMethod | None = None,
        soft: bool = False,
        capture_layers: tuple[int, ...] = (),
        logits: str = "all",
        visual_inputs: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None,
        image_sizes: torch.Tensor | None = None,
        _decode: _DecodeState | None = None,
    ) -> EngineOutput:
        """One prefill/teacher-forced pass.

        Args:
            input_ids: (B, T) with N image tokens per sample (LLaVA-NeXT: as many as the sample's image gives).
            attention_mask: (B, T) 1 = real token; 0 = padding or a visual token hidden from the LLM.
            pixel_values: (B, 3, H, W) (LLaVA-NeXT: (B, crops, 3, H, W)); may be None when `visual_inputs` is
                given.
            position_ids: (B, T) RoPE positions (default: cumsum of the mask).
            labels: (B, T) answer labels (-100 elsewhere): mark answer-generation positions for the method.
            method: the pruning method (bound to this model); None keeps all tokens.
            soft: training path: nothing is removed; dropped visual tokens are masked out as keys with
                straight-through weights so gradients reach the method's mask.
            capture_layers: layers whose outputs are returned (e.g. for a repair loss).
            logits: 'all' (every input position), 'last' (the last real token of each sample) or 'none'.
            visual_inputs: precomputed `visual_features(pixel_values)` ((B, N, d) features, vision hidden
                states); skips the vision tower (e.g. one image encoded once for several prompts).
            image_sizes: LLaVA-NeXT only: (B, 2) original (height, width) of each image, from the processor.
        """
        method = self.bind(method)
        batch = input_ids.shape[0]
        embed = self.language_model.embed_tokens
        inputs_embeds = embed(input_ids)
        state = self.initial_state(input_ids, attention_mask, position_ids, labels, inputs_embeds)
        in_length = input_ids.shape[1]
        is_image = state.visual_index >= 0
        num_visual = is_image.sum(1)
        features, vision_hidden = self._visual_inputs(pixel_values, image_sizes, visual_inputs, num_visual)
        features = features.to(inputs_embeds.dtype)

        pre = PreLLMContext(self.model, pixel_values, features, inputs_embeds, state, vision_hidden)
        keep_visual = method.before_llm(pre)
        features = pre.visual_features
        state.hidden = inputs_embeds.masked_scatter(is_image[..., None], features[pre.visual_valid])
        if keep_visual is not None:
            state = self._apply_keep(state, _to_sequence(keep_visual, state), soft)

        num_layers = self.info.num_layers
        counts = torch.zeros(batch, num_layers, device=input_ids.device)
        captured: dict[int, torch.Tensor] = {}
        bias = self.attention_bias(state)
        position_embeddings = self.language_model.rotary_emb(state.hidden, position_ids=state.position_ids)
        final_norm = self.language_model.norm
        for idx, layer in enumerate(self.layers):
            ctx = LayerContext(idx, layer, state, position_embeddings, bias, soft, num_visual, final_norm)
            if idx in method.prune_layers:
                keep = method.at_layer(ctx)
                if keep is not None:
                    state = self._apply_keep(state, keep, soft)
                    bias = self.attention_bias(state)
                    position_embeddings = self.language_model.rotary_emb(state.hidden, position_ids=state.position_ids)
                    ctx = LayerContext(idx, layer, state, position_embeddings, bias, soft, num_visual, final_norm)
            counts[:, idx] = state.visual_counts()
            if _decode is not None:
                _decode.layer_key_valid.append(state.key_valid.clone())
            hidden = layer(
                state.hidden,
                attention_mask=bias,
                position_ids=state.position_ids,
                use_cache=_decode is not None,
                **cache_argument(_decode.cache if _decode is not None else None),
                position_embeddings=position_embeddings,
            )
            hidden = method.after_layer(ctx, hidden)
            state = state.with_hidden(hidden)
            if idx in capture_layers:
                captured[idx] = _to_input_layout(hidden, state, in_length)

        output = EngineOutput(logits=torch.empty(0), visual_tokens_per_layer=counts, captured=captured, state=state)
        if logits == "none":
            return output
        if logits == "last":
            last = self.last_real_index(state)
            normed = self.language_model.norm(state.hidden[torch.arange(batch), last])
            output.logits = self.model.lm_head(normed)
        elif logits == "all":
            output.logits = _to_input_layout(self.model.lm_head(self.language_model.norm(state.hidden)), state, in_length)
        else:
            raise ValueError(f"logits={logits!r}; choose 'all', 'last' or 'none'")
        return output

    __call__ = forward

    @staticmethod
    def last_real_index(state: SequenceState) -> torch.Tensor:
        return state.last_real_index()

    def _apply_keep(self, state: SequenceState, keep: torch.Tensor, soft: bool) -> SequenceState:
        is_visual = state.visual_index >= 0
        if soft:
            weight = torch.where(is_visual, keep.to(state.hidden.dtype), torch.ones_like(keep, dtype=state.hidden.dtype))
            state.key_weight = weight if state.key_weight is None else state.key_weight * weight
            return state
        if keep.dtype != torch.bool:
            keep = keep > 0.5
        return state.compact(keep | ~is_visual)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        method: PruningMethod | None = None,
        max_new_tokens: int = 16,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        visual_inputs: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding on the pruned KV cache (`visual_inputs`, `image_sizes`: see `forward`).

        Returns:
            tokens (B, T_new) (rows that ended are padded with `pad_token_id`) and the prefill's
            `visual_tokens_per_layer` (B, num_layers).
        """
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be at least 1 (the answer's first token)")
        method = self.bind(method)
        decode = _DecodeState(DynamicCache(config=self.config.get_text_config()), [], torch.empty(0),
                              (input_ids == self.image_token_id).sum(1))
        out = self.forward(input_ids, attention_mask, pixel_values, position_ids, method=method, logits="last",
                           visual_inputs=visual_inputs, image_sizes=image_sizes, _decode=decode)
        state = out.state
        decode.next_position = state.position_ids.max(1).values + 1
        batch = input_ids.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        tokens = []
        logits = out.logits
        for step in range(max_new_tokens):
            token = logits.argmax(-1)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            tokens.append(token)
            if eos_token_id is not None:
                finished |= token == eos_token_id
            if finished.all() or step == max_new_tokens - 1:
                break
            logits = self._decode_step(token, decode, method)
        return torch.stack(tokens, 1), out.visual_tokens_per_layer

    def _decode_step(self, token: torch.Tensor, decode: _DecodeState, method: PruningMethod) -> torch.Tensor:
        batch = token.shape[0]
        hidden = self.language_model.embed_tokens(token[:, None])
        position_ids = decode.next_position[:, None]
        position_embeddings = self.language_model.rotary_emb(hidden, position_ids=position_ids)
        ones = torch.ones(batch, 1, dtype=torch.bool, device=token.device)
        step_state = SequenceState(
            hidden=hidden, position_ids=position_ids, key_valid=ones, visual_index=torch.full_like(position_ids, -1),
            question_mask=~ones, answer_mask=ones, source_index=torch.zeros_like(position_ids),
        )
        for idx, layer in enumerate(self.layers):
            decode.layer_key_valid[idx] = torch.cat([decode.layer_key_valid[idx], ones], 1)
            valid = decode.layer_key_valid[idx]
            bias = torch.zeros(batch, 1, 1, valid.shape[1], dtype=hidden.dtype, device=hidden.device)
            bias = bias.masked_fill(~valid[:, None, None, :], torch.finfo(hidden.dtype).min)
            hidden = layer(hidden, attention_mask=bias, position_ids=position_ids, use_cache=True,
                           position_embeddings=position_embeddings, **cache_argument(decode.cache))
            ctx = LayerContext(idx, layer, step_state, position_embeddings, bias, False, decode.num_visual)
            hidden = method.after_layer(ctx, hidden)
            step_state = step_state.with_hidden(hidden)
        decode.next_position = decode.next_position + 1
        return self.model.lm_head(self.language_model.norm(hidden[:, -1]))


def _to_sequence(keep_visual: torch.Tensor, state: SequenceState) -> torch.Tensor:
    """(B, N) mask over visual tokens -> (B, T) mask over the sequence (True on text)."""
    index = state.visual_index.clamp(min=0)
    per_token = keep_visual.gather(1, index)
    return torch.where(state.visual_index >= 0, per_token, torch.ones_like(per_token))


def _to_input_layout(values: torch.Tensor, state: SequenceState, length: int) -> torch.Tensor:
    """(B, T', ...) in the state's layout -> (B, length, ...) at the input positions (zeros where removed)."""
    if values.shape[1] == length and bool((state.source_index == torch.arange(length, device=values.device)).all()):
        return values
    out = values.new_zeros(values.shape[0], length, *values.shape[2:])
    valid = state.source_index >= 0
    batch_index = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(state.source_index)
    out[batch_index[valid], state.source_index[valid]] = values[valid]
    return out
