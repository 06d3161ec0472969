import dataclasses

import pytest
import torch

from conftest import make_batch, make_tiny_llava
from lvlm_prune.accm import (
    cls_attention_from_vision_tower,
    prumerge_plus_select,
    text_relevance_scores,
)
from lvlm_prune.accm.compensation import PruMergePlusPruning
from lvlm_prune.engine import PreLLMContext, PrunedLlava


def _check_rows(indices, keep, num_tokens):
    assert indices.shape[1] == keep and indices.dtype == torch.long
    for row in indices:
        assert len(set(row.tolist())) == keep
        assert torch.equal(row, row.sort().values)
        assert 0 <= row.min() and row.max() < num_tokens


def test_prumerge_selection_keeps_outliers_text_patches_and_fills_evenly():
    torch.manual_seed(0)
    attention = torch.rand(2, 64) * 0.01
    attention[0, [5, 40, 41]] = 1.0
    attention[1, [0, 63]] = 0.5
    relevance = torch.zeros(2, 64)
    relevance[0, [20, 21]] = 1.0
    relevance[1, [33]] = 1.0
    kept = prumerge_plus_select(attention, relevance, keep=10, grid_side=8, text_fraction=0.2)
    _check_rows(kept, 10, 64)
    assert {5, 40, 41, 20, 21} <= set(kept[0].tolist())
    assert {0, 63, 33} <= set(kept[1].tolist())
    # Without text guidance the rest is spread over the grid, not bunched.
    plain = prumerge_plus_select(attention, None, keep=16)
    _check_rows(plain, 16, 64)
    fill = sorted(set(plain[0].tolist()) - {5, 40, 41})
    assert max(b - a for a, b in zip(fill, fill[1:])) <= 8


def test_prumerge_caps_outliers_at_keep_and_covers_edge_budgets():
    attention = torch.zeros(1, 32)
    attention[0, [1, 3, 5, 7, 9]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    kept = prumerge_plus_select(attention, None, keep=3)
    assert kept[0].tolist() == [1, 3, 5]
    _check_rows(prumerge_plus_select(torch.rand(3, 16), torch.rand(3, 16), keep=16), 16, 16)
    _check_rows(prumerge_plus_select(torch.rand(3, 16), None, keep=1), 1, 16)
    with pytest.raises(ValueError, match=r"^keep must be in \[1, 32\], got 33$"):
        prumerge_plus_select(attention, None, keep=33)
    with pytest.raises(ValueError, match=r"^keep must be in \[1, 32\], got 0$"):
        prumerge_plus_select(attention, None, keep=0)
    with pytest.raises(ValueError, match=r"^grid_side=5 does not match N=32 visual tokens$"):
        prumerge_plus_select(attention, None, keep=4, grid_side=5)


def test_outliers_lie_above_q3_plus_the_iqr_factor_times_the_iqr_and_the_fill_stride_is_centred():
    # quartiles of the 8 values: Q1 = 0, Q3 = 1.25; 1.5 x IQR puts the threshold at 3.125, 0.5 x IQR at 1.875
    attention = torch.tensor([[0.0, 1, 0, 2, 0, 1, 4, 0]])
    # one outlier (index 6); two more spread over the other 7 at centred strides (slots 1 and 5 of them)
    assert prumerge_plus_select(attention, None, keep=3)[0].tolist() == [1, 5, 6]
    # two outliers (6, then 3); one more at the middle of the other 6, [0, 1, 2, 4, 5, 7]
    assert prumerge_plus_select(attention, None, keep=3, iqr_factor=0.5)[0].tolist() == [3, 4, 6]
    assert prumerge_plus_select(torch.zeros(1, 16), None, keep=4)[0].tolist() == [2, 6, 10, 14]


def test_the_question_keeps_its_share_when_the_outliers_alone_would_fill_the_budget():
    # ACCM's budgets are smaller than the outlier count (2-7 kept of 64 with 8-16 outliers on the tiny base): capped
    # at K alone the outliers took every slot and the text relevance never counted
    attention = torch.zeros(1, 64)
    attention[0, :12] = torch.linspace(2.0, 1.0, 12)  # twelve outliers, 0 the strongest
    relevance = torch.zeros(1, 64)
    relevance[0, [50, 60, 3, 40, 41]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])  # 3 is an outlier too
    assert prumerge_plus_select(attention, relevance, keep=2)[0].tolist() == [0, 50]  # round(2/3 * 2) = 1 each
    assert prumerge_plus_select(attention, relevance, keep=3)[0].tolist() == [0, 50, 60]  # 1 outlier + 2
    assert prumerge_plus_select(attention, relevance, keep=7)[0].tolist() == [0, 1, 3, 40, 41, 50, 60]  # 2 + 5
    assert prumerge_plus_select(attention, None, keep=7)[0].tolist() == list(range(7))  # no question: outliers


def test_text_relevance_prefers_tokens_aligned_with_the_question():
    visual = torch.zeros(1, 4, 3)
    visual[0, :, 0] = 1.0
    visual[0, 2] = torch.tensor([0.0, 1.0, 0.0])
    text = torch.tensor([[[0.0, 2.0, 0.0], [9.0, 9.0, 9.0]]])
    relevance = text_relevance_scores(visual, text, torch.tensor([[1, 0]]))
    assert relevance.argmax(1).item() == 2
    torch.testing.assert_close(relevance, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("layer_index", [0, -2, -1])
def test_cls_attention_matches_eager_output_attentions(tiny_spec, layer_index):
    model = make_tiny_llava(tiny_spec, attn_implementation="eager")
    tower = model.model.vision_tower
    _, _, pixels = make_batch(tiny_spec)
    with torch.no_grad():
        attentions = tower(pixels, output_attentions=True).attentions
    expected = attentions[layer_index][:, :, 0, 1:].mean(1)
    got = cls_attention_from_vision_tower(tower, pixels, layer_index)
    assert got.shape == (2, tiny_spec.num_visual_tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    sdpa_tower = make_tiny_llava(tiny_spec).model.vision_tower
    torch.testing.assert_close(cls_attention_from_vision_tower(sdpa_tower, pixels, layer_index), expected,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer_index"):
        cls_attention_from_vision_tower(tower, pixels, tiny_spec.vision_layers)


def _pre_llm_context(spec):
    """A random tiny LLaVA of `spec`, its engine and the PreLLMContext ACCM's selection builds (vision tower run once,
    the prompt's embeddings), with the vision tower's hidden states."""
    model = make_tiny_llava(spec)
    engine = PrunedLlava(model)
    ids, mask, pixels = make_batch(spec)
    with torch.no_grad():
        features, vision_hidden = engine.visual_features(pixels)
        embeds = engine.language_model.embed_tokens(ids)
    state = engine.initial_state(ids, mask, None, None, embeds)
    return model, engine, PreLLMContext(model, pixels, features, embeds, state, vision_hidden)


def _single_head_cls_attention(layer, layer_input):
    """By hand: LLaVA-PruMerge's / ACCM's [CLS] attention, q = q_proj(LN1(x)), k = k_proj(LN1(x)) over all C
    channels, softmax(q_cls . k / sqrt(C)) over CLS + patches, the patch columns."""
    x = torch.nn.functional.layer_norm(layer_input, layer_input.shape[-1:], layer.layer_norm1.weight,
                                       layer.layer_norm1.bias, layer.layer_norm1.eps)
    q_proj, k_proj = layer.self_attn.q_proj, layer.self_attn.k_proj
    query = x[:, 0] @ q_proj.weight.T + q_proj.bias  # (B, C)
    keys = x @ k_proj.weight.T + k_proj.bias  # (B, 1 + N, C)
    logits = torch.einsum("bc,btc->bt", query, keys) / keys.shape[-1] ** 0.5
    return logits.softmax(-1)[:, 1:]


@pytest.mark.parametrize("vision_layers, read, scored", [(3, -2, 2), (2, -1, 1)])
def test_prumerge_cls_attention_is_the_single_head_attention_of_the_layer_after_the_read_one(
        tiny_spec, vision_layers, read, scored):
    # 3 layers reading -2 (LLaVA-1.5's layout): the authors hook q/k of the layer after the read one (layers[23] of
    # 24), whose input is the read features. Reading the last layer, there is none after it: the read layer is used.
    spec = dataclasses.replace(tiny_spec, vision_layers=vision_layers, vision_heads=4, vision_feature_layer=read)
    model, engine, ctx = _pre_llm_context(spec)
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower(ctx.pixel_values, output_hidden_states=True).hidden_states
        expected = _single_head_cls_attention(tower.encoder.layers[scored], hidden[scored])
        after = ctx.vision_layer_after_read()
        if read == -1:
            assert after is None
        else:
            assert after[0] is tower.encoder.layers[scored]
            torch.testing.assert_close(after[1], hidden[scored])
            torch.testing.assert_close(ctx.projector_input(), hidden[scored][:, 1:])  # its input is what LLaVA reads
        got = PruMergePlusPruning.cls_attention(ctx)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        # and the selection ranks the visual tokens by it
        method = engine.bind(PruMergePlusPruning(0.75))
        keep = method.before_llm(ctx)
    relevance = text_relevance_scores(ctx.visual_features, ctx.text_embeds, ctx.state.question_mask)
    index = prumerge_plus_select(expected, relevance, method.keep, grid_side=4)
    assert [row.nonzero().flatten().tolist() for row in keep] == index.tolist()
