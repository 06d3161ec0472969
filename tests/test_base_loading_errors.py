"""Bad base-model input fails at module init with an error that names the setting and the file: a corrupt or
incomplete config.json or weights file, a processor that does not belong to the base, max_new_tokens below 1."""

import json
import shutil

import pytest

from lightning_modules.compensation import CompensationModule
from lightning_modules.frozen_base import FrozenBaseModule
from lvlm_prune.modeling.loading import load_base_model, load_processor
from lvlm_prune.rcp.compensation import RCPCompensation

BASE = "model.init_args.base_model_path"


@pytest.fixture(scope="module")
def processor(tiny_base_dir):
    return load_processor(str(tiny_base_dir))


def copy_of(tiny_base_dir, tmp_path):
    return shutil.copytree(tiny_base_dir, tmp_path / "base")


def save_base(directory, vocab_size: int, image_token_id: int, image_size: int = 32):
    from lvlm_prune.modeling import TinyLlavaSpec, build_tiny_llava

    spec = TinyLlavaSpec(image_size=image_size, patch_size=8, vision_hidden_size=32, vision_layers=1, vision_heads=2,
                         hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         max_position_embeddings=256)
    build_tiny_llava(spec, vocab_size=vocab_size, image_token_id=image_token_id).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("content", [b'{"model_type": "llava", "text_config": {', b"\x00\xff" * 40])
def test_a_corrupt_config_json_is_named(tiny_base_dir, tmp_path, content):
    base = copy_of(tiny_base_dir, tmp_path)
    (base / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{BASE}: '.*config\.json' is corrupt or incomplete: it could not be read "
                                         r"as a model config \(") as caught:
        load_base_model(base, setting=BASE)
    cause = caught.value.__cause__  # the reader's own error, kept for the traceback and named in the message
    assert isinstance(cause, (OSError, ValueError)) and cause is not caught.value
    assert str(caught.value).endswith(f"({type(cause).__name__}: {cause})")


def test_a_checkpoint_in_the_llava_repository_format_is_named(tiny_base_dir, tmp_path):
    base = copy_of(tiny_base_dir, tmp_path)
    (base / "config.json").write_text('{"model_type": "llava_llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}')
    with pytest.raises(ValueError, match=rf"^{BASE}: '.*' is a checkpoint in the LLaVA repository's own format "
                                         r"\(model_type 'llava_llama'\).*llava-hf/llava-1.5-7b-hf"):
        load_base_model(base, setting=BASE)


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_corrupt_safetensors_weights_are_named(tiny_base_dir, tmp_path, damage):
    base = copy_of(tiny_base_dir, tmp_path)
    weights = base / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x7f" * 4096)
    with pytest.raises(ValueError, match=rf"^{BASE}: '.*model\.safetensors' is corrupt or incomplete "
                                         r"\(SafetensorError: .+\); download or save the base model again") as caught:
        load_base_model(base, setting=BASE)
    assert type(caught.value.__cause__).__name__ == "SafetensorError"  # the reader's own error, kept as the cause


def test_a_shard_missing_from_a_sharded_checkpoint_is_named(tiny_base_dir, tmp_path):
    base = copy_of(tiny_base_dir, tmp_path)
    (base / "model.safetensors").rename(base / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=rf"^{BASE}: the base model is incomplete: "
                                                r"'.*model-00002-of-00002\.safetensors', named in "
                                                r"'.*model\.safetensors\.index\.json', does not exist"):
        load_base_model(base, setting=BASE)
    (base / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json' is corrupt or incomplete"):
        load_base_model(base, setting=BASE)


def test_the_module_names_the_setting_of_a_corrupt_base(tiny_base_dir, tmp_path, processor):
    base = copy_of(tiny_base_dir, tmp_path)
    (base / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^{BASE}: '.*model\.safetensors' is corrupt or incomplete"):
        FrozenBaseModule(str(base), processor=processor)


@pytest.mark.parametrize("value", [0, -3])
def test_max_new_tokens_below_one_fails_at_init(tmp_path, processor, value):
    missing = str(tmp_path / "no_base")  # checked before the base loads
    with pytest.raises(ValueError, match=rf"^model\.init_args\.max_new_tokens={value} must be at least 1"):
        FrozenBaseModule(missing, processor=processor, max_new_tokens=value)
    with pytest.raises(ValueError, match=rf"^model\.init_args\.max_new_tokens={value} must be at least 1"):
        CompensationModule(missing, RCPCompensation(target_prune_ratio=0.5, pruning_layers=[1]), processor=processor,
                           max_new_tokens=value)


def test_a_processor_with_another_image_token_is_refused(tmp_path, processor):
    # the vocabulary is large enough, but the base expects its image token elsewhere
    base = save_base(tmp_path / "other", vocab_size=len(processor.tokenizer) + 4, image_token_id=3)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_token_id != 3
    with pytest.raises(ValueError, match=r"^data\.init_args\.processor_path and model\.init_args\.base_model_path do "
                                         rf"not match: the processor's image token '<image>' has id {image_token_id}, "
                                         r"the base model's config\.image_token_id is 3"):
        FrozenBaseModule(base, processor=processor)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, processor):
    image = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    base = save_base(tmp_path / "small", vocab_size=image + 1, image_token_id=image)
    big = load_processor_copy(processor, tmp_path)
    big.tokenizer.add_tokens(["extra_a", "extra_b"])
    with pytest.raises(ValueError, match=rf"do not match: the processor's tokenizer has {image + 3} tokens, more than "
                                         rf"the base model's {image + 1} embedding rows"):
        FrozenBaseModule(base, processor=big)


def test_a_padded_embedding_is_accepted(tmp_path, processor):
    # LLaVA-1.5's checkpoint: 32064 embedding rows for a tokenizer of 32002 tokens
    image = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    base = save_base(tmp_path / "padded", vocab_size=len(processor.tokenizer) + 10, image_token_id=image)
    assert FrozenBaseModule(base, processor=processor).base.get_input_embeddings().num_embeddings == image + 11


def test_a_processor_cropping_another_size_is_refused(tmp_path, processor):
    image = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    base = save_base(tmp_path / "wide", vocab_size=len(processor.tokenizer), image_token_id=image, image_size=64)
    with pytest.raises(ValueError, match=r"do not match: the processor crops images to 32 x 32 pixels, the base "
                                         r"model's vision tower takes 64 \(vision_config\.image_size\)"):
        FrozenBaseModule(base, processor=processor)


def load_processor_copy(processor, tmp_path):
    processor.save_pretrained(tmp_path / "processor")
    return load_processor(str(tmp_path / "processor"))


def test_an_unknown_attention_implementation_names_the_setting(tmp_path):
    from conftest import save_tiny_base
    from lvlm_prune.modeling.loading import load_base_model

    base = save_tiny_base(tmp_path / "base")
    with pytest.raises(ValueError, match=r"attn_implementation='flash' \(model.init_args.attn_implementation\): "
                                         r"Specified `attn_implementation=\"flash\"` is not supported"):
        load_base_model(base, attn_implementation="flash")
