"""The base LVLM module's and the base loader's remaining wiring, on the tiny saved base: the special token ids the
model is built with, the sharding strategies an export or Muon refuses, what init_from checks and how it loads and
grows, a run without an export, and the loader's named errors for inputs the other tests do not reach."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from lightning_modules.base_lvlm import BaseLVLMModule, record_dtype
from lvlm_prune.modeling import TinyLlavaSpec
from lvlm_prune.modeling.loading import load_base_model, load_processor, unread_vision_modules

# the spec of conftest's `tiny_base_dir`
BASE_SPEC = dict(image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=2, vision_heads=2, hidden_size=32,
                 intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2, max_position_embeddings=256)
SETTING = "model.init_args.init_from"


@pytest.fixture(scope="module")
def processor(tiny_base_dir):
    return load_processor(str(tiny_base_dir))


def base_module(processor, spec=None, **kwargs) -> BaseLVLMModule:
    return BaseLVLMModule(processor, categories=["count"], spec=TinyLlavaSpec(**{**BASE_SPEC, **(spec or {})}),
                          **kwargs)


# ------------------------------------------------------------------------------------------------ base_lvlm.py


def test_the_model_takes_its_special_token_ids_from_the_processor(tiny_base_dir):
    processor = load_processor(str(tiny_base_dir))  # its own copy: the pad token changes
    tokenizer = processor.tokenizer
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(5)  # not the builder's default pad id 0
    text = base_module(processor).model.config.text_config
    assert (text.pad_token_id, text.bos_token_id, text.eos_token_id) == (
        5, tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_an_export_under_model_parallel_is_refused_at_fit_start(processor, tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = base_module(processor, export_dir=str(tmp_path / "export"))
    module.trainer = SimpleNamespace(strategy=ModelParallelStrategy.__new__(ModelParallelStrategy), is_global_zero=True)
    with pytest.raises(ValueError, match=r"export_dir: the export gathers DeepSpeed's partitions, not "
                                         r"ModelParallelStrategy's shards"):
        module.on_fit_start()
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "ModelParallelStrategy"])
def test_muon_is_refused_under_every_sharding_strategy(processor, strategy):
    import lightning.pytorch.strategies as strategies

    sharded = getattr(strategies, strategy)
    module = base_module(processor, optimizer="muon")
    module.trainer = SimpleNamespace(strategy=sharded.__new__(sharded), estimated_stepping_batches=10)
    with pytest.raises(ValueError, match=rf"^model.init_args.optimizer=muon does not run under {strategy} "):
        module.configure_optimizers()


def test_the_peak_learning_rate_reaches_every_parameter_group(processor):
    module = base_module(processor, learning_rate=3e-4, warmup_steps=0)
    module.trainer = SimpleNamespace(strategy=object(), estimated_stepping_batches=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert [group["initial_lr"] for group in optimizer.param_groups] == [3e-4, 3e-4]


def test_a_fit_without_export_dir_writes_no_export(processor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = base_module(processor)
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(), is_global_zero=True, global_step=3,
                                     fit_loop=SimpleNamespace(done=True), ckpt_path=None)
    module.on_fit_start()
    module.on_train_end()
    module._train_ended = False  # a resume whose training had ended: the export runs at fit end instead
    module.on_fit_end()
    assert list(tmp_path.iterdir()) == []


def test_an_export_records_a_legacy_torch_dtype_entry_too(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"torch_dtype": "bfloat16", "text_config": {"torch_dtype": "float16"}}))
    record_dtype(path, "float32")
    assert json.loads(path.read_text()) == {"torch_dtype": "float32", "text_config": {"torch_dtype": "float32"}}


def test_init_from_a_deeper_export_than_the_spec_is_refused(processor, tiny_base_dir):
    with pytest.raises(ValueError, match=rf"^{SETTING}='.*' has 4 LLM layers, more than model.spec.num_layers=2$"):
        base_module(processor, spec={"num_layers": 2}, init_from=str(tiny_base_dir))


def test_init_from_an_export_of_another_image_token_is_named(processor, tiny_base_dir, tmp_path):
    # the saved config stores the id under its legacy key image_token_index; the check reads the attribute
    base = shutil.copytree(tiny_base_dir, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    key = "image_token_index" if "image_token_index" in config else "image_token_id"
    config[key] = 3
    (base / "config.json").write_text(json.dumps(config))
    expected = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    with pytest.raises(ValueError, match=rf"^{SETTING}='.*' does not match model.spec and the processor: "
                                         rf"image_token_id is 3, the spec gives {expected}\."):
        base_module(processor, init_from=str(base))


def test_init_from_accepts_an_export_initialised_at_another_scale(processor, tiny_base_dir, tmp_path):
    # the initialisation scale is no part of the shape: a stage trained from another init continues
    base = shutil.copytree(tiny_base_dir, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        config[tower]["initializer_range"] = 0.5
    (base / "config.json").write_text(json.dumps(config))
    assert base_module(processor, init_from=str(base)).model.config.text_config.num_hidden_layers == 4


def test_the_seed_draws_the_layers_growth_adds(processor, tiny_base_dir):
    def new_layer(seed):
        module = base_module(processor, spec={"num_layers": 6}, init_from=str(tiny_base_dir), grow_placement="bottom",
                             seed=seed)
        return module.model.state_dict()["model.language_model.layers.5.self_attn.q_proj.weight"]

    first = new_layer(1)
    assert torch.equal(first, new_layer(1)) and not torch.equal(first, new_layer(2))


@pytest.mark.parametrize("init_from", [False, True])
def test_the_model_is_built_or_loaded_with_the_attention_implementation_asked(processor, tiny_base_dir, init_from):
    model = base_module(processor, init_from=str(tiny_base_dir) if init_from else None,
                        attn_implementation="eager").model
    assert model.config.get_text_config()._attn_implementation == "eager"


def test_init_from_a_directory_without_config_names_the_setting(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^{SETTING}: base model directory '.*' has no config.json"):
        base_module(processor, init_from=str(tmp_path))


# --------------------------------------------------------------------------------------------------- loading.py


def test_a_file_is_not_a_base_or_processor_directory(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"^base model directory '.*weights\.bin' does not exist"):
        load_base_model(path)
    with pytest.raises(FileNotFoundError, match=r"^processor directory '.*weights\.bin' does not exist"):
        load_processor(path)


def test_a_directory_without_config_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^base: base model directory '.*' has no config.json"):
        load_base_model(tmp_path, setting="base")


def test_a_tokenizer_without_an_image_processor_is_a_processor_that_does_not_load(tiny_base_dir, tmp_path):
    load_processor(str(tiny_base_dir)).tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^proc: '.*': its processor does not load \("):
        load_processor(tmp_path, setting="proc")


def test_an_unknown_image_processor_type_is_named(tiny_base_dir, tmp_path):
    base = shutil.copytree(tiny_base_dir, tmp_path / "base")
    config = json.loads((base / "processor_config.json").read_text())
    config["image_processor"]["image_processor_type"] = "NoSuchImageProcessor"
    (base / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"^proc: '.*': its processor does not load \(ValueError: ") as caught:
        load_processor(base, setting="proc")
    assert isinstance(caught.value.__cause__, ValueError)


@pytest.mark.parametrize("content", ["[1, 2]", "{}", '{"model_type": "no_such_model"}'])
def test_a_config_json_that_is_no_model_config_is_named(tiny_base_dir, tmp_path, content):
    base = shutil.copytree(tiny_base_dir, tmp_path / "base")
    (base / "config.json").write_text(content)
    with pytest.raises(ValueError, match=r"^base: '.*config\.json' is corrupt or incomplete: it could not be read as "
                                         r"a model config \(ValueError: "):
        load_base_model(base, setting="base")


@pytest.mark.parametrize("model_type", ["llava_mistral", "llava_mpt", "llava_qwen"])  # llava_llama: elsewhere
def test_the_other_llava_repository_model_types_are_named(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ValueError, match=rf"is a checkpoint in the LLaVA repository's own format \(model_type "
                                         rf"'{model_type}'\)"):
        load_base_model(tmp_path)


@pytest.mark.parametrize("index", ['{"weight_map": ["a"]}', "[1]"])
def test_a_shard_index_of_the_wrong_shape_is_named(tiny_base_dir, tmp_path, index):
    base = shutil.copytree(tiny_base_dir, tmp_path / "base")
    (base / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=r"^base: '.*model\.safetensors\.index\.json' is corrupt or incomplete "
                                         r"\((AttributeError|TypeError): "):
        load_base_model(base, setting="base")


@pytest.mark.parametrize("content, error", [(b"", "EOFError"), (b"\x80\x02garbage" * 10, "UnpicklingError")])
def test_a_pytorch_bin_that_does_not_unpickle_is_named(tiny_base_dir, tmp_path, content, error):
    base = shutil.copytree(tiny_base_dir, tmp_path / "base")
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(ValueError, match=rf"^base: the weights in '.*' are corrupt or incomplete \({error}: "):
        load_base_model(base, setting="base")


def test_a_truncated_legacy_format_pytorch_bin_is_named(tiny_base_dir, tmp_path):
    """torch's pre-1.6 (non-zip) format fails in its storage reader, not in the zip reader or the unpickler."""
    from safetensors.torch import load_file

    base = shutil.copytree(tiny_base_dir, tmp_path / "base")
    state = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    torch.save(state, base / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    whole = (base / "pytorch_model.bin").read_bytes()
    (base / "pytorch_model.bin").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"^base: the weights in '.*' are corrupt or incomplete \(RuntimeError: "
                                         r"unexpected EOF"):
        load_base_model(base, setting="base")


def test_a_processor_config_of_the_wrong_shape_is_named(tiny_base_dir, tmp_path):
    base = shutil.copytree(tiny_base_dir, tmp_path / "base")
    (base / "processor_config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"^base: '.*': its processor does not load \(AttributeError: "):
        load_processor(base, setting="base")


@pytest.mark.parametrize("error", [ValueError("some other problem"), RuntimeError("CUDA error: device-side assert")])
def test_other_errors_of_from_pretrained_pass_unchanged(tiny_base_dir, monkeypatch, error):
    import transformers

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", fail)
    with pytest.raises(type(error)) as caught:
        load_base_model(tiny_base_dir, setting="base")
    assert caught.value is error


def test_an_unknown_quantization_is_named(tiny_base_dir):
    with pytest.raises(ValueError, match=r"^quantization='3bit'; choose None, '8bit' or '4bit'"):
        load_base_model(tiny_base_dir, quantization="3bit")


def test_only_a_4bit_base_is_kept_off_the_backward_less_kernel(tiny_base_dir, monkeypatch):
    from lvlm_prune.modeling import loading

    kept = []
    monkeypatch.setattr(loading, "quantization_kwargs", lambda quantization, dtype: {})  # no bitsandbytes needed
    monkeypatch.setattr(loading, "keep_quantized_base_differentiable", kept.append)
    model = load_base_model(tiny_base_dir, quantization="4bit")
    load_base_model(tiny_base_dir, quantization="8bit")
    assert kept == [model]


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("float16", torch.float16),
                                         ("fp32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_every_dtype_name_loads_in_its_dtype(tiny_base_dir, name, dtype):
    assert {p.dtype for p in load_base_model(tiny_base_dir, dtype=name).parameters()} == {dtype}


def test_with_several_feature_layers_the_deepest_read_decides_what_is_unread(tiny_llava):
    tower = tiny_llava.model.vision_tower
    tiny_llava.config.vision_feature_layer = [-3, -2]  # hidden states 0 and 1 of a 2-layer tower
    assert unread_vision_modules(tiny_llava) == [tower.post_layernorm, tower.encoder.layers[1]]
    tiny_llava.config.vision_feature_layer = [-2, -1]
    assert unread_vision_modules(tiny_llava) == [tower.post_layernorm]
