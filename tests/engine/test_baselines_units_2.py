"""Training-free baselines: schedule defaults, bad settings and selection edge cases on tiny hand-made inputs."""

import pytest
import torch

from lvlm_prune.baselines import DART, PyramidDrop, VisionZip, build_method, dart_selection, merge_contextual_tokens
from lvlm_prune.engine.methods import ModelInfo

from test_baseline_rules import layer_context, pre_llm_context, token_state  # noqa: I001 (on the path, as conftest)


def info(layers, visual):
    return ModelInfo(num_layers=layers, num_visual_tokens=visual, hidden_size=4, vision_feature_layer=-2)


def test_pdrop_default_stage_ends_round_a_quarter_of_the_depth_half_to_even():
    method = PyramidDrop(0.3)
    method.bind(info(layers=6, visual=8))
    assert method.prune_layers == (2, 3, 4)  # round(1.5), round(3), round(4.5)


@pytest.mark.parametrize("ends", [(1, 1, 2), (1, 2, 4), (0, 1, 2), (2, 1, 3)])
def test_pdrop_refuses_stage_ends_that_repeat_leave_the_model_or_go_back(ends):
    with pytest.raises(ValueError, match="must be increasing layers in"):
        PyramidDrop(0.3, stage_ends=ends).bind(info(layers=4, visual=8))


def test_visionzip_with_an_all_dominant_split_keeps_the_top_cls_attention_patches_unmerged():
    method = VisionZip(0.5, dominant_fraction=1.0)
    method.bind(info(layers=4, visual=8))
    assert (method.dominant, method.contextual) == (4, 0)
    # [CLS] attention logit of a patch = its first coordinate (see clip_read_layer)
    firsts = [0.5, 3, -1, 2, 0, 4, 1, 2.5]
    vision_input = torch.tensor([[[1.0, 0, 0, 0]] + [[f, 1, 0, 0] for f in firsts]])
    features = torch.arange(16.0).reshape(1, 8, 2)
    ctx = pre_llm_context(features.clone(), vision_input=vision_input)
    keep = method.before_llm(ctx)
    assert keep[0].nonzero().flatten().tolist() == [1, 3, 5, 7]
    assert torch.equal(ctx.visual_features, features)
    with pytest.raises(ValueError, match="dominant_fraction=1.5"):
        VisionZip(0.5, dominant_fraction=1.5)


def contextual_case():
    """8 tokens, token 2 dominant (not remaining): 7 remaining, 2 targets at step 7 // 2 = 3 of their order (tokens
    0 and 4). Target keys: token 0 short along e1, token 4 long along e2, so a raw dot product would send every
    token to token 4; by cosine token 1 alone joins token 4 and tokens 3, 5, 6, 7 join token 0."""
    remaining = torch.tensor([[True, True, False, True, True, True, True, True]])
    keys = torch.tensor([[[0.1, 0], [0.1, 1], [9, 9], [1, 0.3], [0, 10], [1, 0.2], [1, 0.1], [1, 0.4]]])
    features = torch.tensor([[[1.0], [2], [4], [8], [16], [32], [64], [128]]])
    return features, keys, remaining


def test_visionzip_contextual_targets_are_strided_from_the_first_remaining_token_and_joined_by_cosine():
    features, keys, remaining = contextual_case()
    targets, merged, joined = merge_contextual_tokens(features, keys, remaining, 2)
    assert targets.tolist() == [[0, 4]]
    assert joined.tolist() == [[True, True]]
    # token 0 + mean(8, 32, 64, 128); token 4 + token 1 alone (one member: its mean is itself)
    torch.testing.assert_close(merged, torch.tensor([[[1 + 58.0], [16 + 2.0]]]))


def test_visionzip_a_target_nobody_joins_is_reported_and_stays_itself():
    features, keys, remaining = contextual_case()
    keys[0, 1] = torch.tensor([1.0, 0.1])  # token 1 now joins token 0 too
    targets, merged, joined = merge_contextual_tokens(features, keys, remaining, 2)
    assert joined.tolist() == [[True, False]]
    torch.testing.assert_close(merged[0, 1], torch.tensor([16.0]))


def test_dart_default_pivots_are_four_image_and_four_text_per_576_tokens_capped_by_the_budget():
    method = DART(0.5)
    method.bind(info(layers=32, visual=576))
    assert method.pivots == 4 and method._text_pivots(576) == 4
    assert method._budget(1152)[1] == 8 and method._text_pivots(1152) == 8
    capped = DART(0.1875, layer=1, num_pivots=10)
    capped.bind(info(layers=4, visual=8))
    assert (capped.keep, capped.pivots) == (6, 6)
    assert DART(0.5, num_text_pivots=0)._text_pivots(576) == 0  # no text pivot when asked for none


def test_dart_a_sample_with_fewer_pivots_takes_only_its_own_share_and_its_budget():
    # tokens 0-4 visual, 5 text; sample 0: image pivot 0 and text pivot 5; sample 1: image pivot 0 only
    visual = torch.tensor([[True] * 5 + [False]] * 2)
    image_pivots = torch.eye(6, dtype=torch.bool)[[0, 0]]
    text_pivots = torch.tensor([[False] * 5 + [True], [False] * 6])
    similarity = torch.eye(6)
    for token, (to_image_pivot, to_text_pivot) in enumerate([(-0.9, 0.0), (0.9, -0.8), (0.0, 0.5), (0.5, 0.9)], 1):
        similarity[token, 0] = similarity[0, token] = to_image_pivot
        similarity[token, 5] = similarity[5, token] = to_text_pivot
    kept = dart_selection(similarity.expand(2, 6, 6), visual, image_pivots, text_pivots, torch.tensor([3, 3]))
    # sample 1: (3 - 1) // 1 = 2 tokens for pivot 0, its two least similar (1 and 3), nothing for a missing pivot
    assert [row.nonzero().flatten().tolist() for row in kept] == [[0, 1, 2], [0, 1, 3]]


def test_method_full_refuses_any_pruning():
    with pytest.raises(ValueError, match="method 'full' keeps every token; prune_ratio=0.5 must be 0"):
        build_method("full", 0.5)
    assert build_method("full", 0.0).prune_ratio == 0.0


def test_fastv_refuses_a_budget_under_half_a_token_after_its_layer_and_rounds_one_above_it():
    # 4 layers, 8 tokens, K = 1: keep = ((1 - r) 32 - 8) / 3
    with pytest.raises(ValueError, match=r"fastv: prune_ratio=0.72 cannot be reached .* \(largest reachable ratio "
                                         r"0.656\)"):
        build_method("fastv", 0.72, layer=1).bind(info(layers=4, visual=8))  # 0.31 of a token
    method = build_method("fastv", 0.69, layer=1)  # 0.69 of a token rounds to one
    method.bind(info(layers=4, visual=8))
    assert method.keep == 1


@pytest.mark.parametrize("name", ["fastv", "dart"])
@pytest.mark.parametrize("layer", [0, 4])
def test_single_stage_methods_refuse_a_layer_with_no_layer_before_or_after_it(name, layer):
    with pytest.raises(ValueError, match=rf"{name}: layer={layer} must be in \[1, 3\]"):
        build_method(name, 0.3, layer=layer).bind(info(layers=4, visual=8))


class Replace(torch.nn.Module):
    """A final norm that gives fixed states, whatever the decoder's states before it."""

    def __init__(self, states):
        super().__init__()
        self.states = states

    def forward(self, x):
        return self.states.expand_as(x)


def test_dart_compares_hidden_states_after_the_language_model_s_final_norm():
    method = DART(0.1875, layer=1, num_pivots=2, num_text_pivots=1)
    method.bind(info(layers=4, visual=8))
    e1, e2, e3, e4 = torch.eye(4)
    normed = torch.stack([e1 + e2, -e2, e4, e1, e1 + e4, -e1, e2 + e4, e2, -e3, e3, -e3, e1 + e2])  # t, v0-v7, q, a
    before_norm = torch.randn(1, 12, 4, generator=torch.Generator().manual_seed(0))
    state = token_state(["tvvvvvvvvqqa"], before_norm)
    key_norms = torch.tensor([10.0, 1, 1, 4, 1, 1, 1, 3.5, 1, 4, 2, 2])  # pivots v2, v6, q0
    keys = key_norms[None, None, :, None] / 2 * torch.ones(1, 1, 1, 2)
    num_visual = torch.tensor([8])
    assert method.at_layer(layer_context(0, state, num_visual, keys=keys)) is None
    ctx = layer_context(1, state, num_visual)
    ctx.final_norm = Replace(normed[None])
    keep = method.at_layer(ctx)
    kept = sorted(state.visual_index[0][keep[0] & state.visual_mask[0]].tolist())
    assert kept == [0, 1, 2, 4, 6, 7]  # the selection of test_baseline_rules on the normed states
