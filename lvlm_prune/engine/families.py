"""How each supported LLaVA family turns images into the visual tokens its LLM reads.

The engine runs the decoder the same way for every family; only the visual side differs. LLaVA-1.5 gives every
image the same N tokens (one CLIP grid). LLaVA-NeXT ("anyres") encodes a base crop plus a grid of crops picked from
the image's size, unpads the grid to the image's aspect ratio and ends every grid row with an `image_newline`
token, so each image gives its own number of tokens. Both adapters return the tokens zero-padded to the batch's
longest sample together with each sample's count, so the engine has one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence


@dataclass
class VisualTokens:
    """Projected visual tokens of a batch: what the stock forward scatters into the image-token positions.

    Args:
        features: (B, N_max, d); sample b's tokens are rows [0, counts[b]), the rest is zero padding.
        counts: (B,) long, visual tokens of each sample.
        vision_hidden_states: the vision tower's hidden states (embeddings + each layer's output, (B, 1 + N, C)),
            or () where they do not line up with the visual tokens (LLaVA-NeXT: one entry per anyres crop).
    """

    features: torch.Tensor
    counts: torch.Tensor
    vision_hidden_states: tuple[torch.Tensor, ...]


class LlavaVisual:
    """LLaVA-1.5 (`LlavaForConditionalGeneration`): one CLIP crop per image, the same N tokens for every image."""

    varying_visual_tokens = False

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config

    def max_visual_tokens(self) -> int:
        """N: the CLIP patch grid, plus [CLS] under the 'full' feature strategy."""
        vision = self.config.vision_config
        n_patches = (vision.image_size // vision.patch_size) ** 2
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        return n_patches if strategy == "default" else n_patches + 1

    def encode(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> VisualTokens:
        """`pixel_values` (B, 3, H, W); `image_sizes` is not used by this family."""
        out = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True,
                                                  output_hidden_states=True)
        features = out.pooler_output
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        counts = torch.full((features.shape[0],), features.shape[1], dtype=torch.long, device=features.device)
        return VisualTokens(features, counts, tuple(out.hidden_states or ()))


class LlavaNextVisual(LlavaVisual):
    """LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres crops packed with `image_newline` tokens, a
    different number of tokens per image (one image per sample)."""

    varying_visual_tokens = True

    def max_visual_tokens(self) -> int:
        """The most tokens one image can give: the base crop plus the largest crop grid of the config's pinpoints
        (unpadding only removes rows or columns), with one newline token per grid row."""
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        base = super().max_visual_tokens()
        grid = max((height // vision.image_size * side) * (width // vision.image_size * side + 1)
                   for height, width in self.config.image_grid_pinpoints)
        return base + grid

    def encode(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> VisualTokens:
        """`pixel_values` (B, crops, 3, H, W) and `image_sizes` (B, 2) (height, width), as the processor gives them.
        The vision tower's hidden states are not returned: they are per crop, before unpadding and newlines."""
        if image_sizes is None:
            raise ValueError("llava_next: pass image_sizes (B, 2) with pixel_values, as its processor returns them")
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True)
        tokens = list(out.pooler_output)
        counts = torch.tensor([t.shape[0] for t in tokens], dtype=torch.long, device=tokens[0].device)
        return VisualTokens(pad_sequence(tokens, batch_first=True), counts, ())


def visual_family(model: torch.nn.Module) -> LlavaVisual:
    """The adapter for `model`: LLaVA-NeXT by `config.model_type`, LLaVA-1.5's single-grid path otherwise."""
    return LlavaNextVisual(model) if model.config.model_type == "llava_next" else LlavaVisual(model)
