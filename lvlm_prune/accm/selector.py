"""ACCM's candidate selector.

Each candidate caption is encoded as `"Question: <q> Supplemental information: <caption>"` by a
frozen text encoder (mean of a language model's last hidden states over the real tokens, or a CLIP
text encoder's pooled output); a small transformer over the M candidate features of a sample scores
them, and the argmax is spliced into the LVLM prompt.
The transformer has no position embedding: the candidates are a set, and the scores permute with
them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


class CandidateSelector(nn.Module):
    """Scores the M candidates of each sample from their text features.

    Args:
        text_dim: width of the frozen text encoder's features.
        hidden: width of the selector transformer.
        num_layers: transformer layers over the candidates.
        num_heads: attention heads.
        dropout: dropout inside the transformer.
        gate: also a gate head that reads the candidates as a whole (mean over the real ones after the transformer)
            and gives one logit per sample: splice the picked caption (> 0) or none. It starts at 0, undecided.
        gate_scale: fixed factor on the gate's logit. Under Adam a weight moves about one learning rate per step
            whatever its gradient, so the factor is the gate's learning rate relative to the selector's: the gate
            learns one decision per sample from a few hundred steps of a decaying rate, which at 1 leaves it near 0.
    """

    def __init__(
        self,
        text_dim: int,
        hidden: int = 128,
        num_layers: int = 1,
        num_heads: int = 4,
        dropout: float = 0.0,
        gate: bool = False,
        gate_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden={hidden} is not divisible by num_heads={num_heads}")
        self.input_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden))
        layer = nn.TransformerEncoderLayer(
            hidden, num_heads, dim_feedforward=4 * hidden, dropout=dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.score_head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 1))
        if gate_scale <= 0:
            raise ValueError(f"gate_scale={gate_scale} must be > 0")
        self.gate_scale = gate_scale
        self.gate_head = None
        if gate:
            self.gate_head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 1))
            nn.init.zeros_(self.gate_head[1].weight)
            nn.init.zeros_(self.gate_head[1].bias)

    def forward(self, features: torch.Tensor, candidate_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            features: (B, M, text_dim) candidate features.
            candidate_mask: (B, M) True for real candidates; None = all real.

        Returns:
            (B, M) scores; -inf for masked candidates (a row with no real candidate is all -inf,
            never NaN).
        """
        return self.scores_and_gate(features, candidate_mask, with_gate=False)[0]

    def scores_and_gate(self, features: torch.Tensor, candidate_mask: torch.Tensor | None = None,
                        with_gate: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, M) scores as `forward`, and (B,) gate logits (None when `with_gate` is False)."""
        if with_gate and self.gate_head is None:
            raise ValueError("this selector has no gate head (build it with gate=True)")
        batch, num_candidates, _ = features.shape
        if candidate_mask is None:
            candidate_mask = torch.ones(batch, num_candidates, dtype=torch.bool, device=features.device)
        candidate_mask = candidate_mask.bool()
        if candidate_mask.shape != (batch, num_candidates):
            raise ValueError(
                f"candidate_mask shape {tuple(candidate_mask.shape)} does not match features {(batch, num_candidates)}"
            )
        # A row with every key masked would give NaN attention; let it attend normally (its scores
        # are set to -inf below anyway).
        key_padding = ~candidate_mask & candidate_mask.any(1, keepdim=True)
        x = self.input_proj(features.to(self.input_proj[1].weight.dtype))
        x = self.encoder(x, src_key_padding_mask=key_padding)
        scores = self.score_head(x).squeeze(-1).masked_fill(~candidate_mask, float("-inf"))
        if not with_gate:
            return scores, None
        real = candidate_mask[..., None].to(x.dtype)
        pooled = (x * real).sum(1) / real.sum(1).clamp_min(1)
        return scores, self.gate_scale * self.gate_head(pooled).squeeze(-1)


class GatedSelectorView(nn.Module):
    """The selector's scores and gate as one forward (what FLOPs counting runs)."""

    def __init__(self, selector: CandidateSelector) -> None:
        super().__init__()
        self.selector = selector

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.selector.scores_and_gate(features)


class MeanPooledTextEncoder:
    """A frozen text encoder: mean of the last hidden states over the real tokens, without grad.

    It holds a reference to the model and is not an `nn.Module`, so the encoder's weights never
    become selector parameters (nor enter its optimiser or exported weights).

    Args:
        model: a transformers encoder or decoder (e.g. the LVLM's own `language_model`, or a
            `*ForCausalLM`), or an `nn.Embedding` for the cheapest bag-of-embeddings encoder.
        batch_size: encode at most this many sequences per call of the model; None = all at once.
    """

    def __init__(self, model: nn.Module, batch_size: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.model = model
        self.batch_size = batch_size

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, nn.Embedding):
            return self.model(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)
        return hidden if hidden is not None else out.hidden_states[-1]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Args:
            input_ids: (N, L) token ids.
            attention_mask: (N, L) 1 for real tokens.

        Returns:
            (N, dim) float32 features.
        """
        step = self.batch_size or max(len(input_ids), 1)
        pooled = []
        for start in range(0, len(input_ids), step):
            ids = input_ids[start:start + step]
            mask = attention_mask[start:start + step]
            hidden = self._hidden(ids, mask).float()
            weights = mask.to(hidden.dtype)[..., None]
            pooled.append((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))
        return torch.cat(pooled, 0)


class CLIPTextEncoder:
    """A frozen CLIP text encoder with its own tokenizer: texts in, pooled features out (the projected `text_embeds`
    of a `CLIPTextModelWithProjection`, the EOS-pooled output of a `CLIPTextModel`), without grad.

    Like `MeanPooledTextEncoder` it is not an `nn.Module`: the encoder stays out of the plug-in's parameters, its
    optimiser and its exported weights (it is reloaded from its path). It follows the inputs to their device.

    Args:
        model: a transformers `CLIPTextModel` or `CLIPTextModelWithProjection`; frozen and put in eval mode here.
        tokenizer: its tokenizer; it must add BOS and EOS (CLIP pools at EOS). Texts are right-padded and cut to the
            model's `max_position_embeddings`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        projection = getattr(model, "text_projection", None)
        config = model.config
        self.hidden_size, self.intermediate_size = config.hidden_size, config.intermediate_size
        self.num_layers = config.num_hidden_layers
        self.projection_dim = projection.out_features if projection is not None else None
        self.width = self.projection_dim or self.hidden_size
        self.max_length = config.max_position_embeddings

    def tokenize(self, texts: Sequence[str] | Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L) ids and (N, L) mask of `texts`, with the tokenizer's BOS/EOS, right-padded, cut to max_length.

        A text given as (head, tail) is cut in its head: the tail (the selector's candidate caption, which is where
        the M inputs of one question differ) is kept whole as long as it fits by itself."""
        if not texts or isinstance(texts[0], str):
            encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                     padding_side="right", return_tensors="pt")
            return encoded["input_ids"], encoded["attention_mask"]
        budget = self.max_length - 2  # BOS and EOS
        rows = []
        for head, tail in texts:
            tail_ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"][:budget]
            head_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"][:budget - len(tail_ids)]
            rows.append([self.tokenizer.bos_token_id, *head_ids, *tail_ids, self.tokenizer.eos_token_id])
        padded = self.tokenizer.pad({"input_ids": rows}, padding=True, padding_side="right", return_tensors="pt")
        return padded["input_ids"], padded["attention_mask"]

    @torch.no_grad()
    def __call__(self, texts: Sequence[str] | Sequence[tuple[str, str]],
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            texts: N strings, or N (head, tail) pairs cut in the head (`tokenize`).
            device: where the features go (the model moves there on first use); None = the model's device.

        Returns:
            (N, width) float32 features and (N,) token counts (BOS and EOS included).
        """
        ids, mask = self.tokenize(texts)
        parameter = next(self.model.parameters())
        device = parameter.device if device is None else torch.device(device)
        if parameter.device != device:
            self.model.to(device)
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device))
        features = out.text_embeds if self.projection_dim is not None else out.pooler_output
        return features.float(), mask.sum(1).to(device)

    def flops(self, tokens: float) -> float:
        """Forward FLOPs on one text of `tokens` tokens, counted like the vision tower (2 per multiply-add, the full
        T x T attention SDPA computes): per layer q/k/v/o `8 T D^2`, attention `4 T^2 D`, MLP `4 T D I`; plus the
        text projection `2 D P` on the pooled token. Embedding lookups, norms and activations count 0."""
        t, d = float(tokens), self.hidden_size
        per_layer = 8 * t * d * d + 4 * t * t * d + 4 * t * d * self.intermediate_size
        projection = 2 * d * self.projection_dim if self.projection_dim is not None and t > 0 else 0
        return float(self.num_layers * per_layer + projection)


def build_selector_inputs(
    question_ids: Sequence[torch.Tensor],
    candidate_ids: torch.Tensor,
    question_prefix_ids: Sequence[int] | torch.Tensor,
    supplement_prefix_ids: Sequence[int] | torch.Tensor,
    pad_token_id: int,
    eos_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of `"Question: <q> Supplemental information: <candidate>"` for every candidate.

    Candidate padding (and EOS, when given) are stripped. The rows are right-padded, so a causal
    encoder's real tokens never see padding.

    Args:
        question_ids: B 1-D tensors, the question tokens of each sample (no padding).
        candidate_ids: (B, M, T) candidate captions as returned by the caption model.
        question_prefix_ids: ids of "Question:" (prepend BOS here if the encoder wants one).
        supplement_prefix_ids: ids of "Supplemental information:".
        pad_token_id: pad id of the candidates and of the output.
        eos_token_id: EOS id to strip from the candidates; None keeps EOS.

    Returns:
        ids (B * M, L) and mask (B * M, L), sample-major (row b * M + m).
    """
    if candidate_ids.dim() != 3:
        raise ValueError(f"candidate_ids must be (B, M, T), got {tuple(candidate_ids.shape)}")
    batch, num_candidates, _ = candidate_ids.shape
    if len(question_ids) != batch:
        raise ValueError(f"question_ids has {len(question_ids)} entries for a batch of {batch}")
    device = candidate_ids.device
    question_prefix = torch.as_tensor(question_prefix_ids, dtype=torch.long, device=device).reshape(-1)
    supplement_prefix = torch.as_tensor(supplement_prefix_ids, dtype=torch.long, device=device).reshape(-1)
    rows = []
    for b in range(batch):
        head = torch.cat([question_prefix, question_ids[b].to(device=device, dtype=torch.long).reshape(-1),
                          supplement_prefix])
        for m in range(num_candidates):
            caption = candidate_ids[b, m]
            keep = caption != pad_token_id
            if eos_token_id is not None:
                keep &= caption != eos_token_id
            rows.append(torch.cat([head, caption[keep]]))
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask
