"""ACCM's vision-side pruning: PruMerge+-style selection of K visual tokens before the LLM.

Kept tokens = [CLS]-attention outliers (value > Q3 + 1.5 IQR) + the most text-relevant patches +
patches spread evenly over the rest, in raster order. The text-relevant patches have a share of K of their own, as
in ACCM's code (12 of 18 kept tokens): capped at K alone, the outliers (8-16 of 64 patches on the tiny base, about
32 of 576 reported for LLaVA-1.5) would fill every budget ACCM runs at and leave the question no say. The [CLS]
attention is computed for the CLS query row only, from the vision layer's own q/k projections, so the tower can keep
running SDPA.

Two forms of that attention: heads averaged (`single_head=False`, VisionZip's, at the layer LLaVA reads) and one
full-width head (`single_head=True`, PruMerge's and ACCM's: q . k over all C channels scaled by C^-0.5, at the layer
after the one LLaVA reads, see `PruMergePlusPruning`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def prumerge_plus_select(
    cls_attention: torch.Tensor,
    text_relevance: torch.Tensor | None,
    keep: int,
    grid_side: int | None = None,
    text_fraction: float = 2 / 3,
    iqr_factor: float = 1.5,
) -> torch.Tensor:
    """Indices of the K visual tokens to keep, per sample, in raster order.

    Order of filling: outliers of the [CLS] attention (highest first, capped at K less the text share), then
    the text share, round(`text_fraction` K) patches, by text relevance, then the rest spread with a uniform
    stride over the patches not yet chosen.

    Args:
        cls_attention: (B, N) [CLS] -> patch attention at the vision layer LLaVA reads.
        text_relevance: (B, N) relevance of each patch to the question, or None (no text share: the
            outliers may take all of K, the rest is filled evenly).
        keep: K, tokens kept per sample (1 <= K <= N).
        grid_side: side of the patch grid; when given, N must equal grid_side ** 2.
        text_fraction: share of K kept for the most text-relevant patches (ACCM's code: 12 of 18).
        iqr_factor: outlier threshold Q3 + iqr_factor * (Q3 - Q1).

    Returns:
        (B, K) LongTensor of distinct indices, sorted ascending.
    """
    if cls_attention.dim() != 2:
        raise ValueError(f"cls_attention must be (B, N), got {tuple(cls_attention.shape)}")
    batch, num_tokens = cls_attention.shape
    if grid_side is not None and grid_side * grid_side != num_tokens:
        raise ValueError(f"grid_side={grid_side} does not match N={num_tokens} visual tokens")
    if not 1 <= keep <= num_tokens:
        raise ValueError(f"keep must be in [1, {num_tokens}], got {keep}")
    if not 0.0 <= text_fraction <= 1.0:
        raise ValueError(f"text_fraction must be in [0, 1], got {text_fraction}")
    if text_relevance is not None and text_relevance.shape != cls_attention.shape:
        raise ValueError(
            f"text_relevance shape {tuple(text_relevance.shape)} != cls_attention shape {tuple(cls_attention.shape)}"
        )
    attention = cls_attention.detach().float()
    quartiles = torch.quantile(attention, torch.tensor([0.25, 0.75], device=attention.device), dim=1)
    threshold = quartiles[1] + iqr_factor * (quartiles[1] - quartiles[0])
    num_text = 0 if text_relevance is None else min(keep, int(text_fraction * keep + 0.5))
    kept_rows = []
    for b in range(batch):
        chosen = torch.zeros(num_tokens, dtype=torch.bool, device=attention.device)
        outliers = (attention[b] > threshold[b]).nonzero().squeeze(1)
        if len(outliers) > keep - num_text:
            outliers = outliers[attention[b, outliers].topk(keep - num_text).indices]
        chosen[outliers] = True
        if num_text > 0:
            relevance = text_relevance[b].detach().float().masked_fill(chosen, float("-inf"))
            chosen[relevance.topk(num_text).indices] = True
        remaining = (~chosen).nonzero().squeeze(1)
        num_fill = keep - int(chosen.sum())
        if num_fill > 0:
            # Centred uniform stride: floor((i + 0.5) * R / n) is distinct for n <= R.
            slots = ((torch.arange(num_fill, device=attention.device) + 0.5) * len(remaining) / num_fill).long()
            chosen[remaining[slots]] = True
        kept_rows.append(chosen.nonzero().squeeze(1))
    return torch.stack(kept_rows)


def text_relevance_scores(
    visual_tokens: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cosine similarity of each visual token to the real question tokens.

    Both inputs live in the LLM's embedding space (visual tokens after the projector, question
    tokens from the LLM's input embeddings).

    Args:
        visual_tokens: (B, N, D).
        text_embeds: (B, Q, D).
        text_mask: (B, Q) 1 for real question tokens; None = all real.

    Returns:
        (B, N) relevance; 0 for a sample without question tokens.
    """
    if visual_tokens.shape[0] != text_embeds.shape[0] or visual_tokens.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(
            f"visual_tokens {tuple(visual_tokens.shape)} and text_embeds {tuple(text_embeds.shape)} "
            "must share batch and width"
        )
    if text_mask is None:
        text_mask = torch.ones(text_embeds.shape[:2], device=text_embeds.device)
    similarity = F.normalize(visual_tokens.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).transpose(1, 2)
    weights = text_mask.float()[:, None, :]
    return (similarity * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)


def cls_attention_from_layer(layer: nn.Module, hidden_states: torch.Tensor, single_head: bool = False) -> torch.Tensor:
    """[CLS] -> patch attention of one CLIP encoder layer, for the CLS row only.

    Args:
        layer: a transformers `CLIPEncoderLayer` (uses `layer_norm1`, `self_attn.q_proj`,
            `self_attn.k_proj`, `self_attn.num_heads`, `self_attn.head_dim`, `self_attn.scale`).
        hidden_states: (B, 1 + N, C) the layer's input; position 0 is CLS.
        single_head: False: the layer's own heads, softmax per head, averaged over heads (VisionZip's form).
            True: one head over the full width, softmax(q . k * C^-0.5) with q, k the (B, 1 + N, C) projections
            (LLaVA-PruMerge's and ACCM's form, which hook q_proj/k_proj and ignore the head split).

    Returns:
        (B, N) attention probabilities (softmax over CLS + N keys, the CLS column left out).
    """
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden_states)
    batch, length, _ = normed.shape
    query = attention.q_proj(normed[:, :1]).float()
    key = attention.k_proj(normed).float()
    if single_head:
        scores = query @ key.transpose(1, 2) * query.shape[-1] ** -0.5  # (B, 1, 1 + N)
        return scores.softmax(-1)[:, 0, 1:]
    query = query.view(batch, 1, attention.num_heads, attention.head_dim)
    key = key.view(batch, length, attention.num_heads, attention.head_dim)
    scores = torch.einsum("bqhd,bkhd->bhqk", query, key) * attention.scale
    probs = scores.softmax(-1)[:, :, 0]
    return probs.mean(1)[:, 1:]


def cls_attention_to_visual_tokens(layer: nn.Module, hidden_states: torch.Tensor, num_visual: int,
                                   single_head: bool = False) -> torch.Tensor:
    """(B, num_visual) [CLS] attention over the LLM's visual tokens: the patches' (`cls_attention_from_layer`, with
    `single_head`); under the 'full' feature strategy the [CLS] token is itself the first visual token, and it ranks
    above every patch (the token the attention comes from)."""
    patches = cls_attention_from_layer(layer, hidden_states, single_head=single_head)
    extra = num_visual - patches.shape[1]
    if extra < 0 or extra > 1:
        raise ValueError(f"{num_visual} visual tokens from a vision layer with {patches.shape[1]} patches: expected "
                         "the patches ('default' feature strategy) or [CLS] + patches ('full')")
    if extra == 0:
        return patches
    top = patches.max(1, keepdim=True).values + 1.0
    return torch.cat([top, patches], 1)


@torch.no_grad()
def cls_attention_from_vision_tower(
    vision_tower: nn.Module,
    pixel_values: torch.Tensor,
    layer_index: int,
) -> torch.Tensor:
    """[CLS] -> patch attention of a `CLIPVisionModel` layer, heads averaged.

    Runs the embeddings and the layers before `layer_index` as the tower does (any attention
    implementation), then only the CLS query row of that layer's attention.

    Args:
        vision_tower: a transformers `CLIPVisionModel` (e.g. `llava.model.vision_tower`).
        pixel_values: (B, 3, H, W).
        layer_index: index into the tower's encoder layers, negative from the end. With LLaVA's
            `vision_feature_layer=-2`, pass -2: the layer whose output LLaVA reads.

    Returns:
        (B, N) attention probabilities (no CLS column).
    """
    tower = getattr(vision_tower, "vision_model", vision_tower)
    layers = tower.encoder.layers
    if not -len(layers) <= layer_index < len(layers):
        raise ValueError(f"layer_index={layer_index} out of range for {len(layers)} vision layers")
    index = layer_index % len(layers)
    dtype = tower.embeddings.patch_embedding.weight.dtype
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(dtype)))
    for layer in layers[:index]:
        hidden = layer(hidden, None)
    return cls_attention_from_layer(layers[index], hidden)
