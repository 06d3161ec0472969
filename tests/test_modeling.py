"""Tiny model, tokenizer, processor: round trips through save_pretrained / from_pretrained."""

import re

import pytest
import torch
from conftest import TINY_IMAGE_TOKEN, make_batch, make_tiny_llava
from PIL import Image

from datamodules.synthetic_vqa import SyntheticVQAConfig, vocabulary
from lvlm_prune.modeling.loading import load_base_model, load_processor
from lvlm_prune.modeling.prompt import TINY_DEFAULT, VICUNA_V1
from lvlm_prune.modeling.tokenizer import build_processor, build_word_tokenizer


def test_tokenizer_and_processor_round_trip(tmp_path):
    tokenizer = build_word_tokenizer(vocabulary(SyntheticVQAConfig()))
    processor = build_processor(tokenizer, image_size=64, patch_size=8)
    text = TINY_DEFAULT.prompt("what is the color of the object at row 2 column 3 ?") + TINY_DEFAULT.target("red")
    image = Image.new("RGB", (64, 64), (200, 10, 10))
    before = processor(images=[image], text=[text], return_tensors="pt")
    processor.save_pretrained(tmp_path)
    loaded = load_processor(tmp_path)
    after = loaded(images=[image], text=[text], return_tensors="pt")
    assert torch.equal(before["input_ids"], after["input_ids"])
    assert torch.allclose(before["pixel_values"], after["pixel_values"])
    assert (before["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum() == 64
    assert before["input_ids"][0, 0] == tokenizer.bos_token_id and before["input_ids"][0, -1] == tokenizer.eos_token_id
    decoded = tokenizer.decode(before["input_ids"][0, -4:], skip_special_tokens=True)
    assert decoded == "ASSISTANT : red"


def test_save_pretrained_then_from_pretrained_gives_identical_logits(tiny_spec, tmp_path):
    model = make_tiny_llava(tiny_spec, seed=3)
    model.save_pretrained(tmp_path)
    loaded = load_base_model(tmp_path).eval()
    ids = torch.randint(3, TINY_IMAGE_TOKEN, (2, 24))
    ids[:, 1:17] = TINY_IMAGE_TOKEN
    pixels = torch.randn(2, 3, tiny_spec.image_size, tiny_spec.image_size)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
        after = loaded(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(before, after)


def test_vicuna_template_matches_llava15():
    prompt = VICUNA_V1.prompt("What is shown?")
    assert prompt.startswith("A chat between a curious user and an artificial intelligence assistant. "
                             "The assistant gives helpful, detailed, and polite answers to the user's questions. USER:")
    assert prompt.endswith(" USER: <image>\nWhat is shown? ASSISTANT:")
    assert VICUNA_V1.target("A cat.") == " A cat.</s>"


def test_a_context_goes_between_the_image_and_the_question():
    # where ACCM's caption and the base's textual descriptions go (METHODS.md section 4)
    assert VICUNA_V1.prompt("What is shown?", "additional information: a cat").endswith(
        " USER: <image>\nadditional information: a cat\nWhat is shown? ASSISTANT:")
    assert TINY_DEFAULT.prompt("what ?", "red", with_image=False) == "USER: red\nwhat ? ASSISTANT:"


def test_missing_or_incomplete_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_base_model(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path))}.*holds no processor"):
        load_processor(tmp_path)
    # an image processor without the tokenizer's files
    tokenizer = build_word_tokenizer(["red", "blue"])
    build_processor(tokenizer, image_size=32, patch_size=8).image_processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"^data.processor_path: '{re.escape(str(tmp_path))}': its processor does "
                                         r"not load \("):
        load_processor(tmp_path, setting="data.processor_path")


def test_zero_residual_init_makes_every_block_the_identity(tiny_spec):
    from dataclasses import replace

    from lvlm_prune.modeling.tiny import build_tiny_llava

    model = build_tiny_llava(replace(tiny_spec, residual_init="zero"), vocab_size=40, image_token_id=3, seed=0)
    ids = torch.randint(4, 40, (2, 7))
    hidden = model.model.language_model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer_output in hidden[1:-1]:  # the last entry is after the final norm
        torch.testing.assert_close(layer_output, hidden[0], rtol=0, atol=0)
    pixels = torch.randn(2, 3, tiny_spec.image_size, tiny_spec.image_size)
    vision = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(vision[-1], vision[0], rtol=0, atol=0)
    # the projector is not a residual block: visual tokens still differ from image to image
    features = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    assert not torch.allclose(features[0], features[1])


def test_unknown_residual_init_is_named(tiny_spec):
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"^spec\.residual_init='xavier'; choose one of \('normal', 'zero'\)$"):
        replace(tiny_spec, residual_init="xavier")


@pytest.mark.parametrize("placement", ["spread", "bottom"])
def test_growing_the_llm_keeps_its_function_and_generation(tiny_spec, placement):
    from lvlm_prune.modeling.tiny import grow_llava_depth, grown_layer_positions

    model = make_tiny_llava(tiny_spec)  # normal init: every trained layer does something
    grown = grow_llava_depth(model, 10, placement, seed=1).eval()
    assert grown.config.text_config.num_hidden_layers == 10
    assert [layer.self_attn.layer_idx for layer in grown.model.language_model.layers] == list(range(10))
    positions = grown_layer_positions(4, 10, placement)
    assert positions == ([0, 2, 5, 7] if placement == "spread" else [0, 1, 2, 3])
    for old, new in enumerate(positions):
        torch.testing.assert_close(grown.model.language_model.layers[new].self_attn.q_proj.weight,
                                   model.model.language_model.layers[old].self_attn.q_proj.weight, rtol=0, atol=0)
    new_layer = next(i for i in range(10) if i not in positions)
    assert not grown.model.language_model.layers[new_layer].mlp.down_proj.weight.any()
    assert grown.model.language_model.layers[new_layer].self_attn.q_proj.weight.any()  # attention can still learn
    ids, mask, pixels = make_batch(tiny_spec)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with torch.no_grad():
        torch.testing.assert_close(grown(**inputs).logits, model(**inputs).logits)
        kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(grown.generate(**inputs, **kwargs), model.generate(**inputs, **kwargs))
    assert (ids == TINY_IMAGE_TOKEN).any()


def test_impossible_growth_is_named():
    from lvlm_prune.modeling.tiny import grown_layer_positions

    with pytest.raises(ValueError, match="cannot grow a 6-layer LLM to 4"):
        grown_layer_positions(6, 4)
    with pytest.raises(ValueError, match="placement='middle'"):
        grown_layer_positions(2, 4, "middle")


@pytest.mark.parametrize("feature_layer, unread_layers", [(-1, []), (-2, [1])])
def test_the_unread_vision_modules_are_exactly_the_parameters_no_loss_reaches(tiny_spec, feature_layer, unread_layers):
    from dataclasses import replace

    from lvlm_prune.modeling.loading import unread_vision_modules

    spec = replace(tiny_spec, vision_feature_layer=feature_layer)
    model = make_tiny_llava(spec)
    ids, mask, pixels = make_batch(spec)
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits.square().mean().backward()
    gradless = {name for name, p in model.named_parameters() if p.grad is None}
    unread = {id(p) for module in unread_vision_modules(model) for p in module.parameters()}
    assert gradless == {name for name, p in model.named_parameters() if id(p) in unread}
    tower = model.model.vision_tower
    expected = {"post_layernorm", *(f"encoder.layers.{i}" for i in unread_layers)}
    assert {name for name, module in tower.named_modules() if module in unread_vision_modules(model)} == expected


def test_a_quantised_base_loads_onto_its_own_process_gpu(monkeypatch):
    """Each DDP process loads the base onto its GPU: it is built before Lightning picks the device, and an 8-bit
    layer moved afterwards keeps its quantisation state where it was loaded."""
    from lvlm_prune.modeling.loading import UNQUANTISED_MODULES, quantization_kwargs

    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert quantization_kwargs("8bit", torch.float16)["device_map"] == {"": "cpu"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert quantization_kwargs("4bit", torch.bfloat16)["device_map"] == {"": 0}
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert quantization_kwargs("4bit", torch.bfloat16)["device_map"] == {"": 2}
    monkeypatch.setenv("LOCAL_RANK", "3")
    kwargs = quantization_kwargs("8bit", torch.bfloat16)
    assert kwargs["device_map"] == {"": 3}
    assert kwargs["quantization_config"].llm_int8_skip_modules == UNQUANTISED_MODULES
