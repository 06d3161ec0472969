"""A small LLaVA-architecture model built from config (no download).

It is the same class as LLaVA-1.5 (`LlavaForConditionalGeneration`: CLIP vision tower, two-layer
GELU projector, Llama decoder), only smaller, so every code path that runs on it runs on the real
checkpoint too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration


RESIDUAL_INITS = ("normal", "zero")
# parameters that write a block's output into the residual stream (Llama and CLIP names)
_RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")


@dataclass
class TinyLlavaSpec:
    """Shape of a tiny LLaVA model.

    Args:
        image_size: input resolution in pixels (square).
        patch_size: ViT patch size; visual tokens = (image_size / patch_size) ** 2.
        vision_hidden_size: CLIP width.
        vision_layers: CLIP depth.
        vision_heads: CLIP attention heads.
        hidden_size: Llama width.
        intermediate_size: Llama SwiGLU width.
        num_layers: Llama depth. Layer-averaged budgets need depth: with the first pruning layer
            at index k, at most a fraction 1 - k / num_layers of visual tokens can be removed.
        num_heads: Llama query heads.
        num_kv_heads: Llama key/value heads (fewer than num_heads = grouped-query attention).
        max_position_embeddings: longest sequence.
        vision_feature_layer: which CLIP layer LLaVA reads (-2 in LLaVA-1.5).
        initializer_range: std of the normal initialisation of the Llama tower's and the projector's weights and
            of CLIP's patch and position embeddings (CLIP's encoder layers keep CLIP's own width-scaled scheme); None
            = 1 / sqrt(width) per tower. transformers' default 0.02 suits widths near 768: at width 128 it shrinks
            every linear layer's output about 4x, attention logits start near zero and learning to attend crawls.
        residual_init: 'normal' (as transformers initialises) or 'zero': the projections that write into the
            residual stream (attention output, MLP down/fc2, in both towers) start at zero, so every block starts as
            the identity. Trained from scratch, a 12-layer LLM then learns to find an object among the visual tokens
            as fast as a 1-layer one (docs/findings.md); random test fixtures keep 'normal' (zeroed blocks would
            make every layer a no-op).
    """

    image_size: int = 64
    patch_size: int = 8
    vision_hidden_size: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 12
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    vision_feature_layer: int = -1
    initializer_range: float | None = None
    residual_init: str = "normal"

    def __post_init__(self) -> None:
        if self.residual_init not in RESIDUAL_INITS:
            raise ValueError(f"spec.residual_init={self.residual_init!r}; choose one of {RESIDUAL_INITS}")

    @property
    def num_visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def build_tiny_llava_config(
    spec: TinyLlavaSpec,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> LlavaConfig:
    if spec.image_size % spec.patch_size:
        raise ValueError(
            f"image_size={spec.image_size} is not a multiple of patch_size={spec.patch_size}"
        )
    if not 0 <= image_token_id < vocab_size:
        raise ValueError(f"image_token_id={image_token_id} outside vocab_size={vocab_size}")
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=4 * spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
        initializer_range=spec.initializer_range or spec.vision_hidden_size**-0.5,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
        initializer_range=spec.initializer_range or spec.hidden_size**-0.5,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=spec.num_visual_tokens,
        tie_word_embeddings=False,
    )


def build_tiny_llava(
    spec: TinyLlavaSpec,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    attn_implementation: str = "sdpa",
    seed: int | None = None,
) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA (fp32). A fresh config each call: `_from_config` writes
    the attention implementation into the config object it is given."""
    import torch

    config = build_tiny_llava_config(
        spec, vocab_size, image_token_id, pad_token_id, bos_token_id, eos_token_id
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    if spec.residual_init == "zero":
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(_RESIDUAL_OUTPUTS) and ".layers." in name:
                    parameter.zero_()
    return model.float()


GROWTH_PLACEMENTS = ("spread", "bottom")


def grown_layer_positions(old_layers: int, new_layers: int, placement: str = "spread") -> list[int]:
    """Where the trained layers of an `old_layers`-deep LLM sit in the grown `new_layers`-deep one.

    'spread': evenly, first at 0 (4 -> 12: 0, 3, 6, 9), each followed by new layers; 'bottom': 0 .. old - 1.
    """
    if placement not in GROWTH_PLACEMENTS:
        raise ValueError(f"growth placement={placement!r}; choose one of {GROWTH_PLACEMENTS}")
    if not 1 <= old_layers <= new_layers:
        raise ValueError(f"cannot grow a {old_layers}-layer LLM to {new_layers} layers")
    if placement == "bottom":
        return list(range(old_layers))
    return [i * new_layers // old_layers for i in range(old_layers)]


def grow_llava_depth(
    model: LlavaForConditionalGeneration, num_layers: int, placement: str = "spread", seed: int | None = None
) -> LlavaForConditionalGeneration:
    """A deeper copy of `model` that computes exactly the same function (progressive depth growth).

    The trained decoder layers move to `grown_layer_positions`; every new layer is freshly initialised with its
    residual output projections at zero, so it starts as the identity; everything else is copied. Training a
    shallow LLM and growing it lets a CPU budget buy several times more optimisation steps (docs/findings.md).
    """
    import copy

    import torch

    text = model.config.text_config
    positions = grown_layer_positions(text.num_hidden_layers, num_layers, placement)
    config = copy.deepcopy(model.config)
    config.text_config.num_hidden_layers = num_layers
    if seed is not None:
        torch.manual_seed(seed)
    grown = LlavaForConditionalGeneration._from_config(config, attn_implementation=model.config._attn_implementation)
    grown = grown.to(dtype=model.dtype)
    source = {position: old for old, position in enumerate(positions)}
    old_state = model.state_dict()
    prefix = "model.language_model.layers."
    with torch.no_grad():
        for name, parameter in grown.state_dict().items():
            if name.startswith(prefix):
                index, rest = name[len(prefix):].split(".", 1)
                if int(index) in source:
                    parameter.copy_(old_state[f"{prefix}{source[int(index)]}.{rest}"])
                elif name.endswith(_RESIDUAL_OUTPUTS):
                    parameter.zero_()
            else:
                parameter.copy_(old_state[name])
    return grown
