"""transformers 5.24 renamed the KV cache's argument and output field from `past_key_values` to `cache` (the old
name is deprecated there, to be removed in 5.40). The project runs on both sides of the rename."""

from __future__ import annotations

import inspect
from typing import Any

from transformers.models.llama.modeling_llama import LlamaDecoderLayer

# the installed version's name, read from a model's signature (the rename covers every model at once)
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


def cache_argument(cache: Any) -> dict[str, Any]:
    """`{name: cache}` to pass a KV cache to a model's or a decoder layer's forward."""
    return {CACHE_ARGUMENT: cache}


def output_cache(output: Any) -> Any:
    """The KV cache a model's forward returned."""
    return getattr(output, CACHE_ARGUMENT)
