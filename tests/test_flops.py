import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers.masking_utils import create_causal_mask

from conftest import make_batch, make_tiny_llava
from lvlm_prune.flops import (
    FlopsReport,
    LLMShape,
    ProjectorShape,
    VisionShape,
    layer_average_visual_tokens,
    llava_prefill_report,
    llm_layer_flops,
    llm_prefill_flops,
    module_flops,
    projector_flops,
    prune_ratio_realised,
    register_cpu_sdpa_flop_formulas,
    vision_flops,
    vision_layers_for_feature_layer,
)
from lvlm_prune.modeling.compat import cache_argument

LLAVA15_7B_TEXT = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32,
)
LLAVA15_7B_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14,
)


def llava15_7b_config():
    return LlavaConfig(
        text_config=LlamaConfig(**LLAVA15_7B_TEXT), vision_config=CLIPVisionConfig(**LLAVA15_7B_VISION),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_id=32000,
    )


def counted(model_call):
    register_cpu_sdpa_flop_formulas()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model_call()
    return counter


def assert_close(measured, analytic, rel=0.01):
    assert measured > 0
    assert abs(measured - analytic) <= rel * measured, (measured, analytic)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_stock_llava_forward_matches_analytic_counts(tiny_spec, attn_implementation):
    model = make_tiny_llava(tiny_spec, attn_implementation=attn_implementation)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=1, left_pad=(0,))
    counter = counted(lambda: model(input_ids=ids, attention_mask=mask, pixel_values=pixels))
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}

    config = model.config
    length = ids.shape[1]
    visual = tiny_spec.num_visual_tokens
    llm_shape = LLMShape.from_config(config.text_config)
    vision_shape = VisionShape.from_config(config.vision_config)
    llm = llm_prefill_flops(llm_shape, length - visual, [visual] * llm_shape.num_layers, "exact")
    assert_close(per_module["LlavaForConditionalGeneration.model.language_model"], llm)
    # A stock forward runs every vision layer, also the one after the layer LLaVA reads.
    assert_close(per_module["LlavaForConditionalGeneration.model.vision_tower"], vision_flops(vision_shape))
    projector = ProjectorShape.from_config(config)
    assert_close(
        per_module["LlavaForConditionalGeneration.model.multi_modal_projector"],
        projector_flops(projector.in_dim, projector.out_dim, visual),
    )
    # The stock forward computes logits at every position.
    report = llava_prefill_report(
        config, length - visual, [visual] * llm_shape.num_layers, "exact",
        include_lm_head=True, lm_head_tokens=length, run_all_vision_layers=True,
    )
    assert_close(counter.get_total_flops(), report.total)


def test_sdpa_attention_is_counted_after_registration(tiny_spec):
    eager = make_tiny_llava(tiny_spec, attn_implementation="eager")
    sdpa = make_tiny_llava(tiny_spec, attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    embeds = torch.randn(1, 20, tiny_spec.hidden_size)
    register_cpu_sdpa_flop_formulas()
    register_cpu_sdpa_flop_formulas()  # idempotent
    eager_flops = counted(lambda: eager.model.language_model(inputs_embeds=embeds)).get_total_flops()
    sdpa_flops = counted(lambda: sdpa.model.language_model(inputs_embeds=embeds)).get_total_flops()
    assert eager_flops == sdpa_flops
    shape = LLMShape.from_config(eager.config.text_config)
    with_attention = llm_prefill_flops(shape, 20, [0] * shape.num_layers, "exact")
    attention = shape.num_layers * 4 * 20 * 20 * shape.num_heads * shape.head_dim
    # Attention is well above the 1 % tolerance, so an uncounted SDPA would fail the check.
    assert attention > 0.05 * with_attention
    assert_close(sdpa_flops, with_attention)


def test_vision_layers_up_to_the_read_one(tiny_spec):
    model = make_tiny_llava(tiny_spec, attn_implementation="eager")
    _, _, pixels = make_batch(tiny_spec, batch_size=1)
    tower = model.model.vision_tower
    layers_run = vision_layers_for_feature_layer(model.config.vision_feature_layer, tiny_spec.vision_layers)
    assert layers_run == tiny_spec.vision_layers - 1

    def run_needed_layers():
        hidden = tower.pre_layrnorm(tower.embeddings(pixels))
        for layer in tower.encoder.layers[:layers_run]:
            hidden = layer(hidden, None)
        return hidden

    with torch.no_grad():
        stock = tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        assert torch.allclose(run_needed_layers(), stock, atol=1e-6)
    measured = counted(run_needed_layers).get_total_flops()
    shape = VisionShape.from_config(model.config.vision_config)
    assert_close(measured, vision_flops(shape, layers_run=layers_run))
    report = llava_prefill_report(model.config, 7, [16] * tiny_spec.num_layers)
    assert report.vision == vision_flops(shape, layers_run=layers_run)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_tokens_dropped_mid_forward_match_schedule(tiny_spec, attn_implementation):
    model = make_tiny_llava(tiny_spec, attn_implementation=attn_implementation)
    lm = model.model.language_model
    text, visual, kept_visual, drop_after = 7, tiny_spec.num_visual_tokens, 5, 2
    length = text + visual
    hidden = torch.randn(1, length, tiny_spec.hidden_size)
    # [bos, visual..., question...]: keep bos, the first kept_visual visual tokens, all text.
    keep_idx = torch.cat([torch.arange(1 + kept_visual), torch.arange(1 + visual, length)])[None]

    def pruned_forward():
        h = hidden
        pos = torch.arange(length)[None]
        att = torch.ones(1, length, dtype=torch.long)
        mask = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=att,
                                  position_ids=pos, **cache_argument(None))
        pe = lm.rotary_emb(h, position_ids=pos)
        for index, layer in enumerate(lm.layers):
            if index == drop_after:
                h = torch.gather(h, 1, keep_idx[..., None].expand(-1, -1, h.shape[-1]))
                pos = torch.gather(pos, 1, keep_idx)
                att = torch.gather(att, 1, keep_idx)
                mask = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=att,
                                          position_ids=pos, **cache_argument(None))
                pe = lm.rotary_emb(h, position_ids=pos)
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        return h

    measured = counted(pruned_forward).get_total_flops()
    shape = LLMShape.from_config(model.config.text_config)
    schedule = [visual] * drop_after + [kept_visual] * (shape.num_layers - drop_after)
    assert_close(measured, llm_prefill_flops(shape, text, schedule, "exact"))
    unpruned = llm_prefill_flops(shape, text, [visual] * shape.num_layers, "exact")
    assert measured < 0.9 * unpruned


def test_llava15_7b_fastv_convention_numbers():
    shape = LLMShape.from_config(llava15_7b_config().text_config)
    assert (shape.head_dim, shape.num_kv_heads) == (128, 32)
    unpruned = llm_prefill_flops(shape, 64, [576] * 32, "fastv")
    pruned = llm_prefill_flops(shape, 64, [64] * 32, "fastv")
    assert 3.2e12 <= unpruned <= 3.4e12
    assert 0.6e12 <= pruned <= 0.7e12

    def fastv_formula(n, d=4096, m=11008, layers=32):  # FastV's per-layer 4nd^2 + 2n^2d + 2ndm, by hand
        return layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)

    assert unpruned == pytest.approx(3.3286e12, rel=1e-3) and unpruned == pytest.approx(fastv_formula(640), rel=1e-9)
    assert pruned == pytest.approx(0.64854e12, rel=1e-3) and pruned == pytest.approx(fastv_formula(128), rel=1e-9)
    assert prune_ratio_realised([64] * 32, 576) == pytest.approx(1 - 64 / 576)


def test_exact_is_twice_fastv_plus_the_gate_projection_for_multi_head_attention():
    shape = LLMShape.from_config(llava15_7b_config().text_config)
    schedule = [576] * 2 + [100] * 30
    fastv = llm_prefill_flops(shape, 64, schedule, "fastv")
    exact = llm_prefill_flops(shape, 64, schedule, "exact")
    gate = sum(2 * (64 + v) * shape.hidden_size * shape.intermediate_size for v in schedule)
    assert exact == pytest.approx(2 * fastv + gate, rel=1e-12)


def test_grouped_query_attention_shrinks_only_the_kv_projections():
    mha = LLMShape(4096, 11008, 32, 32, 32, 128, 32000)
    gqa = LLMShape(4096, 11008, 32, 32, 8, 128, 32000)
    n = 300
    saved = llm_layer_flops(mha, n, "exact") - llm_layer_flops(gqa, n, "exact")
    assert saved == pytest.approx(2 * 2 * n * 4096 * (32 - 8) * 128)
    assert llm_layer_flops(mha, n, "fastv") == llm_layer_flops(gqa, n, "fastv")


def test_causal_half_counts_the_lower_triangle():
    shape = LLMShape(64, 128, 3, 4, 2, 16, 100)
    n = 50
    full = llm_prefill_flops(shape, 10, [40] * 3, "exact", causal="full")
    half = llm_prefill_flops(shape, 10, [40] * 3, "exact", causal="half")
    assert full - half == pytest.approx(3 * 4 * (n * n - n * (n + 1) / 2) * 4 * 16)


def test_lm_head_tokens_and_fractional_schedules():
    shape = LLMShape(64, 128, 4, 4, 4, 16, 1000)
    base = llm_prefill_flops(shape, 8, [10.5] * 4, "exact")
    with_head = llm_prefill_flops(shape, 8, [10.5] * 4, "exact", include_lm_head=True)
    assert with_head - base == pytest.approx(2 * 64 * 1000)
    every_position = llm_prefill_flops(shape, 8, [10.5] * 4, "exact", include_lm_head=True,
                                       lm_head_tokens=18.5)
    assert every_position - base == pytest.approx(2 * 18.5 * 64 * 1000)
    fastv_head = llm_prefill_flops(shape, 8, [10.5] * 4, "fastv", include_lm_head=True)
    assert fastv_head - llm_prefill_flops(shape, 8, [10.5] * 4, "fastv") == pytest.approx(64 * 1000)
    lower = llm_prefill_flops(shape, 8, [10] * 4, "exact")
    upper = llm_prefill_flops(shape, 8, [11] * 4, "exact")
    assert lower < base < upper


def test_layer_average_and_realised_ratio():
    schedule = [576, 576] + [96] * 30
    assert layer_average_visual_tokens(schedule) == pytest.approx((2 * 576 + 30 * 96) / 32)
    assert prune_ratio_realised(schedule, 576) == pytest.approx(1 - (2 * 576 + 30 * 96) / 32 / 576)
    assert prune_ratio_realised(torch.tensor([576.0] * 4), 576) == 0.0


def test_vision_feature_layer_index_semantics():
    assert vision_layers_for_feature_layer(-2, 24) == 23
    assert vision_layers_for_feature_layer(-1, 24) == 24
    assert vision_layers_for_feature_layer(0, 24) == 0
    assert vision_layers_for_feature_layer([-2, 12], 24) == 23
    with pytest.raises(ValueError, match="vision_feature_layer"):
        vision_layers_for_feature_layer(25, 24)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        vision_layers_for_feature_layer(-26, 24)


def test_module_flops_counts_linear_and_sdpa():
    assert module_flops(nn.Linear(16, 8), torch.randn(3, 16)) == 2 * 3 * 16 * 8

    class Attention(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8)
    assert module_flops(Attention(), q, k, v) == 2 * (2 * 2 * 4 * 10 * 12 * 8)
    with pytest.raises(ValueError, match=r"^module must be a torch\.nn\.Module, got function$"):
        module_flops(lambda x: x, torch.randn(2))


def test_cpu_sdpa_backward_is_counted():
    register_cpu_sdpa_flop_formulas()
    q, k, v = (torch.randn(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    forward = 2 * 2 * 2 * 6 * 6 * 4
    assert counter.get_total_flops() == forward + 5 * forward // 2


def test_report_total_and_serialisation(tiny_spec):
    model_config = make_tiny_llava(tiny_spec).config
    report = llava_prefill_report(model_config, 7, [16, 16, 4, 4], "exact", plugins={"pruner": 1000.0})
    assert report.total == pytest.approx(report.llm_prefill + report.vision + report.projector + 1000.0)
    as_dict = report.to_dict()
    assert as_dict["convention"] == "exact" and as_dict["plugins"] == {"pruner": 1000.0}
    assert as_dict["total"] == report.total
    assert report.tflops()["plugin/pruner"] == pytest.approx(1e-9)
    assert report.total_tflops == pytest.approx(report.total / 1e12)
    assert report.projector == projector_flops(tiny_spec.vision_hidden_size, tiny_spec.hidden_size, 16)


def test_llava15_7b_report_components():
    report = llava_prefill_report(llava15_7b_config(), 64, [576] * 32, "fastv")
    shape = VisionShape.from_config(llava15_7b_config().vision_config)
    assert (shape.num_patches, shape.num_tokens) == (576, 577)
    assert report.vision == vision_flops(shape, layers_run=23)
    assert report.projector == 2 * 576 * (1024 * 4096 + 4096 * 4096)
    assert 3.2e12 <= report.llm_prefill <= 3.4e12


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda s: llm_prefill_flops(s, 8, [10] * 3, "fastv"), "visual_tokens_per_layer"),
        (lambda s: llm_prefill_flops(s, 8, [10, -1, 10, 10], "fastv"), "visual_tokens_per_layer"),
        (lambda s: llm_prefill_flops(s, -1, [10] * 4, "fastv"), "text_tokens"),
        (lambda s: llm_prefill_flops(s, 8, [10] * 4, "macs"), "convention"),
        (lambda s: llm_prefill_flops(s, 8, [10] * 4, "exact", causal="none"), "causal"),
        (lambda s: llm_prefill_flops(s, 8, [10] * 4, "fastv", causal="half"), "causal"),
        (lambda s: llm_prefill_flops(s, 8, [10] * 4, "exact", include_lm_head=True,
                                     lm_head_tokens=-2), "lm_head_tokens"),
        (lambda s: llm_layer_flops(s, math.nan), "tokens"),
        (lambda s: prune_ratio_realised([10] * 4, 0), "num_visual_tokens"),
        (lambda s: layer_average_visual_tokens([]), "visual_tokens_per_layer"),
        (lambda s: FlopsReport(1.0, convention="macs"), "convention"),
        (lambda s: FlopsReport(1.0, plugins={"pruner": -5.0}), "pruner"),
        (lambda s: LLMShape(64, 128, 4, 6, 4, 16, 100), "num_kv_heads"),
        (lambda s: LLMShape(64, 0, 4, 4, 4, 16, 100), "intermediate_size"),
        (lambda s: vision_flops(VisionShape(32, 64, 2, 2, 32, 8), layers_run=3), "layers_run"),
        (lambda s: projector_flops(32, 64, -1.0), "tokens"),
        (lambda s: LLMShape.from_config(llava15_7b_config()), "text_config"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    shape = LLMShape(64, 128, 4, 4, 4, 16, 100)
    with pytest.raises(ValueError, match=argument):
        call(shape)


def test_the_sweeps_counts_charge_every_vision_layer_the_engine_runs(tiny_spec):
    from lvlm_prune.runner import GenerationResult, per_sample_flops

    model = make_tiny_llava(tiny_spec)  # vision_feature_layer=-2: the stock tower still runs its last layer
    assert model.config.vision_feature_layer == -2
    visual = tiny_spec.num_visual_tokens
    result = GenerationResult(torch.zeros(1, 2, dtype=torch.long), torch.full((1, tiny_spec.num_layers), float(visual)),
                              torch.tensor([6.0]), {}, None)
    (counted_report,) = per_sample_flops(model.config, result, "exact")
    every_layer = llava_prefill_report(model.config, 6.0, [visual] * tiny_spec.num_layers, "exact",
                                       run_all_vision_layers=True)
    up_to_the_read_one = llava_prefill_report(model.config, 6.0, [visual] * tiny_spec.num_layers, "exact")
    assert counted_report["vision"] == every_layer.vision > up_to_the_read_one.vision


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("num_images", [1, 3])
def test_projector_counts_follow_the_feature_strategy_and_the_images(tiny_spec, strategy, num_images):
    # "full" also projects [CLS]; a sample with several images (LLaVA-NeXT's crops) projects each image's features
    model = make_tiny_llava(tiny_spec, attn_implementation="eager")
    model.config.vision_feature_select_strategy = strategy
    _, _, pixels = make_batch(tiny_spec, batch_size=num_images)
    counter = counted(lambda: model.model.get_image_features(pixel_values=pixels))
    measured = sum(counter.get_flop_counts()["LlavaMultiModalProjector"].values())
    report = llava_prefill_report(model.config, 7, [16] * tiny_spec.num_layers, num_images=num_images)
    assert_close(measured, report.projector, rel=1e-9)
    single = llava_prefill_report(model.config, 7, [16] * tiny_spec.num_layers)
    assert report.projector == num_images * single.projector
