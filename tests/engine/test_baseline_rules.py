"""Each training-free baseline's selection rule, on hand-computed cases.

The methods are called through the hooks the engine calls (`before_llm`, `at_layer`) with contexts whose scoring
inputs are set by hand: a layer's attention map and keys, the vision layer's [CLS] and keys, the visual features.
"""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from lvlm_prune.baselines import DART, FastV, PoolPruning, PyramidDrop, RandomPruning, VisionZip
from lvlm_prune.engine import LayerContext, ModelInfo, PreLLMContext, SequenceState


def token_state(layouts: list[str], hidden: torch.Tensor | None = None) -> SequenceState:
    """One sample per string, one token per letter: 'p' padding, 't' text before the image, 'v' visual,
    'q' question, 'a' the last prompt token, 'r' an answer token of a teacher-forced pass (a generation position
    too, like 'a')."""
    codes = [list(layout) for layout in layouts]
    is_ = lambda letter: torch.tensor([[c == letter for c in row] for row in codes])  # noqa: E731
    real, visual = ~is_("p"), is_("v")
    b, t = real.shape
    return SequenceState(
        hidden=hidden if hidden is not None else torch.zeros(b, t, 4),
        position_ids=(real.long().cumsum(1) - 1).clamp(min=0),
        key_valid=real,
        visual_index=torch.where(visual, visual.long().cumsum(1) - 1, -1),
        question_mask=is_("q"),
        answer_mask=is_("a") | is_("r"),
        source_index=torch.arange(t).expand(b, t).clone(),
    )


@dataclass
class GivenLayer(LayerContext):
    """A decoder layer's context whose attention map (B, heads, T, T) and keys (B, kv_heads, T, head_dim) are given."""

    given_attention: torch.Tensor | None = None
    given_keys: torch.Tensor | None = None

    def attention_probs(self, query_index):
        b, heads, t, _ = self.given_attention.shape
        return self.given_attention.gather(2, query_index[:, None, :, None].expand(b, heads, -1, t))

    def keys(self):
        return self.given_keys


def layer_context(layer_idx, state, num_visual, attention=None, keys=None):
    return GivenLayer(layer_idx, layer=None, state=state, position_embeddings=None, attention_bias=None, soft=False,
                      num_visual=num_visual, final_norm=nn.Identity(), given_attention=attention, given_keys=keys)


def attention_to_visual(state: SequenceState, last_row) -> torch.Tensor:
    """(B, heads, T, T): the last prompt token attends to visual token i with last_row[b][h][i]; every other query
    ranks the visual tokens the other way round, so a rule reading any other row picks other tokens."""
    weights = torch.tensor(last_row)
    b, heads, _ = weights.shape
    t = state.hidden.shape[1]
    index = state.visual_index.clamp(min=0)[:, None].expand(b, heads, t)
    present = state.visual_mask[:, None]
    to_key = torch.where(present, weights.gather(2, index), 0.0)
    reversed_ = torch.where(present, (weights.amax(-1, keepdim=True) - weights).gather(2, index), 0.0)
    attention = reversed_[:, :, None].expand(b, heads, t, t).clone()
    attention[torch.arange(b), :, state.answer_mask.float().argmax(1)] = to_key
    return attention


def reverse_ranking(last_row):
    weights = torch.tensor(last_row)
    return (weights.amax(-1, keepdim=True) - weights).tolist()


def kept_visual(keep: torch.Tensor, state: SequenceState) -> list[list[int]]:
    """The original visual indices each sample keeps."""
    return [sorted(state.visual_index[b][keep[b] & state.visual_mask[b]].tolist()) for b in range(keep.shape[0])]


def info(layers, visual):
    return ModelInfo(num_layers=layers, num_visual_tokens=visual, hidden_size=4, vision_feature_layer=-2)


def test_fastv_keeps_the_tokens_the_last_prompt_token_attends_to_most_at_layer_k_minus_1():
    method = FastV(0.5, layer=1)
    method.bind(info(layers=4, visual=6))
    assert method.prune_layers == (0, 1) and method.keep == 2  # (0.5 * 6 * 4 - 6) / 3
    state = token_state(["tvvvvvvqqa", "ptvvvvvvqa"])
    num_visual = torch.tensor([6, 6])
    last_row = [
        # head-averaged: .15 .16 .025 .125 .20 .04 -> 4, 1 (head 0 alone: 1, 3; head 1 alone: 4, 0)
        [[.05, .30, .02, .20, .10, .03], [.25, .02, .03, .05, .30, .05]],
        # head-averaged: .15 .035 .20 .025 .025 .275 -> 5, 2
        [[.10, .05, .30, .02, .04, .25], [.20, .02, .10, .03, .01, .30]],
    ]
    assert method.at_layer(layer_context(0, state, num_visual, attention_to_visual(state, last_row))) is None
    # layer K's own attention ranks the other way: the scores must be the ones seen at layer K - 1
    keep = method.at_layer(layer_context(1, state, num_visual, attention_to_visual(state, reverse_ranking(last_row))))
    assert kept_visual(keep, state) == [[1, 4], [2, 5]]
    assert keep[~state.visual_mask].all()  # text and padding are not FastV's to drop


def test_pdrop_keeps_the_most_attended_remaining_tokens_at_each_stage_end():
    method = PyramidDrop(0.53125)
    method.bind(info(layers=4, visual=8))
    # one layer per stage: (1 + l + l^2 + l^3) / 4 = 1 - r gives lambda = 1/2
    assert method.prune_layers == (1, 2, 3) and method.counts == [4, 2, 1]
    state = token_state(["tvvvvvvvvqa"])
    num_visual = torch.tensor([8])
    # head-averaged: .025 .15 .015 .135 .175 .02 .15 .05 -> 1, 3, 4, 6
    stage_0 = [[[.02, .20, .01, .15, .05, .03, .25, .04], [.03, .10, .02, .12, .30, .01, .05, .06]]]
    keep = method.at_layer(layer_context(1, state, num_visual, attention_to_visual(state, stage_0)))
    assert kept_visual(keep, state) == [[1, 3, 4, 6]]
    assert keep[~state.visual_mask].all()

    state = state.compact(keep)
    # layer 2's attention over 1, 3, 4, 6: .20 .10 .075 .225 -> 1, 6 (layer 1's would keep 4 and 1 or 6)
    stage_1 = [[[0, .30, 0, .05, .10, 0, .20, 0], [0, .10, 0, .15, .05, 0, .25, 0]]]
    keep = method.at_layer(layer_context(2, state, num_visual, attention_to_visual(state, stage_1)))
    assert kept_visual(keep, state) == [[1, 6]]

    state = state.compact(keep)
    # layer 3's attention over 1, 6: .225 .15 -> 1 (layer 2 preferred 6)
    stage_2 = [[[0, .30, 0, 0, 0, 0, .10, 0], [0, .15, 0, 0, 0, 0, .20, 0]]]
    keep = method.at_layer(layer_context(3, state, num_visual, attention_to_visual(state, stage_2)))
    assert kept_visual(keep, state) == [[1]]


def test_dart_pivots_have_the_largest_l1_key_norm_and_each_keeps_its_least_similar_tokens():
    method = DART(0.1875, layer=1, num_pivots=2, num_text_pivots=1)
    method.bind(info(layers=4, visual=8))
    assert method.prune_layers == (0, 1) and (method.keep, method.pivots) == (6, 2)  # (26 - 8) / 3 kept
    e1, e2, e3, e4 = torch.eye(4)
    hidden = torch.stack([
        e1 + e2,  # t
        -e2, e4, e1, e1 + e4, -e1, e2 + e4, e2, -e3,  # v0-v7
        e3, -e3, e1 + e2,  # q0, q1, a
    ])[None]
    state = token_state(["tvvvvvvvvqqa"], hidden)
    keys = torch.tensor([  # per token: [head 0, head 1] (kv_heads x head_dim)
        [[5, 5], [5, 5]],  # t: the largest, but no pivot candidate
        [[.5, 0], [0, .5]],
        [[0, .2], [.1, 0]],  # v1: L1 .3, the smallest
        [[1, 1], [1, 1]],  # v2: L1 4 (L2 2)
        [[.2, .2], [0, 0]],  # v3: L1 .4, the next smallest (and not kept)
        [[0, 0], [.5, .5]],
        [[3, 0], [0, 0]],  # v5: L1 3 (the largest L2, 3; the largest in head 0 alone)
        [[1, -1], [1, -.5]],  # v6: L1 3.5 (L2 1.8, signed sum .5)
        [[-.5, 0], [0, .5]],
        [[-2, -2], [0, 0]],  # q0: L1 4 (signed sum -4)
        [[1, 1], [0, 0]],  # q1: L1 2
        [[.5, .5], [.5, .5]],  # a: L1 2
    ]).permute(1, 0, 2)[None]
    num_visual = torch.tensor([8])
    assert method.at_layer(layer_context(0, state, num_visual, keys=keys)) is None
    keep = method.at_layer(layer_context(1, state, num_visual))
    # pivots v2 (e1), v6 (e2), q0 (e3), 4 // 3 = 1 token each in turn: v4 (-e1), v0 (-e2), v7 (-e3); the one
    # left of the budget: v1, the least similar to its most similar pivot (v3 and v5 are at 45 degrees to one)
    assert kept_visual(keep, state) == [[0, 1, 2, 4, 6, 7]]
    assert keep[~state.visual_mask].all()


def test_dart_can_take_the_last_prompt_token_as_text_pivot_but_never_an_answer_token():
    """The authors take query tokens from everything after the image in the prompt, ':' of 'ASSISTANT:' included."""
    method = DART(0.1875, layer=1, num_pivots=2, num_text_pivots=1)
    method.bind(info(layers=4, visual=8))
    e1, e2, e3, e4 = torch.eye(4)
    tokens = [
        e1 + e2,  # t
        -e2, e4, e1, e1 + e4, -e1, e2 + 2 * e4, e2, -e3,  # v0-v7
        e3, -e3, e4,  # q0, q1, a
    ]
    # sample 0 teacher-forced (two answer tokens after 'a'), sample 1 a left-padded prompt as in generation
    state = token_state(["tvvvvvvvvqqarr", "pptvvvvvvvvqqa"], torch.stack([
        torch.stack(tokens + [e1, e2]), torch.stack([e1, e1] + tokens)]))
    key_norms = {"t": 10.0, "v2": 4.0, "v6": 3.5, "q0": 4.0, "q1": 2.0, "a": 5.0, "r": 9.0}  # L1 over heads
    names = ["t"] + [f"v{i}" for i in range(8)] + ["q0", "q1", "a"]
    rows = [[key_norms.get(name, 1.0) for name in names + ["r", "r"]],
            [0.0, 0.0] + [key_norms.get(name, 1.0) for name in names]]
    keys = torch.tensor(rows)[:, None, :, None] / 2 * torch.ones(1, 1, 1, 2)  # one kv head, head_dim 2
    num_visual = torch.tensor([8, 8])
    assert method.at_layer(layer_context(0, state, num_visual, keys=keys)) is None
    keep = method.at_layer(layer_context(1, state, num_visual))
    # pivots v2 (e1), v6 (e2), a (e4), one token each: v4 (-e1), v0 (-e2), v7 (-e3, orthogonal to e4); the one left:
    # v3, whose most similar pivot is the least similar (.71; v1 is e4 itself, v5 .89 to it). With q0 (e3) as
    # pivot instead, v7 would go to q0 and v1 fill the budget: [0, 1, 2, 4, 6, 7]
    assert kept_visual(keep, state) == [[0, 2, 3, 4, 6, 7]] * 2


def test_candidate_query_tokens_are_the_prompt_after_the_image_and_a_cut_answer_falls_back_to_the_last_token():
    state = token_state(["tvvqqarrp", "tvvqqqqqq", "pptvvqqqa"])
    state.answer_mask[1] = False  # teacher-forced with every label ignored: no generation position at all
    ctx = layer_context(0, state, torch.tensor([2, 2, 2]))
    assert ctx.last_prompt_index().tolist() == [5, 8, 8]
    assert [row.nonzero().flatten().tolist() for row in ctx.prompt_after_image()] == [[3, 4, 5], [3, 4, 5, 6, 7, 8],
                                                                                        [5, 6, 7, 8]]


def clip_read_layer(width: int) -> CLIPEncoderLayer:
    """A CLIP layer whose [CLS] attention logits and keys are its input's own dot products (no norm, identity q, k)."""
    layer = CLIPEncoderLayer(CLIPVisionConfig(hidden_size=width, intermediate_size=width, num_attention_heads=1))
    layer.layer_norm1 = nn.Identity()
    with torch.no_grad():
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight.copy_(torch.eye(width))
            proj.bias.zero_()
    return layer.eval()


class Squared(nn.Module):
    """A projector for which merging before it and after it differ."""

    def forward(self, x):
        return x * x


def pre_llm_context(features, pixels=None, vision_input=None, vision_output=None):
    """`vision_input`, `vision_output`: (B, 1 + N, C) input and output of the vision layer LLaVA reads; the
    projector squares, and `features` should be the projection of `vision_output`'s patches."""
    b, n, _ = features.shape
    state = token_state(["t" + "v" * n + "qa"] * b)
    model, hidden_states = None, ()
    if vision_input is not None:  # LLaVA reads layer 0 of 2 (vision_feature_layer -2): its input is hidden_states[0]
        layers = [clip_read_layer(vision_input.shape[-1]), None]
        tower = SimpleNamespace(encoder=SimpleNamespace(layers=layers))
        config = SimpleNamespace(vision_feature_layer=-2, vision_feature_select_strategy="default")
        llava = SimpleNamespace(vision_tower=tower, multi_modal_projector=Squared())
        model = SimpleNamespace(model=llava, config=config)
        output = vision_output if vision_output is not None else torch.zeros_like(vision_input)
        hidden_states = (vision_input, output, torch.zeros_like(vision_input))
    pixels = pixels if pixels is not None else torch.zeros(b, 3, 2, 2)
    return PreLLMContext(model, pixels, features, torch.zeros(b, state.hidden.shape[1], 2), state, hidden_states)


def test_visionzip_keeps_the_top_cls_attention_patches_and_merges_the_rest_into_strided_targets():
    method = VisionZip(0.5, dominant_fraction=0.5)
    method.bind(info(layers=4, visual=8))
    assert (method.dominant, method.contextual) == (2, 2)
    cls = [1.0, 0, 0, 0]  # [CLS] attention logit of a patch = its first coordinate
    vision_input = torch.tensor([  # the read layer's input: [CLS] attention and keys
        [cls,
         [0, 1, 0, 0],  # v0: first target (A), the first of the 6 remaining tokens
         [0, .2, 1, 0],  # -> B
         [4, 0, 0, 0],  # dominant
         [0, 1, .2, 0],  # -> A
         [0, 0, 1, 0],  # v4: second target (B), 6 // 2 = 3 remaining tokens after v0
         [3, 0, 0, 0],  # dominant
         [-2, 5, .5, 0],  # -> A; the largest key norm, the lowest [CLS] attention
         [0, .1, 1, 0]],  # -> B
        [cls,
         [2.5, 0, 0, 0],  # dominant
         [0, 0, 1, .1],  # v1: first target (C)
         [0, .3, 1, 0],  # -> C
         [0, 0, 1, 0],  # -> C
         [0, 0, 0, 1],  # v4: second target (D), which no token joins
         [0, .1, 1, 0],  # -> C
         [3.5, 0, 0, 0],  # dominant
         [0, 1, 1, 0]],  # -> C (.70, orthogonal to D)
    ])
    k = torch.arange(9.0)
    vision_output = torch.stack([torch.stack([k + 10 * b, (k - 4) ** 2 / 4, 1 - k], -1) for b in range(2)])
    features = Squared()(vision_output[:, 1:])  # what the engine hands the method: the projected patches
    ctx = pre_llm_context(features.clone(), vision_input=vision_input, vision_output=vision_output)
    keep = method.before_llm(ctx)
    assert [row.nonzero().flatten().tolist() for row in keep] == [[0, 2, 4, 5], [0, 1, 4, 6]]
    merged = ctx.visual_features
    patch = vision_output[:, 1:]
    # target + mean of the tokens that joined it, at the vision layer, then projected
    contextual = lambda b, target, joined: Squared()(patch[b, target] + patch[b, joined].mean(0))  # noqa: E731
    torch.testing.assert_close(merged[0, 0], contextual(0, 0, [3, 6]))
    torch.testing.assert_close(merged[0, 4], contextual(0, 4, [1, 7]))
    torch.testing.assert_close(merged[1, 1], contextual(1, 1, [2, 3, 5, 7]))
    assert torch.equal(merged[1, 4], features[1, 4])  # nobody joined D: it stays itself
    assert torch.equal(merged[0, [2, 5]], features[0, [2, 5]])  # dominant tokens keep their features
    assert torch.equal(merged[1, [0, 6]], features[1, [0, 6]])


# features[b, k] = (k + 100 b, k^2) on a 4 x 4 grid
POOLED = {
    # 2 x 2 cells of 2 x 2 tokens, each at the token right-below its cell centre
    0.75: ([5, 7, 13, 15], [[2.5, 10.5], [4.5, 24.5], [10.5, 114.5], [12.5, 160.5]]),
    # 2 x 4 cells of 2 x 1 tokens (rows 2i, 2i + 1 of column j), each at row 2i + 1
    0.5: ([4, 5, 6, 7, 12, 13, 14, 15],
          [[2, 8], [3, 13], [4, 20], [5, 29], [10, 104], [11, 125], [12, 148], [13, 173]]),
}


@pytest.mark.parametrize("ratio", sorted(POOLED))
def test_pool_puts_each_cell_s_mean_at_the_token_nearest_its_centre(ratio):
    method = PoolPruning(ratio)
    method.bind(info(layers=4, visual=16))
    k = torch.arange(16.0)
    features = torch.stack([torch.stack([k + 100 * b, k**2], -1) for b in range(2)])
    ctx = pre_llm_context(features.clone())
    keep = method.before_llm(ctx)
    slots, means = POOLED[ratio]
    assert [row.nonzero().flatten().tolist() for row in keep] == [slots, slots]
    expected = torch.tensor(means, dtype=torch.float)
    torch.testing.assert_close(ctx.visual_features[0, slots], expected)
    torch.testing.assert_close(ctx.visual_features[1, slots], expected + torch.tensor([100.0, 0]))


def test_random_keeps_a_subset_of_each_image_s_own_tokens_drawn_from_its_pixels_and_the_seed():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(24, 3, 2, 2, generator=g)
    pixels[1] = pixels[0]
    features = torch.randn(24, 10, 2, generator=g)
    ctx = pre_llm_context(features, pixels)
    ctx.state.visual_index[2, 7:] = -1  # image 2 gives 6 visual tokens (rows 6-9 are padding), as on LLaVA-NeXT
    ctx.visual_features[2, 6:] = 0
    keep = RandomPruning(0.5, seed=0).before_llm(ctx)
    assert keep.dtype == torch.bool
    assert keep.sum(1).tolist() == [5, 5, 3] + [5] * 21  # round(0.5 * N_i) of each image's own N_i
    assert not keep[2, 6:].any()
    assert torch.equal(keep[0], keep[1])  # the same pixels, the same subset
    assert len({tuple(row.tolist()) for row in keep[3:]}) >= 15  # other pixels, other subsets (C(10, 5) = 252)
    assert keep[3:].any(0).all()  # not a fixed part of the grid
    assert torch.equal(RandomPruning(0.5, seed=0).before_llm(ctx), keep)
    other_seed = RandomPruning(0.5, seed=1).before_llm(ctx)
    assert (other_seed != keep).any(1).sum() >= 20
