"""Unit-level behaviour of the pruned-forward engine that the parity tests do not pin: bind-time and input checks,
default positions, keep masks on text and float keeps, cumulative soft masks, the input layout of the outputs, early
stopping, the vision read layer, and the helpers (`top_k_mask`, `per_sample`, `gather_rows`, `SequenceState`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import TINY_IMAGE_TOKEN, make_batch, make_tiny_llava
from test_engine_parity import KeepFixed  # tests/engine is on sys.path (pytest's rootdir-relative imports)

from lvlm_prune.data import IGNORE_INDEX
from lvlm_prune.engine import PrunedLlava, PruningMethod, SequenceState, gather_rows, per_sample, top_k_mask
from lvlm_prune.engine.attention import rotary_fn
from lvlm_prune.engine.methods import LayerContext


class AtLayers(PruningMethod):
    """Asks for the given pruning layers and keeps every token."""

    name = "at_layers"

    def __init__(self, layers):
        super().__init__(0.0)
        self.prune_layers = tuple(layers)


class Capture(PruningMethod):
    """Keeps every token; records the pre-LLM context and each layer context of `layers`."""

    name = "capture"

    def __init__(self, layers=()):
        super().__init__(0.0)
        self.prune_layers = tuple(layers)
        self.pre = None
        self.seen = {}

    def before_llm(self, ctx):
        self.pre = ctx
        return None

    def at_layer(self, ctx):
        self.seen[ctx.layer_idx] = (ctx.question_to_visual(), ctx.last_token_to_visual())
        return None


def hand_state():
    """Two samples of 7 tokens: [text, v0, v1, v2, question, question, answer] and [pad, text, v0, v1, v2, question,
    answer]; hidden = 0..13."""
    return SequenceState(
        hidden=torch.arange(14.0).view(2, 7, 1),
        position_ids=torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4, 5]]),
        key_valid=torch.tensor([[True] * 7, [False] + [True] * 6]),
        visual_index=torch.tensor([[-1, 0, 1, 2, -1, -1, -1], [-1, -1, 0, 1, 2, -1, -1]]),
        question_mask=torch.tensor([[False] * 4 + [True, True, False], [False] * 5 + [True, False]]),
        answer_mask=torch.tensor([[False] * 6 + [True], [False] * 6 + [True]]),
        source_index=torch.arange(7).expand(2, 7).clone(),
    )


# ---------------------------------------------------------------------------------------------------- bind / inputs
def test_bind_refuses_pruning_layers_just_outside_the_decoder(tiny_spec):
    engine = PrunedLlava(make_tiny_llava(tiny_spec))  # 4 decoder layers: 0..3
    for layer in (4, -1):
        with pytest.raises(ValueError, match=f"at_layers: pruning layer {layer} is outside the model's 4 decoder"):
            engine.bind(AtLayers([layer]))
    assert engine.bind(AtLayers([0, 3])).prune_layers == (0, 3)


def test_one_sample_with_a_wrong_image_token_count_is_enough_to_refuse_the_batch(tiny_spec):
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    ids[1, 5] = 5  # sample 1 holds 15 image tokens, sample 0 the right 16
    with pytest.raises(ValueError, match=r"exactly 16 image tokens .* got \[16, 15\]"):
        PrunedLlava(make_tiny_llava(tiny_spec))(ids, mask, pixels)


def test_a_prompt_whose_image_is_hidden_but_last_is_still_refused(tiny_spec):
    """Hidden visual tokens (attention mask 0) are still part of the sequence: a prompt that ends with them ends with
    an image."""
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, text_len=1, left_pad=(0,))
    ids[1] = torch.cat([ids[1, :1], ids[1, -1:], ids[1, 1:-1]])  # [bos, text, image x 16]
    mask[1, 2:] = 0  # the image hidden from the LLM
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] of the batch end with an image token"):
        PrunedLlava(make_tiny_llava(tiny_spec))(ids, mask, pixels)


def test_an_unknown_logits_choice_is_refused_and_none_computes_no_logits(tiny_spec):
    engine = PrunedLlava(make_tiny_llava(tiny_spec))
    ids, mask, pixels = make_batch(tiny_spec, batch_size=1, left_pad=(0,))
    with torch.no_grad():
        with pytest.raises(ValueError, match="logits='every'; choose 'all', 'last' or 'none'"):
            engine(ids, mask, pixels, logits="every")
        assert engine(ids, mask, pixels, logits="none").logits.numel() == 0


# ---------------------------------------------------------------------------------------------------- initial state
def test_default_positions_are_the_cumulative_mask_minus_one(tiny_spec):
    """Left padding and an image token hidden by the mask do not advance the position; the forward uses them."""
    model = make_tiny_llava(tiny_spec)
    engine = PrunedLlava(model)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    mask[1, 5] = 0  # sample 1: [pad, pad, bos, image, image, (hidden image), image, ...]
    embeds = torch.zeros(*ids.shape, tiny_spec.hidden_size)
    positions = engine.initial_state(ids, mask, None, None, embeds).position_ids
    length = ids.shape[1]
    assert positions[0].tolist() == list(range(length))
    assert positions[1].tolist() == [0, 0, 0, 1, 2, 2] + list(range(3, length - 3))
    with torch.no_grad():
        default = engine(ids, mask, pixels).logits
        explicit = engine(ids, mask, pixels, position_ids=positions).logits
    assert torch.equal(default, explicit)


def test_right_padding_is_no_question_token_of_a_sample_without_answer_labels(tiny_spec):
    """A teacher-forced sample whose labels are all ignored asks every text token after its image, but never its
    right padding."""
    ids, mask, _ = make_batch(tiny_spec, batch_size=1, text_len=6, left_pad=(0,))
    mask[0, -2:] = 0  # right padding
    labels = torch.full_like(ids, IGNORE_INDEX)
    engine = PrunedLlava(make_tiny_llava(tiny_spec))
    state = engine.initial_state(ids, mask, None, labels, torch.zeros(*ids.shape, tiny_spec.hidden_size))
    start = 1 + tiny_spec.num_visual_tokens
    assert state.question_mask[0].nonzero().flatten().tolist() == list(range(start, start + 4))


def test_the_attention_bias_is_causal_masks_invalid_keys_exactly_and_renormalises_soft_weights(tiny_spec):
    """Softmax over a bias row gives each allowed key (causal, valid) its soft weight, renormalised (the weight-0 key
    keeps the 1e-6 of the log's epsilon); a padding key or a later one gets exactly nothing."""
    engine = PrunedLlava(make_tiny_llava(tiny_spec))
    state = hand_state()
    state.key_weight = torch.tensor([[1.0] * 7, [1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0]])
    probs = torch.softmax(engine.attention_bias(state), -1)
    assert probs.shape == (2, 1, 7, 7)
    torch.testing.assert_close(probs[0, 0], torch.ones(7, 7).tril() / torch.arange(1.0, 8.0)[:, None])
    row = probs[1, 0, 4]  # sample 1's v2 attends to text, v0, v1 (weight 0), itself (weight 0.5)
    torch.testing.assert_close(row, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5, 0.0, 0.0]) / 2.5, atol=1e-6, rtol=0.0)
    assert row[0] == 0 and (row[5:] == 0).all() and (probs[1, 0, 1:, 0] == 0).all()


# ---------------------------------------------------------------------------------------------------- keep masks
class DropTextToo(KeepFixed):
    """KeepFixed whose layer mask is also False on every text token: only its visual entries may count."""

    name = "drop_text_too"

    def at_layer(self, ctx):
        visual = ctx.state.visual_index >= 0
        keep = super().at_layer(ctx)
        return keep * visual if ctx.soft else keep & visual


class FloatKeep(KeepFixed):
    """KeepFixed's layer mask as floats on the hard path too: 0.7 keeps, 0.3 drops."""

    name = "float_keep"

    def at_layer(self, ctx):
        return torch.where(self._keep(ctx.state.visual_index), 0.7, 0.3)


class TwoStage(PruningMethod):
    """Drops a fixed set of visual tokens per sample at layer 1 and another at layer 2; its layer-2 mask keeps the
    tokens layer 1 dropped (they are gone, or masked, already)."""

    name = "two_stage"
    DROPS = {1: [[0, 1, 2], [3, 4]], 2: [[5, 6], [7, 8, 9]]}

    def __init__(self):
        super().__init__(0.0)
        self.prune_layers = (1, 2)

    def at_layer(self, ctx):
        keep = torch.ones_like(ctx.state.visual_index, dtype=torch.bool)
        for b, drop in enumerate(self.DROPS[ctx.layer_idx]):
            for v in drop:
                keep[b] &= ctx.state.visual_index[b] != v
        return keep.float() if ctx.soft else keep


DROPS = [[0, 3, 5], [1, 2, 9, 15]]


@pytest.mark.parametrize("soft", [False, True])
def test_a_keep_mask_that_is_false_on_text_removes_no_text_token(tiny_spec, soft):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    engine = PrunedLlava(model)
    with torch.no_grad():
        reference = engine(ids, mask, pixels, method=KeepFixed(1, DROPS), soft=soft)
        ours = engine(ids, mask, pixels, method=DropTextToo(1, DROPS), soft=soft)
    assert torch.equal(ours.visual_tokens_per_layer, reference.visual_tokens_per_layer)
    torch.testing.assert_close(ours.logits, reference.logits, atol=0.0, rtol=0.0)


def test_a_float_keep_mask_on_the_hard_path_keeps_the_entries_above_one_half(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    engine = PrunedLlava(model)
    with torch.no_grad():
        reference = engine(ids, mask, pixels, method=KeepFixed(1, DROPS))
        ours = engine(ids, mask, pixels, method=FloatKeep(1, DROPS))
    assert ours.visual_tokens_per_layer[:, 1].tolist() == [13.0, 12.0]
    assert torch.equal(ours.logits, reference.logits)


def test_soft_masks_of_successive_layers_accumulate_as_removal_does(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    engine = PrunedLlava(model)
    with torch.no_grad():
        hard = engine(ids, mask, pixels, method=TwoStage())
        soft = engine(ids, mask, pixels, method=TwoStage(), soft=True)
    expected = [[16.0, 13.0, 11.0, 11.0], [16.0, 14.0, 11.0, 11.0]]
    assert hard.visual_tokens_per_layer.tolist() == expected
    assert soft.visual_tokens_per_layer.tolist() == expected
    text = mask.bool() & (ids != TINY_IMAGE_TOKEN)
    torch.testing.assert_close(soft.logits[text], hard.logits[text], atol=1e-4, rtol=1e-4)


def test_outputs_stay_at_input_positions_when_one_sample_keeps_every_token(tiny_spec):
    """The compacted width equals the input length (sample 0 drops nothing), yet sample 1's outputs are put back at
    their input positions and its removed tokens read zero."""
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    engine = PrunedLlava(model)
    method = KeepFixed(1, [[], [1, 2, 9]])
    with torch.no_grad():
        hard = engine(ids, mask, pixels, method=method, capture_layers=(2,))
        soft = engine(ids, mask, pixels, method=method, soft=True, capture_layers=(2,))
    assert hard.state.hidden.shape[1] == ids.shape[1]
    text = mask.bool() & (ids != TINY_IMAGE_TOKEN)
    torch.testing.assert_close(hard.logits[text], soft.logits[text], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hard.captured[2][text], soft.captured[2][text], atol=1e-4, rtol=1e-4)
    image = (ids[1] == TINY_IMAGE_TOKEN).nonzero().flatten()
    removed = image[[1, 2, 9]]
    assert (hard.logits[1, removed] == 0).all() and (hard.captured[2][1, removed] == 0).all()
    assert (hard.logits[0] != 0).any(-1).all()


# ---------------------------------------------------------------------------------------------------- generation
def test_generation_stops_once_every_sample_has_ended(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0,))
    ids[1], pixels[1] = ids[0], pixels[0]  # two copies of one prompt: both write the same first token
    engine = PrunedLlava(model)
    first, _ = engine.generate(ids, mask, pixels, max_new_tokens=1)
    tokens, counts = engine.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=int(first[0, 0]))
    assert torch.equal(tokens, first) and counts.shape == (2, tiny_spec.num_layers)


# ---------------------------------------------------------------------------------------------------- contexts
def pre_llm_context(spec, **changes):
    """The PreLLMContext a method sees on a tiny model built from `spec` with `changes`."""
    model = make_tiny_llava(replace(spec, **changes))
    ids, mask, pixels = make_batch(spec, batch_size=2)
    capture = Capture()
    with torch.no_grad():
        PrunedLlava(model)(ids, mask, pixels, method=capture, logits="none")
    return model, capture.pre


@pytest.mark.parametrize("read", [-2, -1, 1, [-2, -1]])
def test_the_vision_read_layer_is_the_one_whose_output_llava_projects(tiny_spec, read):
    """2 CLIP layers: -2 and 1 name the first layer's output, -1 (and a list ending with it) the last's; the layer
    after the read one exists only in the first case."""
    model, pre = pre_llm_context(tiny_spec, vision_feature_layer=read)
    layers, hidden = model.model.vision_tower.encoder.layers, pre.vision_hidden_states
    index = 1 if read in (-2, 1) else 2
    layer, layer_input = pre.vision_read_layer()
    assert layer is layers[index - 1] and layer_input is hidden[index - 1]
    after = pre.vision_layer_after_read()
    if index == 1:
        assert after[0] is layers[1] and after[1] is hidden[1]
    else:
        assert after is None
    with torch.no_grad():
        torch.testing.assert_close(pre.project(pre.projector_input()), pre.visual_features, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("read", [0, -3])
def test_a_read_layer_that_is_the_embeddings_is_refused(tiny_spec, read):
    _, pre = pre_llm_context(tiny_spec, vision_feature_layer=read)
    with pytest.raises(ValueError, match=f"vision_feature_layer={read} does not name an encoder layer's output"):
        pre.vision_read_layer()


def test_the_projector_input_needs_the_vision_hidden_states(tiny_spec):
    _, pre = pre_llm_context(tiny_spec, vision_feature_layer=-2)
    with pytest.raises(ValueError, match="hidden states are not available"):
        replace(pre, vision_hidden_states=()).projector_input()


def test_a_sample_without_question_tokens_scores_with_its_last_prompt_token(tiny_spec):
    """Sample 1's prompt is [image, one text token]: no question row, so its question->image score is the last prompt
    token's; sample 0 has two question tokens and a score of its own."""
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, text_len=3, left_pad=(0, 2))
    capture = Capture([1])
    with torch.no_grad():
        PrunedLlava(model)(ids, mask, pixels, method=capture, logits="none")
    question, last = capture.seen[1]
    torch.testing.assert_close(question[1], last[1], atol=0.0, rtol=0.0)
    assert question[1].sum() > 0 and not torch.allclose(question[0], last[0])


def test_the_prompt_after_the_image_never_takes_a_visual_or_hidden_token_as_its_last_prompt_token():
    """Sample 0 answers right after its image (its first answer-generation position is v2); sample 1's first
    answer-generation position (5) is hidden by the attention mask: neither is a query token; the question token is."""
    state = hand_state()
    state.answer_mask = torch.tensor([[False, False, False, True, True, True, False],
                                      [False] * 5 + [True, True]])
    state.question_mask = torch.tensor([[False] * 7, [False, True] + [False] * 5])
    state.key_valid[1, 5] = False
    ctx = LayerContext(0, None, state, None, None, False, torch.tensor([3, 3]))
    assert ctx.last_prompt_index().tolist() == [3, 5]
    assert ctx.prompt_after_image().tolist() == [[False] * 7, [False, True] + [False] * 5]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_attention_probabilities_are_float32_whatever_the_model_s_dtype(tiny_spec, dtype):
    """Scores of a float64 or bfloat16 model are float32 and agree with the float32 model's. (float64: the padding
    query rows of `question_to_visual`, fully masked, once gave NaN, and NaN * 0 spoilt the sample's whole score.)"""
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    scores = {}
    for model_dtype in (torch.float32, dtype):
        capture = Capture([1])
        with torch.no_grad():
            PrunedLlava(make_tiny_llava(tiny_spec).to(model_dtype))(ids, mask, pixels.to(model_dtype), method=capture,
                                                                    logits="none")
        scores[model_dtype] = capture.seen[1]
    assert all(score.dtype == torch.float32 for score in scores[dtype])
    tolerance = 1e-6 if dtype == torch.float64 else 2e-2
    for ours, reference in zip(scores[dtype], scores[torch.float32]):
        torch.testing.assert_close(ours, reference, atol=tolerance, rtol=0.0)


def test_rotary_fn_names_an_attention_class_without_rope_in_its_module():
    class PlainAttention(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match="PlainAttention has no apply_rotary_pos_emb in its module"):
        rotary_fn(PlainAttention())


# ---------------------------------------------------------------------------------------------------- helpers
def test_top_k_mask_takes_the_highest_candidates_and_breaks_ties_by_position():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 9.0, 3.0],
                           [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    candidates = torch.tensor([[True, True, True, True, False, True],
                               [False, True, True, True, True, True]])
    kept = top_k_mask(scores, candidates, torch.tensor([2, 3]))
    assert kept.tolist() == [[False, True, True, False, False, False],
                             [False, True, True, True, False, False]]
    assert top_k_mask(scores, candidates, 1).tolist()[0] == [False, True, False, False, False, False]
    assert torch.equal(top_k_mask(scores, candidates, 10), candidates)  # more than there are: every candidate


def test_top_k_mask_never_returns_a_position_that_is_no_candidate():
    scores = torch.tensor([[0.0, float("-inf"), 1.0]])
    kept = top_k_mask(scores, torch.tensor([[False, True, False]]), 1)
    assert not (kept & torch.tensor([[True, False, True]])).any()
    # the one candidate is kept, though it scores below the higher-scored positions that are no candidates
    assert kept.tolist() == [[False, True, False]]
    # -inf candidates still fill the budget, after the finite ones, by position
    minus_inf = float("-inf")
    scores = torch.tensor([[minus_inf, minus_inf, 2.0, minus_inf, 0.5], [minus_inf, 1.0, minus_inf, 3.0, minus_inf]])
    candidates = torch.tensor([[False, True, False, True, True], [True, False, True, False, True]])
    assert top_k_mask(scores, candidates, torch.tensor([2, 3])).tolist() == [[False, True, False, False, True],
                                                                             [True, False, True, False, True]]


def test_per_sample_evaluates_the_count_on_each_sample_s_own_number():
    calls = []
    counts = per_sample(torch.tensor([14, 24, 14]), lambda n: calls.append(n) or n // 3)
    assert counts.tolist() == [4, 8, 4] and counts.dtype == torch.long
    assert sorted(calls) == [14, 24]  # once per distinct count


def test_gather_rows_packs_the_masked_rows_in_order_and_pads_to_min_width():
    values = torch.arange(2 * 5 * 2).view(2, 5, 2)
    mask = torch.tensor([[False, True, False, True, True], [False, False, True, False, False]])
    rows, valid = gather_rows(values, mask)
    assert rows[0].tolist() == [[2, 3], [6, 7], [8, 9]] and rows[1, 0].tolist() == [14, 15]
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    rows, valid = gather_rows(values[..., 0], torch.zeros(2, 5, dtype=torch.bool), min_width=1)
    assert rows.shape == (2, 1) and not valid.any()


# ---------------------------------------------------------------------------------------------------- state
def test_compact_removes_what_is_not_kept_and_what_is_no_valid_key():
    state = hand_state()
    out = state.compact(torch.ones(2, 7, dtype=torch.bool))  # sample 1's padding goes, though kept
    assert out.source_index.tolist() == [list(range(7)), [1, 2, 3, 4, 5, 6, -1]]
    keep = torch.tensor([[True, True, False, True, True, True, True], [True, True, True, False, True, False, False]])
    out = state.compact(keep)  # 6 and 3 kept: the batch is 6 wide
    assert out.hidden.shape == (2, 6, 1)
    assert out.hidden[..., 0].tolist()[0] == [0.0, 1.0, 3.0, 4.0, 5.0, 6.0]
    assert out.hidden[1, :3, 0].tolist() == [8.0, 9.0, 11.0] and out.position_ids[1, :3].tolist() == [0, 1, 3]
    assert out.visual_counts().tolist() == [2.0, 2.0] and out.last_real_index().tolist() == [5, 2]


def test_the_padding_slots_of_a_compacted_sample_are_nothing():
    """They hold gathered copies of removed tokens (a visual token, a question, an answer): none may show through."""
    state = hand_state()
    keep = torch.tensor([[True] * 7, [True, True, True, False, True, False, False]])
    out = state.compact(keep)
    assert out.source_index[1].tolist() == [1, 2, 4, -1, -1, -1, -1]
    assert out.key_valid[1].tolist() == [True] * 3 + [False] * 4
    assert out.visual_index[1].tolist() == [-1, 0, 2, -1, -1, -1, -1]
    assert not out.question_mask[1].any() and not out.answer_mask[1].any()
    assert torch.equal(out.question_mask[0], state.question_mask[0]) and out.answer_mask[0, 6]


def test_the_visual_mask_needs_a_valid_key_and_a_soft_weight_above_one_half():
    state = hand_state()
    state.key_valid[1, 3] = False  # v1 of sample 1 hidden
    assert state.visual_counts().tolist() == [3.0, 2.0]
    state.key_weight = torch.tensor([[1.0, 0.3, 0.5, 0.7, 1.0, 1.0, 1.0], [1.0] * 7])
    assert state.visual_mask[0].tolist() == [False, False, False, True, False, False, False]
    assert state.visual_counts().tolist() == [1.0, 2.0]


def test_the_last_real_index_skips_right_padding_and_with_hidden_copies():
    state = hand_state()
    state.key_valid[1, 5:] = False  # sample 1 right-padded after its v2
    assert state.last_real_index().tolist() == [6, 4]
    other = state.with_hidden(torch.zeros(2, 7, 1))
    assert state.hidden.sum() > 0 and other.hidden.sum() == 0 and other.source_index is state.source_index
