"""Loading base models and processors from local directories (Hugging Face layout)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _require_dir(path: str | Path, what: str, setting: str | None = None) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{_named(setting)}{what} directory {str(path)!r} does not exist (a base is a local "
                                "Hugging Face directory; the embedded default's, runs/demo/base_model, is made by "
                                "`make demo` or by fitting configs/synthetic/base_describe.yaml, base_stage1.yaml and "
                                "base.yaml in turn)")
    return path


def _named(setting: str | None) -> str:
    return f"{setting}: " if setting else ""


DAMAGED_BIN_MARKS = ("PytorchStreamReader", "unexpected EOF")


def load_processor(path: str | Path, setting: str | None = None) -> Any:
    """`AutoProcessor.from_pretrained` from a local directory, with a clear error (naming `setting`, the config key
    that gave the path, when known) when it has none."""
    from transformers import AutoProcessor

    path = _require_dir(path, "processor", setting)
    if not any((path / name).exists() for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{_named(setting)}{str(path)!r} holds no processor (no processor_config.json / preprocessor_config.json / "
            "tokenizer_config.json); save one with processor.save_pretrained(dir) next to the model"
        )
    advice = "it needs the tokenizer's files and the image processor's, as processor.save_pretrained(dir) writes them"
    try:
        processor = AutoProcessor.from_pretrained(str(path))
    # e.g. an image processor beside a model config; AttributeError: a processor_config.json of the wrong shape
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{_named(setting)}{str(path)!r}: its processor does not load ({type(error).__name__}: "
                         f"{error}); {advice}") from error
    missing = [part for part in ("tokenizer", "image_processor") if getattr(processor, part, None) is None]
    if missing:  # AutoProcessor falls back to the image processor (or the tokenizer) alone
        raise ValueError(f"{_named(setting)}{str(path)!r}: its processor does not load (it gave a "
                         f"{type(processor).__name__}, without {' or '.join(missing)}); {advice}")
    return processor


def load_base_model(
    path: str | Path,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    quantization: str | None = None,
    setting: str | None = None,
) -> torch.nn.Module:
    """A LLaVA-family model from a local Hugging Face directory.

    LLaVA-NeXT (`model_type` 'llava_next', e.g. llava-hf/llava-v1.6-vicuna-7b-hf) loads as
    `LlavaNextForConditionalGeneration`, the class the engine's anyres path is written for; every other type goes
    through `AutoModelForImageTextToText` (LLaVA-1.5: `LlavaForConditionalGeneration`). The processor of either
    loads with `load_processor` (`AutoProcessor`).

    Args:
        path: directory with config.json and weights (e.g. llava-hf/llava-1.5-7b-hf downloaded beforehand).
        dtype: float32 | bfloat16 | float16.
        attn_implementation: sdpa | eager | flash_attention_2 (the pruning engine needs sdpa or eager: it masks
            with a full additive mask).
        quantization: None | '8bit' | '4bit' (NF4, bitsandbytes; needs accelerate).
        setting: the config key that gave `path`, named in the errors about it.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, LlavaNextForConditionalGeneration

    path = _require_dir(path, "base model", setting)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{_named(setting)}base model directory {str(path)!r} has no config.json")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "attn_implementation": attn_implementation}
    if quantization is not None:
        kwargs.update(quantization_kwargs(quantization, DTYPES[dtype]))
    check_not_original_llava_format(path, setting)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{_named(setting)}{str(path / 'config.json')!r} is corrupt or incomplete: it could not be "
                         f"read as a model config ({type(error).__name__}: {error})") from error
    check_safetensors(path, setting)
    is_next = config.model_type == "llava_next"
    model_class = LlavaNextForConditionalGeneration if is_next else AutoModelForImageTextToText
    try:
        model = model_class.from_pretrained(str(path), config=config, **kwargs)
    except ValueError as error:
        if f'attn_implementation="{attn_implementation}"' not in str(error):
            raise
        raise ValueError(f"attn_implementation={attn_implementation!r} (model.init_args.attn_implementation): "
                         f"{error}") from error
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as error:
        # safetensors past the header check, or a damaged pytorch_model*.bin (torch's zip reader, its unpickler, or
        # the storage reader of the legacy non-zip format: "unexpected EOF, expected N more bytes")
        if isinstance(error, RuntimeError) and not any(mark in str(error) for mark in DAMAGED_BIN_MARKS):
            raise
        raise ValueError(f"{_named(setting)}the weights in {str(path)!r} are corrupt or incomplete "
                         f"({type(error).__name__}: {error}); download or save the base model again") from error
    if quantization == "4bit":
        keep_quantized_base_differentiable(model)
    return model


def keep_quantized_base_differentiable(model: torch.nn.Module) -> None:
    """bitsandbytes repacks a 4-bit Linear for AVX512-BF16 CPUs at its first no-grad eval-mode call and from then
    on runs a kernel without backward (the plug-ins' gradients through the frozen base would be silently wrong: the
    teacher pass is such a call), and the repacking fails on widths that are not multiples of 64. Off for every
    4-bit layer."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


# model types of the LLaVA authors' own repository (liuhaotian/llava-v1.5-7b), which transformers does not read
ORIGINAL_LLAVA_TYPES = ("llava_llama", "llava_mistral", "llava_mpt", "llava_qwen")


def check_not_original_llava_format(path: Path, setting: str | None = None) -> None:
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # AutoConfig names an unreadable config
    if model_type in ORIGINAL_LLAVA_TYPES:
        raise ValueError(f"{_named(setting)}{str(path)!r} is a checkpoint in the LLaVA repository's own format "
                         f"(model_type {model_type!r}), which transformers does not load: use its Hugging Face "
                         "conversion (llava-hf/llava-1.5-7b-hf for LLaVA-1.5-7B), or convert it with the script "
                         "src/transformers/models/llava/convert_llava_weights_to_hf.py of transformers' repository")


def check_safetensors(path: Path, setting: str | None = None) -> None:
    """Reads the header of each safetensors file the directory's checkpoint uses (the index's shards, or
    model.safetensors): a truncated or overwritten file fails here, named, instead of deep inside from_pretrained.
    The header check covers truncation: safetensors refuses a file shorter than its header says."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{_named(setting)}{str(index)!r} is corrupt or incomplete ({type(error).__name__}: "
                             f"{error}); download or save the base model again") from error
        files = [path / shard for shard in shards]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{_named(setting)}the base model is incomplete: {str(file)!r}, named in "
                                        f"{str(index)!r}, does not exist; download or save the base model again")
    else:
        files = [file for file in (path / "model.safetensors",) if file.exists()]
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{_named(setting)}{str(file)!r} is corrupt or incomplete ({type(error).__name__}: "
                             f"{error}); download or save the base model again") from error


# LLaVA's own loader quantises the language model and the projector; the CLIP tower loads apart, in fp16.
# transformers matches these from the start of a module's name or as its end
UNQUANTISED_MODULES = ["model.vision_tower", "vision_tower", "lm_head"]


def quantization_kwargs(quantization: str, compute_dtype: torch.dtype) -> dict[str, Any]:
    """bitsandbytes settings for `from_pretrained`. Each process loads onto its own GPU: the base is built before
    Lightning picks the device, and a quantised weight cannot be moved afterwards (8-bit layers keep their
    quantisation state on the device they were loaded on)."""
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTISED_MODULES)
    elif quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True,
                                    llm_int8_skip_modules=UNQUANTISED_MODULES)
    else:
        raise ValueError(f"quantization={quantization!r}; choose None, '8bit' or '4bit'")
    return {"quantization_config": config, "device_map": {"": _local_device()}}


def _local_device() -> str | int:
    """This process's GPU (LOCAL_RANK from Lightning's or torchrun's launcher, SLURM_LOCALID under srun), or the
    CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    return int(local_rank) % torch.cuda.device_count()


def unread_vision_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The parts of a LLaVA vision tower whose output reaches no feature the LLM reads, so no loss: CLIP's
    post-layernorm (it normalises the pooled output, which LLaVA does not use) and the encoder layers after the
    deepest `vision_feature_layer` (hidden state k is the output of the first k layers)."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    read = model.config.vision_feature_layer
    deepest = max(index % (len(layers) + 1) for index in (read if isinstance(read, (list, tuple)) else [read]))
    return [tower.post_layernorm, *layers[deepest:]]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """No gradients and eval mode (dropout off) for a frozen base."""
    model.requires_grad_(False)
    model.eval()
    return model
