"""Running a pruning method (training-free or compensated) on a batch, and the cost accounting of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lvlm_prune.engine import PrunedLlava, PruningMethod
from lvlm_prune.flops import llava_prefill_report


@dataclass
class GenerationResult:
    """Greedy answers of one batch and what they cost.

    Args:
        tokens: (B, T) generated token ids (padded after EOS).
        visual_tokens_per_layer: (B, num_layers) visual tokens each sample had in each decoder layer.
        text_tokens: (B,) non-visual prompt tokens prefilled by the LLM (spliced captions included).
        plugin_flops: name -> (B,) FLOPs of the method's own modules per sample.
        vision_crops: images the vision tower encoded per sample (LLaVA-NeXT's anyres crops); None: one each.
    """

    tokens: torch.Tensor
    visual_tokens_per_layer: torch.Tensor
    text_tokens: torch.Tensor
    plugin_flops: dict[str, torch.Tensor] = field(default_factory=dict)
    vision_crops: list[int] | None = None


def vision_crops(config: Any, image_sizes: torch.Tensor | None) -> list[int] | None:
    """Crops the vision tower encodes per sample: LLaVA-NeXT's base crop + its anyres grid, from each image's size."""
    if image_sizes is None or getattr(config, "model_type", "llava") != "llava_next":
        return None
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [image_size_to_num_patches(tuple(size), config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes.tolist()]


def prompt_text_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B,) real non-visual tokens of left-padded prompts."""
    return ((attention_mask > 0) & (input_ids != image_token_id)).sum(1)


def generate_with_method(
    engine: PrunedLlava,
    batch: dict[str, Any],
    method: PruningMethod,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
) -> GenerationResult:
    tokens, counts = engine.generate(
        batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"],
        position_ids=batch.get("prompt_position_ids"), method=method, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, image_sizes=batch.get("image_sizes"),
    )
    text = prompt_text_tokens(batch["prompt_input_ids"], batch["prompt_attention_mask"], engine.image_token_id)
    plugin = {name: torch.full_like(text, value, dtype=torch.float)
              for name, value in method.plugin_flops(int(text.float().mean().round())).items()}
    return GenerationResult(tokens, counts, text, plugin, vision_crops(engine.config, batch.get("image_sizes")))


def per_sample_flops(config: Any, result: GenerationResult, convention: str = "fastv") -> list[dict[str, float]]:
    """Prefill FLOPs of each sample of a batch (LLM in `convention`; vision, projector, plug-ins exact). Every
    vision layer is charged: the engine encodes images with the model's stock `get_image_features`, which runs the
    whole tower and then reads `vision_feature_layer` (LLaVA-1.5's -2 leaves the last layer's output unused)."""
    reports = []
    for b in range(result.tokens.shape[0]):
        plugins = {name: float(values[b]) for name, values in result.plugin_flops.items()}
        report = llava_prefill_report(
            config, float(result.text_tokens[b]), result.visual_tokens_per_layer[b].tolist(),
            convention=convention, plugins=plugins, run_all_vision_layers=True,
            num_images=result.vision_crops[b] if result.vision_crops is not None else 1,
        )
        reports.append(report.to_metrics())
    return reports
