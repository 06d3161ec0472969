"""Training-free baselines: budgets, schedules and bad settings."""

import pytest
import torch
from conftest import make_batch, make_tiny_llava

from lvlm_prune.baselines import TRAINING_FREE_METHODS, build_method
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


def test_pdrop_solves_lambda_and_refuses_unreachable_budgets():
    method = build_method("pdrop", 0.5)
    method.bind(INFO_7B)
    assert method.prune_layers == (8, 16, 24)
    assert abs(1 - sum(method.planned_visual_tokens()) / (32 * 576) - 0.5) < 0.01
    with pytest.raises(ValueError, match="largest reachable ratio 0.750"):
        build_method("pdrop", 0.889).bind(INFO_7B)


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


def test_visionzip_keeps_high_cls_attention_tokens_and_merges_the_rest(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2)
    method = build_method("visionzip", 0.5)
    engine = PrunedLlava(model)
    with torch.no_grad():
        engine(ids, mask, pixels, method=method)
    assert method.dominant + method.contextual == 8


def test_random_is_seeded():
    a, b = build_method("random", 0.5, seed=3), build_method("random", 0.5, seed=3)
    for m in (a, b):
        m.bind(INFO_7B)
    assert torch.equal(torch.rand(4, generator=a.generator), torch.rand(4, generator=b.generator))


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
