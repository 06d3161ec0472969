"""Attention probabilities for a few query rows, from a decoder layer's own projections.

Scoring signals (last token -> image, question -> image) need attention probabilities of one layer for a
handful of query rows. Computing them here from the layer's q/k projections (with RoPE and grouped-query
heads) lets the model itself run SDPA or flash attention: no layer has to fall back to eager attention.
"""

from __future__ import annotations

import sys

import torch


def rotary_fn(attention_module: torch.nn.Module):
    """`apply_rotary_pos_emb` of the module's own model family (Llama, Mistral, Qwen2, ...)."""
    module = sys.modules[type(attention_module).__module__]
    if not hasattr(module, "apply_rotary_pos_emb"):
        raise TypeError(f"{type(attention_module).__name__} has no apply_rotary_pos_emb in its module")
    return module.apply_rotary_pos_emb


def layer_keys(layer: torch.nn.Module, normed: torch.Tensor, position_embeddings) -> torch.Tensor:
    """(B, kv_heads, T, head_dim) RoPE'd keys of the layer for the normed hidden states (B, T, d)."""
    attn = layer.self_attn
    b, t, _ = normed.shape
    keys = attn.k_proj(normed).view(b, t, -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    _, keys = rotary_fn(attn)(keys, keys, cos, sin)
    return keys


def attention_rows(
    layer: torch.nn.Module,
    normed: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    attention_bias: torch.Tensor,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities of the selected query rows, per head.

    Args:
        layer: a decoder layer with `self_attn.{q_proj,k_proj,head_dim,scaling}`.
        normed: (B, T, d) the layer's input after its input norm.
        position_embeddings: (cos, sin), each (B, T, head_dim), as the layer receives them.
        query_index: (B, Q) long, rows to compute.
        attention_bias: (B, 1, T, T) additive mask the layer itself uses.
        keys: the layer's RoPE'd keys (`layer_keys`), when the caller already has them.

    Returns:
        (B, heads, Q, T) float32 probabilities.
    """
    attn = layer.self_attn
    b, t, _ = normed.shape
    rows = normed.gather(1, query_index[..., None].expand(-1, -1, normed.shape[-1]))
    queries = attn.q_proj(rows).view(b, rows.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    row_cos = cos.gather(1, query_index[..., None].expand(-1, -1, cos.shape[-1]))
    row_sin = sin.gather(1, query_index[..., None].expand(-1, -1, sin.shape[-1]))
    queries, _ = rotary_fn(attn)(queries, queries, row_cos, row_sin)
    keys = layer_keys(layer, normed, position_embeddings) if keys is None else keys
    groups = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    scores = torch.matmul(queries.float(), keys.float().transpose(2, 3)) * attn.scaling
    bias = attention_bias[:, 0].gather(1, query_index[..., None].expand(-1, -1, t))  # (B, Q, T)
    # a float64 model's mask value is -inf in float32: a fully masked row (a padding query) would give NaN
    scores = scores + bias[:, None].float().clamp(min=torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=-1)
