"""Greedy decoding with the stock model (the reference the pruned engine is checked against)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from lvlm_prune.modeling.compat import cache_argument, output_cache


@torch.no_grad()
def stock_greedy_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    max_new_tokens: int = 8,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> torch.Tensor:
    """Greedy tokens (B, T<=max_new_tokens) from a left-padded prompt; rows that ended are padded.

    Position ids are passed explicitly (default: cumsum of the mask) so that tokens hidden through
    `attention_mask` keep their original positions, as in the pruned engine.
    """
    if position_ids is None:
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config.get_text_config())
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        pixel_values=pixel_values, use_cache=True, logits_to_keep=1, **cache_argument(cache),
    )
    next_position = position_ids.max(1, keepdim=True).values + 1
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        if eos_token_id is not None:
            finished |= token == eos_token_id
        if finished.all() or step == max_new_tokens - 1:  # the last token needs no forward of its own
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        out = model(
            input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
            use_cache=True, **cache_argument(output_cache(out)),
        )
        next_position = next_position + 1
    return torch.stack(tokens, 1)
