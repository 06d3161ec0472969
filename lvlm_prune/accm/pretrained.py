"""Pretrained parts of ACCM loaded from local Hugging Face directories: a GPT-2 caption decoder with its tokenizer
and a frozen CLIP text encoder with its tokenizer for the selector.

Nothing is downloaded: every path is a local directory (config.json, weights, tokenizer files), checked before
anything is loaded, and every error names the setting that holds the path.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError

from lvlm_prune.accm.selector import CLIPTextEncoder

GPT2_TYPES = ("gpt2",)
# 'clip' is a whole CLIP model (e.g. openai/clip-vit-large-patch14): its text tower and text projection are read
CLIP_TEXT_TYPES = ("clip", "clip_text_model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def checkpoint_config(path: str | Path, setting: str, expected_types: tuple[str, ...], what: str) -> dict[str, Any]:
    """The parsed config.json of the checkpoint directory `path`, after checking that the directory exists, is a
    checkpoint of one of `expected_types` and holds tokenizer files; errors name `setting` and `path`."""
    directory = Path(path).expanduser()
    where = f"model.init_args.compensation.init_args.{setting}={str(path)!r}"
    if not directory.is_dir():
        raise FileNotFoundError(f"{where}: no such directory (a local {what} checkpoint in Hugging Face layout)")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{where} has no config.json: not a Hugging Face {what} checkpoint")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: config.json is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config.json holds a JSON {type(config).__name__}, not a model config object")
    model_type = config.get("model_type")
    if model_type not in expected_types:
        raise ValueError(f"{where} is not a {what} checkpoint: config.json has model_type={model_type!r}, "
                         f"expected one of {list(expected_types)}")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{where} holds no tokenizer (none of {list(TOKENIZER_FILES)}); save the "
                                "checkpoint's tokenizer beside it with tokenizer.save_pretrained(dir)")
    return config


def load_tokenizer(path: str | Path, setting: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(Path(path).expanduser()))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"accm {setting}={str(path)!r}: its tokenizer does not load ({error})") from error


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # a whole CLIP checkpoint makes transformers print every unused vision weight; missing weights are checked here
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _load_weights(model_class: Any, path: str | Path, setting: str, **kwargs: Any) -> torch.nn.Module:
    try:
        with _quiet_transformers():
            model, info = model_class.from_pretrained(str(Path(path).expanduser()), output_loading_info=True,
                                                      dtype=torch.float32, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # SafetensorError: a damaged header
        raise ValueError(f"accm {setting}={str(path)!r}: the {model_class.__name__} weights do not load "
                         f"({error})") from error
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise ValueError(f"accm {setting}={str(path)!r}: the checkpoint does not fill {model_class.__name__}: "
                         f"missing {missing[:5]}, mismatched {mismatched[:5]}")
    return model


def check_caption_decoder(path: str | Path) -> dict[str, Any]:
    """The config.json of a GPT-2 caption decoder directory (checked: directory, config.json, model_type 'gpt2',
    tokenizer files)."""
    return checkpoint_config(path, "caption_decoder_path", GPT2_TYPES, "GPT-2")


def load_caption_decoder(path: str | Path, dropout: float) -> tuple[torch.nn.Module, Any]:
    """(`GPT2LMHeadModel` in float32, its tokenizer) from a local directory, with every dropout of the decoder set to
    `dropout`. The embedding table grows to the tokenizer's length when the tokenizer has tokens the checkpoint has
    no row for (ids past the table would fail at lookup)."""
    from transformers import GPT2LMHeadModel

    check_caption_decoder(path)
    tokenizer = load_tokenizer(path, "caption_decoder_path")
    decoder = _load_weights(GPT2LMHeadModel, path, "caption_decoder_path", attn_implementation="sdpa",
                            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    if len(tokenizer) > decoder.get_input_embeddings().num_embeddings:
        decoder.resize_token_embeddings(len(tokenizer))
    return decoder, tokenizer


def check_clip_text_encoder(path: str | Path) -> dict[str, Any]:
    """The config.json of a CLIP text encoder directory (checked: directory, config.json, model_type 'clip' or
    'clip_text_model', tokenizer files)."""
    return checkpoint_config(path, "selector_encoder_path", CLIP_TEXT_TYPES, "CLIP text")


def load_clip_text_encoder(path: str | Path) -> CLIPTextEncoder:
    """A frozen `CLIPTextEncoder` from a local directory: a whole CLIP model or a `CLIPTextModelWithProjection`
    gives the projected `text_embeds`, a `CLIPTextModel` its pooled output."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = check_clip_text_encoder(path)
    tokenizer = load_tokenizer(path, "selector_encoder_path")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"accm selector_encoder_path={str(path)!r}: its tokenizer has no eos_token; CLIP pools the "
                         "text at its EOS token")
    projected = config["model_type"] == "clip" or "CLIPTextModelWithProjection" in (config.get("architectures") or [])
    model_class = CLIPTextModelWithProjection if projected else CLIPTextModel
    model = _load_weights(model_class, path, "selector_encoder_path", attn_implementation="sdpa")
    pooled_at = model.config.eos_token_id
    # eos_token_id 2 is transformers' marker of the original CLIP configs, which pool at the highest id (the EOS)
    if pooled_at not in (2, tokenizer.eos_token_id):
        raise ValueError(f"accm selector_encoder_path={str(path)!r}: the model pools at eos_token_id={pooled_at} but "
                         f"its tokenizer's EOS is {tokenizer.eos_token_id}")
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if not probe or probe[-1] != tokenizer.eos_token_id:
        raise ValueError(f"accm selector_encoder_path={str(path)!r}: its tokenizer does not end a text with EOS "
                         f"(id {tokenizer.eos_token_id}); CLIP pools the text at its EOS token")
    return CLIPTextEncoder(model, tokenizer)
