"""LLaVA-NeXT through the engine: per-sample visual-token counts, stock parity, per-sample budgets, refusals.

Inputs come from the real `LlavaNextProcessor` (PIL anyres image processor, the repo's word-level tokenizer;
nothing is downloaded), so the number of image tokens per sample is the processor's own expansion. The tiny
config has 16 px CLIP crops of 2 x 2 patches and grid pinpoints 16x32, 32x16 and 32x32: a 20 x 40 image gives
14 visual tokens (base crop 4 + a 2 x 4 grid + 2 newlines), a 30 x 28 image 24 (4 + 4 x 4 + 4 newlines).
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextProcessor)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from lvlm_prune.accm.compensation import PruMergePlusPruning
from lvlm_prune.baselines import FastV, build_method
from lvlm_prune.engine import PrunedLlava
from lvlm_prune.modeling.loading import load_base_model, load_processor
from lvlm_prune.modeling.tokenizer import build_word_tokenizer
from test_engine_parity import KeepFixed  # tests/engine is on sys.path (pytest's rootdir-relative imports)

PINPOINTS = [[16, 32], [32, 16], [32, 32]]
IMAGE_SIZES = [(20, 40), (30, 28)]  # (height, width)
COUNTS = [14, 24]
PROMPTS = ["USER : <image> what is this ? ASSISTANT :",
           "USER : <image> is the red cube left of the blue ball ? ASSISTANT :"]


def make_processor() -> LlavaNextProcessor:
    tokenizer = build_word_tokenizer("what is this the red cube left of blue ball ?".split())
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                 image_grid_pinpoints=PINPOINTS)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1)


def make_model(processor: LlavaNextProcessor, attn_implementation: str = "sdpa") -> LlavaNextForConditionalGeneration:
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16, initializer_range=16**-0.5)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, initializer_range=32**-0.5)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration._from_config(config, attn_implementation=attn_implementation).eval()


def make_inputs(processor: LlavaNextProcessor) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
    return dict(processor(images=images, text=PROMPTS, padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module")
def model(processor):
    return make_model(processor)


@pytest.fixture(scope="module")
def inputs(processor):
    return make_inputs(processor)


def engine_args(inputs):
    return inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]


def test_processor_and_engine_agree_on_per_sample_counts(model, inputs):
    engine = PrunedLlava(model)
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == COUNTS
    assert engine.info.model_type == "llava_next" and engine.info.varying_visual_tokens
    assert engine.info.num_visual_tokens == 24  # the most one image can give: 4 + 4 x (4 + 1)
    features, hidden = engine.visual_features(inputs["pixel_values"], inputs["image_sizes"])
    assert features.shape == (2, max(COUNTS), 32) and hidden == ()
    assert (features[0, COUNTS[0]:] == 0).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_tokens_reproduce_stock_logits(processor, inputs, attn):
    model = make_model(processor, attn)
    ids, mask, pixels = engine_args(inputs)
    assert not mask.bool().all()  # the batch is padded
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, pixel_values=pixels,
                      image_sizes=inputs["image_sizes"]).logits
        out = PrunedLlava(model)(ids, mask, pixels, position_ids, image_sizes=inputs["image_sizes"])
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], stock[real], atol=1e-5, rtol=1e-5)
    assert out.visual_tokens_per_layer.tolist() == [[float(n)] * 4 for n in COUNTS]


def test_full_tokens_generation_equals_a_no_cache_stock_loop(model, inputs):
    ids, mask, pixels = engine_args(inputs)
    sizes = inputs["image_sizes"]
    with torch.no_grad():
        ours, counts = PrunedLlava(model).generate(ids, mask, pixels, method=build_method("full", 0.0),
                                                   max_new_tokens=5, image_sizes=sizes)
        loop_ids, loop_mask, expected = ids, mask, []
        for _ in range(5):
            position_ids = (loop_mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=loop_ids, attention_mask=loop_mask, position_ids=position_ids,
                           pixel_values=pixels, image_sizes=sizes, use_cache=False).logits[:, -1]
            expected.append(logits.argmax(-1))
            loop_ids = torch.cat([loop_ids, expected[-1][:, None]], 1)
            loop_mask = torch.cat([loop_mask, torch.ones_like(loop_mask[:, :1])], 1)
    assert torch.equal(ours, torch.stack(expected, 1))
    assert counts.tolist() == [[float(n)] * 4 for n in COUNTS]


@pytest.mark.parametrize("name", ["random", "fastv", "pdrop", "dart"])
def test_budgets_are_per_sample(model, inputs, name):
    engine = PrunedLlava(model)
    ratio = 0.5 if name != "pdrop" else 0.4
    method = build_method(name, ratio)
    with torch.no_grad():
        out = engine(*engine_args(inputs), method=method, logits="last", image_sizes=inputs["image_sizes"])
        tokens, counts = engine.generate(*engine_args(inputs), method=method, max_new_tokens=3,
                                         image_sizes=inputs["image_sizes"])
    # each sample's schedule is the plan of the same method on a model whose images give that sample's count
    for b, n in enumerate(COUNTS):
        alone = build_method(name, ratio)
        alone.bind(replace(engine.info, num_visual_tokens=n))
        assert out.visual_tokens_per_layer[b].tolist() == alone.planned_visual_tokens(), (name, n)
    assert torch.equal(counts, out.visual_tokens_per_layer)
    assert torch.isfinite(out.logits).all() and tokens.shape == (2, 3)


@pytest.mark.parametrize("name", ["random", "fastv"])
def test_half_the_tokens_go_per_sample(model, inputs, name):
    """r = 0.5: random removes round(0.5 N_i) before the LLM; FastV's layer average is (1 - r) N_i up to rounding."""
    with torch.no_grad():
        out = PrunedLlava(model)(*engine_args(inputs), method=build_method(name, 0.5), logits="last",
                                 image_sizes=inputs["image_sizes"])
    counts = out.visual_tokens_per_layer
    for b, n in enumerate(COUNTS):
        if name == "random":
            assert counts[b].tolist() == [float(n - round(0.5 * n))] * 4
        else:
            assert counts[b, 0] == n and abs(counts[b].mean().item() - 0.5 * n) <= 0.5


@pytest.mark.parametrize("layer", [None, 0, 2])
def test_physical_removal_matches_soft_mask(model, inputs, layer):
    ids, mask, pixels = engine_args(inputs)
    method = KeepFixed(layer, drop_per_sample=[[0, 3, 5, 13], [1, 2, 9, 17, 20, 23]])
    engine = PrunedLlava(model)
    with torch.no_grad():
        hard = engine(ids, mask, pixels, method=method, image_sizes=inputs["image_sizes"])
        soft = engine(ids, mask, pixels, method=method, soft=True, image_sizes=inputs["image_sizes"])
    text = mask.bool() & (ids != model.config.image_token_id)
    torch.testing.assert_close(hard.logits[text], soft.logits[text], atol=1e-4, rtol=1e-4)
    first = 0 if layer is None else layer
    expected = torch.tensor([COUNTS[0] - 4, COUNTS[1] - 6]).float()
    assert torch.equal(hard.visual_tokens_per_layer[:, first], expected)
    assert torch.equal(soft.visual_tokens_per_layer[:, first], expected)


def test_fastv_soft_path_matches_hard_path(model, inputs):
    ids, mask, pixels = engine_args(inputs)
    engine = PrunedLlava(model)
    with torch.no_grad():
        hard = engine(ids, mask, pixels, method=build_method("fastv", 0.5), image_sizes=inputs["image_sizes"])
        soft = engine(ids, mask, pixels, method=build_method("fastv", 0.5), soft=True,
                      image_sizes=inputs["image_sizes"])
    text = mask.bool() & (ids != model.config.image_token_id)
    torch.testing.assert_close(hard.logits[text], soft.logits[text], atol=1e-4, rtol=1e-4)
    assert torch.equal(hard.visual_tokens_per_layer, soft.visual_tokens_per_layer)


def test_precomputed_visual_inputs_give_the_same_logits(model, inputs):
    engine = PrunedLlava(model)
    sizes = inputs["image_sizes"]
    with torch.no_grad():
        fresh = engine(*engine_args(inputs), image_sizes=sizes).logits
        visual = engine.visual_features(inputs["pixel_values"], sizes)
        reused = engine(inputs["input_ids"], inputs["attention_mask"], None, visual_inputs=visual).logits
    assert torch.equal(fresh, reused)
    with pytest.raises(ValueError, match="visual_inputs"):
        engine(inputs["input_ids"], inputs["attention_mask"], None, visual_inputs=(visual[0][:, :20], ()))


@pytest.mark.parametrize("method", [build_method("pool", 0.5), build_method("visionzip", 0.5),
                                    PruMergePlusPruning(0.5)])
def test_grid_methods_are_refused_by_name(model, inputs, method):
    engine = PrunedLlava(model)
    with pytest.raises(ValueError, match=f"{method.name}: not supported on llava_next"):
        engine.bind(method)
    with pytest.raises(ValueError, match=f"{method.name}: not supported on llava_next"):
        engine(*engine_args(inputs), method=method, image_sizes=inputs["image_sizes"])


def test_subclasses_opt_in_explicitly(model):
    class Tweaked(FastV):
        name = "tweaked"

    assert FastV.handles_varying_visual_tokens and not Tweaked.handles_varying_visual_tokens
    with pytest.raises(ValueError, match="tweaked: not supported on llava_next"):
        PrunedLlava(model).bind(Tweaked(0.5))


def test_inconsistent_inputs_are_reported(model, inputs):
    engine = PrunedLlava(model)
    ids, mask, pixels = engine_args(inputs)
    with pytest.raises(ValueError, match="image_sizes"):
        engine(ids, mask, pixels)
    ids = ids.clone()
    ids[1, (ids[1] == model.config.image_token_id).nonzero()[0]] = 5
    with pytest.raises(ValueError, match=r"give \[14, 24\] visual tokens but input_ids hold \[14, 23\] image tokens"):
        engine(ids, mask, pixels, image_sizes=inputs["image_sizes"])


def test_save_and_load_round_trip(model, processor, inputs, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_base_model(tmp_path)
    reloaded_processor = load_processor(tmp_path)
    assert type(loaded) is LlavaNextForConditionalGeneration and type(reloaded_processor) is LlavaNextProcessor
    again = make_inputs(reloaded_processor)
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    assert torch.equal(again["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        before = PrunedLlava(model)(*engine_args(inputs), image_sizes=inputs["image_sizes"]).logits
        after = PrunedLlava(loaded.eval())(*engine_args(again), image_sizes=again["image_sizes"]).logits
    assert torch.equal(before, after)


def test_flops_charge_the_vision_tower_once_per_anyres_crop(model, inputs):
    from lvlm_prune.runner import generate_with_method, per_sample_flops

    batch = {"prompt_input_ids": inputs["input_ids"], "prompt_attention_mask": inputs["attention_mask"],
             "pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]}
    result = generate_with_method(PrunedLlava(model), batch, build_method("fastv", 0.5), max_new_tokens=2,
                                  eos_token_id=None, pad_token_id=0)
    # (20, 40) fits the 16x32 pinpoint (base + 2 crops); (30, 28) the 32x32 one (base + 4 crops)
    assert result.vision_crops == [3, 5]
    flops = per_sample_flops(model.config, result)
    assert flops[1]["vision"] == pytest.approx(flops[0]["vision"] * 5 / 3)


def test_saved_llava_next_runs_through_the_collator_and_the_frozen_base_module(model, processor, tmp_path):
    from lightning_modules.frozen_base import FrozenBaseModule
    from lvlm_prune.data import VQACollator, VQAExample
    from lvlm_prune.modeling.prompt import get_template

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    examples = [VQAExample(f"q{i}", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                           "what is this ?", "red", "x") for i, (h, w) in enumerate(IMAGE_SIZES)]
    loaded = load_processor(str(tmp_path))
    batch = VQACollator(loaded, get_template("tiny"), loaded.tokenizer.convert_tokens_to_ids("<image>"))(examples)
    assert batch["image_sizes"].tolist() == [list(s) for s in IMAGE_SIZES]
    module = FrozenBaseModule(base_model_path=str(tmp_path), processor=loaded, categories=["x"])
    _, full, _ = module.run_method(batch, "full", 0.0)
    assert full.visual_tokens_per_layer[:, 0].tolist() == COUNTS
    _, pruned, _ = module.run_method(batch, "random", 0.5)
    assert pruned.visual_tokens_per_layer[:, 0].tolist() == [round(0.5 * n) for n in COUNTS]
