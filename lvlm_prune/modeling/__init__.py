"""Building, loading and describing base LVLMs (transformers LLaVA family)."""

from lvlm_prune.modeling.tiny import TinyLlavaSpec, build_tiny_llava

__all__ = ["TinyLlavaSpec", "build_tiny_llava"]
