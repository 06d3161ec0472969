"""Training-free baselines: budgets, schedules and bad settings."""

import pytest
import torch
from conftest import make_batch, make_tiny_llava

from lvlm_prune.baselines import TRAINING_FREE_METHODS, RandomPruning, VisionZip, build_method, dart_selection
from lvlm_prune.engine import PrunedLlava
from lvlm_prune.engine.methods import ModelInfo

INFO_7B = ModelInfo(num_layers=32, num_visual_tokens=576, hidden_size=4096, vision_feature_layer=-2)


@pytest.mark.parametrize("name", ["random", "pool", "fastv", "visionzip", "dart"])
@pytest.mark.parametrize("ratio", [0.667, 0.778, 0.889])
def test_7b_schedules_reach_the_layer_averaged_budget(name, ratio):
    method = build_method(name, ratio)
    method.bind(INFO_7B)
    planned = method.planned_visual_tokens()
    assert len(planned) == 32
    realised = 1 - sum(planned) / (32 * 576)
    assert abs(realised - ratio) < 0.01, (name, realised)


@pytest.mark.parametrize("name", ["fastv", "dart"])
@pytest.mark.parametrize("ratio, keep", [(0.667, 166), (0.778, 98), (0.889, 30)])
def test_7b_single_stage_keeps_the_count_nearest_the_budget(name, ratio, keep):
    # one token is 0.0016 of the budget: the 0.01 tolerance above cannot tell 97 from 98
    method = build_method(name, ratio)
    method.bind(INFO_7B)
    assert method.keep == keep
    layer_average = [(2 * 576 + 30 * k) / (32 * 576) for k in (keep - 1, keep, keep + 1)]
    errors = [abs(kept - (1 - ratio)) for kept in layer_average]
    assert errors[1] < min(errors[0], errors[2])


@pytest.mark.parametrize("name", ["fastv", "dart"])
@pytest.mark.parametrize("layers, k_layer", [(4, 1), (12, 1), (24, 2), (28, 2), (32, 2), (40, 2), (56, 4), (60, 4)])
def test_the_default_pruning_layer_scales_k_2_of_32_to_the_nearest_layer(name, layers, k_layer):
    method = build_method(name, 0.3)
    method.bind(ModelInfo(num_layers=layers, num_visual_tokens=576, hidden_size=64, vision_feature_layer=-2))
    assert method.prune_layers == (k_layer - 1, k_layer)


@pytest.mark.parametrize("tokens, ratio, split", [(16, 0.5, (7, 1)), (64, 0.889, (6, 1)), (64, 0.969, (2, 0)),
                                                  (576, 0.889, (54, 10))])
def test_visionzip_splits_its_budget_54_to_10_rounded_to_the_nearest_token(tokens, ratio, split):
    method = VisionZip(ratio)
    method.bind(ModelInfo(num_layers=32, num_visual_tokens=tokens, hidden_size=64, vision_feature_layer=-2))
    assert (method.dominant, method.contextual) == split


@pytest.mark.parametrize("tokens, ratio, grid", [(64, 0.5, (4, 8)), (64, 0.667, (3, 7)), (64, 0.889, (1, 7)),
                                                 (576, 0.667, (12, 16)), (576, 0.778, (8, 16)), (576, 0.889, (8, 8))])
def test_pool_picks_the_grid_nearest_the_budget_then_the_squarest(tokens, ratio, grid):
    method = build_method("pool", ratio)
    method.bind(ModelInfo(num_layers=32, num_visual_tokens=tokens, hidden_size=64, vision_feature_layer=-2))
    assert (method.rows, method.cols) == grid


def test_dart_keeps_each_pivot_s_least_similar_tokens_in_turn():
    # tokens 0-4 visual, 5 text; image pivot 0, text pivot 5; budget 3: the pivot + one token per pivot
    visual = torch.tensor([[True] * 5 + [False]])
    image_pivots, text_pivots = torch.eye(6, dtype=torch.bool)[[0]], torch.eye(6, dtype=torch.bool)[[5]]
    similarity = torch.eye(6)
    for token, (to_image_pivot, to_text_pivot) in enumerate([(-0.9, 0.0), (0.9, -0.8), (0.0, 0.5), (0.5, 0.9)], 1):
        similarity[token, 0] = similarity[0, token] = to_image_pivot
        similarity[token, 5] = similarity[5, token] = to_text_pivot
    kept = dart_selection(similarity[None], visual, image_pivots, text_pivots, torch.tensor([3]))
    # pivot 0 takes token 1, pivot 5 token 2 (a near-copy of pivot 0, far from pivot 5); the lowest highest
    # similarity to any pivot would have kept token 3 instead
    assert kept[0].nonzero().flatten().tolist() == [0, 1, 2]
    four = dart_selection(similarity[None], visual, image_pivots, text_pivots, torch.tensor([4]))
    assert four[0].nonzero().flatten().tolist() == [0, 1, 2, 3]  # 1 + 2 x 1 per pivot, then the fill


def test_pdrop_solves_lambda_and_refuses_unreachable_budgets():
    method = build_method("pdrop", 0.5)
    method.bind(INFO_7B)
    assert method.prune_layers == (8, 16, 24)
    assert abs(1 - sum(method.planned_visual_tokens()) / (32 * 576) - 0.5) < 0.01
    with pytest.raises(ValueError, match="largest reachable ratio 0.749"):  # (8 x 576 + 24 x 1) / (32 x 576) kept
        build_method("pdrop", 0.889).bind(INFO_7B)


@pytest.mark.parametrize("ratio, reachable", [(0.967, True), (0.969, False)])
def test_pdrop_counts_the_one_token_every_later_stage_keeps(ratio, reachable):
    # stage ends 1/16/24 of 32: layer 0 sees all 576, layers 1-31 at least one each, so r <= 1 - 607 / 18432 = 0.96707
    method = build_method("pdrop", ratio, stage_ends=(1, 16, 24))
    if reachable:
        method.bind(INFO_7B)
        assert abs(1 - sum(method.planned_visual_tokens()) / (32 * 576) - ratio) < 0.001
    else:
        with pytest.raises(ValueError, match=r"pdrop: prune_ratio=0.969 cannot be reached .* 576 visual tokens "
                                             r"\(largest reachable ratio 0.967\)"):
            method.bind(INFO_7B)


@pytest.mark.parametrize("name", ["random", "pool", "visionzip"])
def test_a_pre_llm_budget_of_no_token_is_refused(name):
    info = ModelInfo(num_layers=4, num_visual_tokens=16, hidden_size=64, vision_feature_layer=-1)
    method = build_method(name, 0.97)  # 0.48 of 16 tokens: keeping one would realise r = 0.9375
    with pytest.raises(ValueError, match=rf"{name}: prune_ratio=0.97 keeps no visual token of 16 \(largest "
                                         r"reachable ratio 0.9375\)"):
        method.bind(info)
    build_method(name, 0.96).bind(info)  # 0.64 rounds to one token


def test_fastv_reports_the_reachable_limit():
    with pytest.raises(ValueError, match="fastv: prune_ratio=0.95 cannot be reached"):
        build_method("fastv", 0.95).bind(INFO_7B)


@pytest.mark.parametrize("name", sorted(set(TRAINING_FREE_METHODS) - {"full"}))
def test_every_method_runs_and_realises_its_plan(tiny_spec, name):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=3, left_pad=(0, 1, 2))
    engine = PrunedLlava(model)
    ratio = 0.5 if name != "pdrop" else 0.4
    method = build_method(name, ratio)
    with torch.no_grad():
        out = engine(ids, mask, pixels, method=method, logits="last")
        tokens, counts = engine.generate(ids, mask, pixels, method=method, max_new_tokens=3)
    planned = torch.tensor(method.planned_visual_tokens())
    assert torch.equal(out.visual_tokens_per_layer, planned.expand(3, -1))
    assert torch.equal(counts, out.visual_tokens_per_layer)
    assert torch.isfinite(out.logits).all() and tokens.shape == (3, 3)


def visionzip_reference(model, pixels, dominant, contextual, average_heads=True):
    """The authors' rule written out per sample on the stock vision tower: per sample, {target: merged vision
    feature} and {target: the tokens that joined it}, and the dominant tokens."""
    with torch.no_grad():
        tower = model.model.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
        layer = model.model.vision_tower.encoder.layers[0]  # vision_feature_layer -2 of 2: LLaVA reads layer 0
        keys = layer.self_attn.k_proj(layer.layer_norm1(tower.hidden_states[0]))[:, 1:]
    if average_heads:
        keys = keys.view(*keys.shape[:2], layer.self_attn.num_heads, -1).mean(2)
    cls_attention = tower.attentions[0][:, :, 0, 1:].mean(1)
    vision = tower.hidden_states[1][:, 1:]  # what the projector reads ('default' strategy: [CLS] dropped)
    merged, joined, dominants = [], [], []
    for b in range(pixels.shape[0]):
        top = sorted(cls_attention[b].topk(dominant).indices.tolist())
        rest = [i for i in range(vision.shape[1]) if i not in top]
        targets = rest[:: max(1, len(rest) // contextual)][:contextual]
        unit = torch.nn.functional.normalize(keys[b], dim=-1)
        groups = {t: [] for t in targets}
        for i in rest:
            if i not in targets:
                groups[targets[int(torch.stack([unit[i] @ unit[t] for t in targets]).argmax())]].append(i)
        merged.append({t: vision[b, t] + (vision[b, g].mean(0) if g else 0) for t, g in groups.items()})
        joined.append(groups)
        dominants.append(top)
    return merged, joined, dominants


@pytest.mark.parametrize("soft", [False, True])
def test_visionzip_hands_the_llm_the_authors_contextual_tokens(tiny_spec, soft):
    """Contextual token = projector(target + mean of the tokens that joined it), merged at the vision layer LLaVA
    reads with head-averaged keys; a target nobody joined reaches the LLM as the stock projection of itself."""
    model = make_tiny_llava(tiny_spec, attn_implementation="eager")
    ids, mask, pixels = make_batch(tiny_spec, batch_size=3, left_pad=(0, 1, 2))
    method = VisionZip(0.5, dominant_fraction=0.25)  # 8 kept: 2 dominant, 6 targets at step 14 // 6 = 2
    llm_input = []
    first_layer = model.model.language_model.layers[0]
    hook = first_layer.register_forward_pre_hook(lambda module, args: llm_input.append(args[0]))
    with torch.no_grad():
        out = PrunedLlava(model)(ids, mask, pixels, method=method, soft=soft)
        stock = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    hook.remove()
    assert (method.dominant, method.contextual) == (2, 6)
    merged, joined, dominants = visionzip_reference(model, pixels, 2, 6)
    assert joined != visionzip_reference(model, pixels, 2, 6, average_heads=False)[1]  # the heads' average matters
    empty = 0
    for b in range(3):
        present = out.state.visual_index[b] >= 0
        present &= out.state.key_weight[b] > 0.5 if soft else out.state.key_valid[b]
        at = {int(v): int(p) for p, v in zip(present.nonzero().flatten(), out.state.visual_index[b][present])}
        assert sorted(at) == sorted(dominants[b] + list(merged[b]))
        for token in dominants[b]:
            torch.testing.assert_close(llm_input[0][b, at[token]], stock[b][token])
        for target, vision in merged[b].items():
            expected = model.model.multi_modal_projector(vision[None])[0].detach()
            torch.testing.assert_close(llm_input[0][b, at[target]], expected, atol=1e-6, rtol=1e-5)
            if not joined[b][target]:
                empty += 1
                assert torch.equal(llm_input[0][b, at[target]], stock[b][target])
    assert empty and any(len(group) > 1 for groups in joined for group in groups.values())


def test_visionzip_soft_path_matches_physical_removal(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    engine = PrunedLlava(model)
    with torch.no_grad():
        hard = engine(ids, mask, pixels, method=VisionZip(0.5))
        soft = engine(ids, mask, pixels, method=VisionZip(0.5), soft=True)
    text = mask.bool() & (ids != model.config.image_token_id)
    torch.testing.assert_close(hard.logits[text], soft.logits[text], atol=1e-4, rtol=1e-4)


def test_random_draws_each_image_s_subset_whatever_its_batch(tiny_spec):
    engine = PrunedLlava(make_tiny_llava(tiny_spec))
    ids, mask, pixels = make_batch(tiny_spec, batch_size=3)
    kept = []

    class Recording(RandomPruning):
        def before_llm(self, ctx):
            kept.append(super().before_llm(ctx).clone())
            return kept[-1]

    with torch.no_grad():
        engine(ids, mask, pixels, method=Recording(0.5, seed=3))
        order = [2, 0]  # another batch: two of the images, in another order, a later call
        engine(ids[order], mask[order], pixels[order], method=Recording(0.5, seed=3))
        engine(ids, mask, pixels, method=Recording(0.5, seed=4))
    first, again, other_seed = kept
    assert torch.equal(again, first[order])
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])  # images differ, draws differ
    assert not torch.equal(other_seed, first)
    assert (first.sum(1) == 8).all()  # half of the 16 visual tokens


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown pruning method 'fastvv'"):
        build_method("fastvv", 0.5)
    with pytest.raises(ValueError, match=r"prune_ratio=1.0 must be in \[0, 1\)"):
        build_method("random", 1.0)
    with pytest.raises(ValueError, match="prune_ratio=-0.1"):
        build_method("fastv", -0.1)
    with pytest.raises(ValueError, match="layer=40"):
        build_method("fastv", 0.5, layer=40).bind(INFO_7B)


def test_frozen_base_module_passes_method_options_from_the_config(tiny_base_dir):
    from lightning_modules.frozen_base import FrozenBaseModule
    from lvlm_prune.modeling.loading import load_processor

    processor = load_processor(str(tiny_base_dir))
    default = FrozenBaseModule(str(tiny_base_dir), processor)
    assert default.make_method("pdrop", 0.6).prune_layers == (1, 2, 3)  # 4 layers: stage ends L/4, L/2, 3L/4
    late = FrozenBaseModule(str(tiny_base_dir), processor, method_options={"pdrop": {"stage_ends": [2, 3]}})
    assert late.make_method("pdrop", 0.4).prune_layers == (2, 3)
    with pytest.raises(ValueError, match="cannot be reached"):
        late.make_method("pdrop", 0.6)  # the first 2 of 4 layers keep every token: at most r = 0.5
    with pytest.raises(ValueError, match="method_options names unknown methods \\['pdorp'\\]"):
        FrozenBaseModule(str(tiny_base_dir), processor, method_options={"pdorp": {}})


def test_a_plugin_module_passes_method_options_to_the_baselines_of_its_sweep(tiny_base_dir):
    from lightning_modules.compensation import CompensationModule
    from lvlm_prune.modeling.loading import load_processor
    from lvlm_prune.rcp.compensation import RCPCompensation

    module = CompensationModule(str(tiny_base_dir), RCPCompensation(target_prune_ratio=0.5, pruning_layers=[1]),
                                load_processor(str(tiny_base_dir)), method_options={"pdrop": {"stage_ends": [2, 3]}})
    assert module.make_method("pdrop", 0.4).prune_layers == (2, 3)
    assert module.hparams.method_options == {"pdrop": {"stage_ends": [2, 3]}}


def test_visionzip_under_the_full_feature_strategy_keeps_the_cls_token_and_its_budget(tiny_spec):
    """'full': LLaVA feeds [CLS] + patches (N + 1 visual tokens); the [CLS] attention covers the N patches only."""
    from conftest import TINY_IMAGE_TOKEN

    model = make_tiny_llava(tiny_spec)
    model.config.vision_feature_select_strategy = "full"
    engine = PrunedLlava(model)
    n = tiny_spec.num_visual_tokens + 1
    assert engine.info.num_visual_tokens == n
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, n), TINY_IMAGE_TOKEN), torch.tensor([[5, 6, 7]])], 1)
    ids, mask = ids.repeat(2, 1), torch.ones(2, n + 4, dtype=torch.long)
    pixels = torch.randn(2, 3, tiny_spec.image_size, tiny_spec.image_size, generator=torch.Generator().manual_seed(0))
    method = VisionZip(0.75)
    with torch.no_grad():
        out = engine(ids, mask, pixels, method=method, logits="last")
    assert out.visual_tokens_per_layer[:, 0].tolist() == [float(method.keep)] * 2
    assert (out.state.visual_index == 0).any(1).all(), "the [CLS] token is dominant"


def test_the_engine_checks_the_layers_a_method_chooses_when_it_is_bound(tiny_spec):
    from lvlm_prune.engine.methods import PruningMethod

    engine = PrunedLlava(make_tiny_llava(tiny_spec))  # 4 decoder layers

    class DeepLayer(PruningMethod):
        name = "deep"

        def bind(self, info):
            super().bind(info)
            self.prune_layers = (info.num_layers + 3,)

    with pytest.raises(ValueError, match="deep: pruning layer 7 is outside the model's 4 decoder layers"):
        engine.bind(DeepLayer(0.5))
    # PyramidDrop's stages scale with depth: one bound to a 32-layer model is rebound to this one's, not refused
    pdrop = build_method("pdrop", 0.4)
    pdrop.bind(INFO_7B)
    assert engine.bind(pdrop).prune_layers == (1, 2, 3)


def test_random_pruning_runs_on_precomputed_visual_inputs(tiny_spec):
    # no pixels on this path: each image's features key its draw, so the same image keeps the same tokens
    engine = PrunedLlava(make_tiny_llava(tiny_spec))
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0,))
    pixels[1] = pixels[0]
    with torch.no_grad():
        visual = engine.visual_features(pixels)
        out = engine(ids, mask, None, visual_inputs=visual, method=RandomPruning(0.5), logits="last")
        again = engine(ids.flip(0), mask, None, visual_inputs=(visual[0].flip(0), visual[1]),
                       method=RandomPruning(0.5), logits="last")
    assert (out.visual_tokens_per_layer == 8).all()
    torch.testing.assert_close(out.logits, again.logits.flip(0))
