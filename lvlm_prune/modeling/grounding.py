"""Attention grounding: an auxiliary loss that points chosen attention heads at an answer's visual evidence.

Used only to train the embedded default's base from scratch, where the data generator knows which visual tokens
each answer depends on. It supervises the language model's lookup of the right objects among the visual tokens
directly (docs/findings.md: the heads learn it, yet accuracy moves between question families rather than up). For each answer turn with
evidence, at the position that predicts the answer's first token, it takes the chosen heads' attention over the
whole visible sequence and adds `-log(attention mass on the evidence tokens)`. It reads the layer's own input
(projections, rotary embedding, mask) through the engine's `attention_rows`, so it is the attention the layer really
computes, whichever attention implementation runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lvlm_prune.engine.attention import attention_rows
from lvlm_prune.engine.state import gather_rows


@dataclass(frozen=True)
class GroundingQuery:
    """One supervised lookup: in batch row `row`, the position `query` should attend to `evidence` positions."""

    row: int
    query: int
    evidence: tuple[int, ...]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The language model's decoder layers of a `LlavaForConditionalGeneration`."""
    return model.model.language_model.layers


class AttentionGrounding:
    """Captures the inputs of chosen layers' self-attention during a forward pass and scores their heads.

    Args:
        model: a `LlavaForConditionalGeneration` with a Llama-style language model.
        layers: decoder layer indices whose heads are supervised.
        heads: query-head indices supervised in each of those layers.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[int], heads: Sequence[int]):
        blocks = decoder_layers(model)
        num_heads = model.config.text_config.num_attention_heads
        bad_layers = [i for i in layers if not 0 <= i < len(blocks)]
        bad_heads = [h for h in heads if not 0 <= h < num_heads]
        if not layers or bad_layers:
            raise ValueError(f"grounding layers {list(layers)}: each must be in [0, {len(blocks)})")
        if not heads or bad_heads:
            raise ValueError(f"grounding heads {list(heads)}: each must be in [0, {num_heads})")
        self.model, self.layers, self.heads = model, list(layers), list(heads)
        self._inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    @contextmanager
    def capturing(self):
        """Within the block, forward passes record the supervised layers' attention inputs."""
        self._inputs.clear()
        handles = [
            decoder_layers(self.model)[i].self_attn.register_forward_pre_hook(self._recorder(i), with_kwargs=True)
            for i in self.layers
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _recorder(self, index: int):
        def record(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self._inputs[index] = (hidden, kwargs["position_embeddings"])
        return record

    def attention(self, index: int, queries: Sequence[GroundingQuery], attention_mask: torch.Tensor) -> torch.Tensor:
        """(len(queries), len(heads), T): the supervised heads' attention probabilities at each query position."""
        if index not in self._inputs:
            raise RuntimeError(f"no forward pass of layer {index} was captured; run the model inside capturing()")
        normed, (cos, sin) = self._inputs[index]
        batch, length = attention_mask.shape[0], attention_mask.shape[-1]
        # without explicit position_ids the rotary tables have batch size 1
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        rows = torch.tensor([q.row for q in queries], device=normed.device)
        positions = torch.tensor([q.query for q in queries], device=normed.device)
        is_query = torch.zeros(batch, length, dtype=torch.bool, device=normed.device)
        is_query[rows, positions] = True
        query_index, _ = gather_rows(torch.arange(length, device=normed.device).expand(batch, -1), is_query, 1)
        if attention_mask.ndim == 4:  # packed rows (`lvlm_prune.data.pack_teacher_forced`): already (B, 1, T, T)
            allowed = attention_mask[:, 0].bool()
        else:
            allowed = torch.ones(length, length, dtype=torch.bool, device=normed.device).tril() & attention_mask.bool()[:, None]
        bias = torch.zeros(batch, 1, length, length, device=normed.device)
        bias = bias.masked_fill(~allowed[:, None], torch.finfo(bias.dtype).min)
        probabilities = attention_rows(decoder_layers(self.model)[index], normed, (cos, sin), query_index, bias)
        slots = (is_query.cumsum(1) - 1)[rows, positions]  # each query's row in query_index
        return probabilities[rows, :, slots][:, self.heads]

    def evidence_mass(self, index: int, queries: Sequence[GroundingQuery], attention_mask: torch.Tensor) -> torch.Tensor:
        """(len(queries), len(heads)): the supervised heads' attention mass on each query's evidence at layer `index`."""
        evidence = torch.zeros(len(queries), attention_mask.shape[-1], dtype=torch.bool, device=attention_mask.device)
        for k, query in enumerate(queries):
            evidence[k, list(query.evidence)] = True
        return (self.attention(index, queries, attention_mask) * evidence[:, None, :]).sum(-1)

    def loss(self, queries: Sequence[GroundingQuery], attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean over layers, queries and heads of -log(attention mass on the evidence); 0 when no query."""
        if not queries:
            return torch.zeros((), device=attention_mask.device)
        terms = [-torch.log(self.evidence_mass(index, queries, attention_mask).clamp_min(1e-6)).mean()
                 for index in self.layers]
        return torch.stack(terms).mean()


def grounding_queries(batch: dict) -> list[GroundingQuery]:
    """The batch's supervised lookups (`VQACollator` adds `grounding` when its examples carry evidence)."""
    return [GroundingQuery(*entry) for entry in batch.get("grounding", ())]
