"""Unit checks of lvlm_prune.flops that the FlopCounterMode cross-checks in test_flops.py leave open: shapes read
from configs other than the tiny LLaVA's (SigLIP, explicit head_dim, odd image sizes, several feature layers),
argument validation, and the report's serialisation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaModel, LlavaConfig, SiglipVisionConfig
from transformers import SiglipVisionModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

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
    vision_flops,
    vision_layers_for_feature_layer,
)

SMALL_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def llama(**overrides) -> LlamaConfig:
    kwargs = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=10)
    return LlamaConfig(**{**kwargs, **overrides})


def llava(vision_feature_layer=-2, **overrides) -> LlavaConfig:
    vision = CLIPVisionConfig(**SMALL_VISION, image_size=32, patch_size=8)
    return LlavaConfig(text_config=llama(), vision_config=vision, vision_feature_layer=vision_feature_layer,
                       image_token_id=9, **overrides)


def with_strategy(strategy: str) -> SimpleNamespace:
    """A LlavaConfig-like object (LlavaConfig itself refuses such a strategy when it is set)."""
    config = llava()
    return SimpleNamespace(text_config=config.text_config, vision_config=config.vision_config,
                           vision_feature_layer=-2, vision_feature_select_strategy=strategy)


def test_an_explicit_head_dim_is_read_from_the_config_and_matches_the_counter():
    """A Llama whose head_dim is not hidden_size / heads (32 / 4 = 8, here 16): the q/k/v/o widths follow it."""
    config = llama(head_dim=16, num_hidden_layers=1)
    shape = LLMShape.from_config(config)
    assert (shape.head_dim, shape.num_heads, shape.num_kv_heads) == (16, 4, 2)
    measured = module_flops(LlamaModel(config).eval(), inputs_embeds=torch.randn(1, 10, 32))
    # by hand, n=10, d=32, m=48: q,o 2*2*10*32*64, k,v 2*2*10*32*32, attention 4*10*10*64, SwiGLU 6*10*32*48
    by_hand = 4 * 10 * 32 * 64 + 4 * 10 * 32 * 32 + 4 * 100 * 64 + 6 * 10 * 32 * 48
    assert measured == by_hand == llm_prefill_flops(shape, 10, [0], "exact")


def test_an_odd_image_size_and_one_channel_count_like_the_clip_tower():
    """30 px at patch 8: the convolution drops the 6-pixel remainder (3 x 3 patches); the channels come from the
    config. The analytic count equals FlopCounterMode on a stock CLIP tower."""
    config = CLIPVisionConfig(**SMALL_VISION, image_size=30, patch_size=8, num_channels=1)
    shape = VisionShape.from_config(config)
    assert (shape.num_patches, shape.num_tokens, shape.num_channels) == (9, 10, 1)
    tower = CLIPVisionModel(config).eval()
    assert module_flops(tower, torch.randn(1, 1, 30, 30)) == vision_flops(shape)
    # no encoder layer: the patch convolution alone, 2 * 9 patches * 16 * 1 channel * 8 * 8
    assert vision_flops(shape, layers_run=0) == 2 * 9 * 16 * 1 * 64


def test_siglip_has_no_cls_token_and_matches_the_counter():
    """SigLIP is inferred to have no [CLS]: the encoder runs on the 16 patches only."""
    config = SiglipVisionConfig(**SMALL_VISION, image_size=32, patch_size=8, vision_use_head=False)
    shape = VisionShape.from_config(config)
    assert (shape.has_cls_token, shape.num_tokens) == (False, 16)
    assert module_flops(SiglipVisionModel(config).eval(), torch.randn(1, 3, 32, 32)) == vision_flops(shape)
    assert VisionShape.from_config(config, has_cls_token=True).num_tokens == 17  # an explicit flag wins


def test_a_vision_config_of_unknown_type_needs_the_cls_flag():
    config = SimpleNamespace(model_type="dinov2", patch_size=8, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, image_size=32)
    with pytest.raises(ValueError, match="has_cls_token"):
        VisionShape.from_config(config)
    assert VisionShape.from_config(config, has_cls_token=False).num_tokens == 16


def test_a_patch_as_large_as_the_image_is_one_patch():
    shape = VisionShape(16, 32, 1, 2, image_size=8, patch_size=8)
    assert (shape.num_patches, shape.num_tokens) == (1, 2)


def test_several_feature_layers_widen_the_projector_input():
    """vision_feature_layer=[-2, -1] concatenates two 16-wide layers: linear_1 reads 32 features."""
    config = llava(vision_feature_layer=[-2, -1])
    shape = ProjectorShape.from_config(config)
    assert (shape.in_dim, shape.hidden_dim, shape.out_dim) == (32, 32, 32)
    measured = module_flops(LlavaMultiModalProjector(config), torch.randn(1, 9, 32))
    assert measured == projector_flops(shape.in_dim, shape.out_dim, 9, hidden_dim=shape.hidden_dim)


def test_projector_flops_with_a_hidden_width_of_its_own():
    # 3 tokens: 2 * 3 * (10 * 7 + 7 * 20) for linear_1 10 -> 7 and linear_2 7 -> 20
    assert projector_flops(10, 20, 3, hidden_dim=7) == 2 * 3 * (10 * 7 + 7 * 20) == 1260


def test_sdpa_with_a_narrower_value_counts_its_own_width():
    """q @ k^T over the key width 8, attention @ v over the value width 6 (torch 2.13 on CPU takes the math path
    for unequal widths; a fused kernel that took them would have to be charged the same)."""

    class Attention(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 6)
    assert module_flops(Attention(), q, k, v) == 2 * 2 * 5 * 7 * 8 + 2 * 2 * 5 * 7 * 6


def test_feature_layer_minus_states_is_the_patch_embeddings():
    """24 layers give 25 hidden states: -25 is index 0 (no encoder layer runs); -26 and 25 are out of range."""
    assert vision_layers_for_feature_layer(-25, 24) == 0
    assert vision_layers_for_feature_layer(24, 24) == 24


def test_the_report_defaults_to_one_lm_head_position():
    """include_lm_head without lm_head_tokens charges the last prompt position only: 2 * d * V exact."""
    config = llava()
    base = llava_prefill_report(config, 5, [16, 4], "exact")
    with_head = llava_prefill_report(config, 5, [16, 4], "exact", include_lm_head=True)
    assert with_head.llm_prefill - base.llm_prefill == 2 * 32 * 10


def test_to_metrics_and_to_dict_carry_each_component():
    report = FlopsReport(100, vision=20, projector=3, plugins={"pruner": 4.0, "adapter": 0.5}, convention="exact")
    assert report.to_metrics() == {"llm_prefill": 100.0, "vision": 20.0, "projector": 3.0, "plugin/pruner": 4.0,
                                   "plugin/adapter": 0.5, "total": 127.5}
    assert report.to_dict() == {"convention": "exact", "llm_prefill": 100.0, "vision": 20.0, "projector": 3.0,
                                "plugins": {"pruner": 4.0, "adapter": 0.5}, "total": 127.5}
    assert all(type(v) is float for v in report.to_metrics().values())


@pytest.mark.parametrize("call, argument", [
    (lambda: LLMShape(True, 48, 2, 4, 2, 8, 10), "hidden_size"),
    (lambda: vision_flops(VisionShape(16, 32, 1, 2, 32, 8), num_images=True), "num_images"),
    (lambda: vision_layers_for_feature_layer(True, 24), "vision_feature_layer"),
    (lambda: llm_layer_flops(LLMShape(32, 48, 2, 4, 2, 8, 10), 5, "exact", causal="none"), "causal"),
    (lambda: llm_prefill_flops(LLMShape(32, 48, 2, 4, 2, 8, 10), 5, [3, math.nan], "exact"),
     r"visual_tokens_per_layer\[1\]"),
    (lambda: llm_prefill_flops(LLMShape(32, 48, 2, 4, 2, 8, 10), 5, [math.inf, 3], "exact"),
     r"visual_tokens_per_layer\[0\]"),
    (lambda: layer_average_visual_tokens([4, -1]), r"visual_tokens_per_layer\[1\]"),
    (lambda: layer_average_visual_tokens([math.nan]), r"visual_tokens_per_layer\[0\]"),
    (lambda: FlopsReport(1.0, vision=-1.0), "vision"),
    (lambda: FlopsReport(math.nan), "llm_prefill"),
    (lambda: FlopsReport(1.0, projector=math.inf), "projector"),
    (lambda: VisionShape.from_config(llama()), "vision_config"),
    (lambda: llava_prefill_report(with_strategy("cls_patch"), 5, [4, 4]), "vision_feature_select_strategy"),
    (lambda: llava_prefill_report(SimpleNamespace(text_config=llama(), vision_config=llava().vision_config), 5,
                                  [4, 4]), "vision_feature_layer"),
])
def test_bad_input_is_refused_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
