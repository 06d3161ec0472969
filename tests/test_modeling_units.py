"""The modeling helpers piece by piece: base loading (paths, dtypes, corrupt weights, quantisation settings, freezing),
the tiny model's config checks, seeding and growth, the prompt template, and the word tokenizer and processor."""

from dataclasses import replace

import pytest
import torch
from PIL import Image

from lvlm_prune.modeling.loading import (freeze, keep_quantized_base_differentiable, load_base_model, load_processor,
                                         quantization_kwargs)
from lvlm_prune.modeling.prompt import TINY_DEFAULT, ConversationTemplate
from lvlm_prune.modeling.tiny import build_tiny_llava, build_tiny_llava_config, grow_llava_depth, grown_layer_positions
from lvlm_prune.modeling.tokenizer import build_processor, build_word_tokenizer

# --- loading


def test_paths_starting_with_a_tilde_are_read_from_the_home_directory(tiny_base_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny_base_dir.parent))
    path = f"~/{tiny_base_dir.name}"
    processor, reference = load_processor(path), load_processor(tiny_base_dir)
    assert processor.tokenizer.get_vocab() == reference.tokenizer.get_vocab()
    assert processor.image_processor.to_dict() == reference.image_processor.to_dict()
    model, stored = load_base_model(path), load_base_model(tiny_base_dir)
    assert model.config.model_type == "llava"
    assert all(torch.equal(value, stored.state_dict()[name]) for name, value in model.state_dict().items())


def test_an_unknown_dtype_is_named_with_the_choices(tiny_base_dir):
    with pytest.raises(ValueError, match=r"dtype='float64'; choose one of \["):
        load_base_model(tiny_base_dir, dtype="float64")


def test_the_base_loads_in_the_requested_dtype(tiny_base_dir):
    model = load_base_model(tiny_base_dir, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    stored = load_base_model(tiny_base_dir).state_dict()  # the saved weights, cast: not another model
    assert all(torch.equal(value, stored[name].to(torch.bfloat16)) for name, value in model.state_dict().items()
               if value.is_floating_point())


def test_a_damaged_pytorch_bin_checkpoint_is_named(tiny_base_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    base = shutil.copytree(tiny_base_dir, tmp_path / "base")
    weights = base / "pytorch_model.bin"
    torch.save(load_file(base / "model.safetensors"), weights)
    (base / "model.safetensors").unlink()
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"^base: the weights in '.*' are corrupt or incomplete \(RuntimeError: "):
        load_base_model(base, setting="base")


def test_four_bit_layers_are_kept_off_the_backward_less_cpu_kernel():
    layer = torch.nn.Linear(2, 2)
    layer.support_avx512bf16_for_cpu = True
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    keep_quantized_base_differentiable(model)
    assert layer.support_avx512bf16_for_cpu is False and not hasattr(model[1], "support_avx512bf16_for_cpu")


def test_quantisation_settings_give_8bit_or_nf4_layers_computing_in_the_base_dtype():
    eight = quantization_kwargs("8bit", torch.float16)["quantization_config"]
    assert eight.load_in_8bit and not eight.load_in_4bit
    four = quantization_kwargs("4bit", torch.bfloat16)["quantization_config"]
    assert four.load_in_4bit and not four.load_in_8bit
    assert (four.bnb_4bit_quant_type, four.bnb_4bit_compute_dtype, four.bnb_4bit_use_double_quant) == (
        "nf4", torch.bfloat16, True)


def test_a_local_rank_beyond_the_visible_gpus_wraps_around(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert quantization_kwargs("8bit", torch.float16)["device_map"] == {"": 1}


def test_a_frozen_base_is_in_eval_mode_without_gradients(tiny_llava):
    model = freeze(tiny_llava.train())
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


# --- tiny model


def test_an_image_size_that_is_not_a_multiple_of_the_patch_is_refused(tiny_spec):
    with pytest.raises(ValueError, match="image_size=30 is not a multiple of patch_size=8"):
        build_tiny_llava_config(replace(tiny_spec, image_size=30), vocab_size=40, image_token_id=39)


def test_an_image_token_id_equal_to_the_vocab_size_is_refused(tiny_spec):
    with pytest.raises(ValueError, match="image_token_id=40 outside vocab_size=40"):
        build_tiny_llava_config(tiny_spec, vocab_size=40, image_token_id=40)


def test_the_default_initialisation_scales_with_the_llm_width(tiny_spec):
    # hidden_size 32: std 32 ** -0.5 ~ 0.18, not transformers' 0.02
    model = build_tiny_llava(tiny_spec, vocab_size=40, image_token_id=39, seed=0)
    std = model.model.language_model.layers[0].self_attn.q_proj.weight.std().item()
    assert 0.13 < std < 0.23
    narrow = build_tiny_llava(replace(tiny_spec, initializer_range=0.01), vocab_size=40, image_token_id=39, seed=0)
    assert narrow.model.language_model.layers[0].self_attn.q_proj.weight.std().item() < 0.015


def test_the_special_token_ids_reach_the_language_model_config(tiny_spec):
    text = build_tiny_llava_config(tiny_spec, vocab_size=40, image_token_id=39, pad_token_id=5, bos_token_id=6,
                                   eos_token_id=7).text_config
    assert (text.pad_token_id, text.bos_token_id, text.eos_token_id) == (5, 6, 7)


def test_the_same_seed_builds_the_same_weights(tiny_spec):
    def weights(seed):
        return build_tiny_llava(tiny_spec, vocab_size=40, image_token_id=39, seed=seed).state_dict()

    torch.manual_seed(123)
    first = weights(0)
    torch.manual_seed(456)  # the global RNG state does not matter
    assert all(torch.equal(first[k], v) for k, v in weights(0).items())
    assert not torch.equal(first["lm_head.weight"], weights(1)["lm_head.weight"])


def test_growing_to_the_same_depth_keeps_every_layer_in_place(tiny_llava):
    assert grown_layer_positions(4, 4) == [0, 1, 2, 3]
    grown = grow_llava_depth(tiny_llava, 4)
    assert all(torch.equal(grown.state_dict()[k], v) for k, v in tiny_llava.state_dict().items())


def test_growing_keeps_the_models_dtype_and_attention_and_leaves_it_unchanged(tiny_spec):
    from conftest import make_tiny_llava

    model = make_tiny_llava(tiny_spec, attn_implementation="eager").to(torch.bfloat16)
    grown = grow_llava_depth(model, 6, seed=0)
    assert {p.dtype for p in grown.parameters()} == {torch.bfloat16}
    assert grown.config._attn_implementation == "eager"
    assert model.config.text_config.num_hidden_layers == 4 and len(model.model.language_model.layers) == 4


# --- conversation template


def test_an_empty_context_is_the_same_as_none():
    assert TINY_DEFAULT.prompt("what ?", "") == TINY_DEFAULT.prompt("what ?")


def test_whitespace_around_a_question_is_dropped():
    assert TINY_DEFAULT.prompt("  what ?\n", with_image=False) == "USER: what ? ASSISTANT:"
    assert TINY_DEFAULT.next_turn(" what ? ") == "USER: what ? ASSISTANT:"


def test_a_later_turn_is_laid_out_like_the_first_with_any_separator():
    template = ConversationTemplate(system="", separator="\n")
    assert template.next_turn("what ?") == template.prompt("what ?", with_image=False) == "USER: what ?\nASSISTANT:"


# --- tokenizer and processor


def test_word_ids_are_contiguous_with_the_image_token_last_even_when_words_repeat():
    tokenizer = build_word_tokenizer(["USER", "red", ":", "red", "blue"])
    vocab = tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(len(tokenizer))) == list(range(10))
    assert vocab["<image>"] == len(tokenizer) - 1


def test_the_tokenizer_pads_on_the_left_for_generation():
    tokenizer = build_word_tokenizer(["red", "blue"])
    ids = tokenizer(["red", "red blue red"], padding=True)["input_ids"]
    pad, bos = tokenizer.pad_token_id, tokenizer.bos_token_id
    red, blue = tokenizer.convert_tokens_to_ids(["red", "blue"])
    assert ids == [[pad, pad, bos, red], [bos, red, blue, red]]  # the short prompt's padding on its left


def test_the_processor_keeps_the_edges_of_a_square_image_of_its_own_size():
    processor = build_processor(build_word_tokenizer(["red"]), image_size=32, patch_size=8)
    image = Image.new("RGB", (32, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 4, 32))  # a red band along the left edge
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    assert pixels[0, :, 0].mean() > pixels[2, :, 0].mean()  # still red at the left edge
    # neither resized nor cropped: every pixel is its own colour, CLIP-normalised, the band exactly 4 pixels wide
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    expected = torch.zeros(3, 32, 32)
    expected[2] = 1.0
    expected[:, :, :4] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    torch.testing.assert_close(pixels, (expected - mean) / std)


def test_a_grayscale_image_becomes_three_channels():
    processor = build_processor(build_word_tokenizer(["red"]), image_size=32, patch_size=8)
    pixels = processor.image_processor(images=[Image.new("L", (32, 32), 128)], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    # each channel holds the grey value, as the same image in RGB gives it (normalised per channel)
    rgb = processor.image_processor(images=[Image.new("RGB", (32, 32), (128, 128, 128))],
                                    return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, rgb)
    assert len(set(pixels[0, :, 0, 0].tolist())) == 3  # per-channel normalisation: the channels are not one copy
