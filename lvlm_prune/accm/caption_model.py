"""ACCM's lightweight caption model (ClipCap-style prefix captioning).

A small GPT-2 decoder reads `[instruction tokens ; P prefix embeddings ; caption tokens]`. The P
prefix embeddings come from a small transformer mapper over the visual tokens that pruning
*discarded*: what was removed is what the caption has to carry back into the LVLM prompt. A decoder
built here shares the LVLM tokenizer's vocabulary, so its captions are spliced as token ids; a
pretrained GPT-2 passed in keeps its own vocabulary (the caller translates captions through text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from lvlm_prune.modeling.compat import cache_argument, output_cache


def pack_padding(ids: torch.Tensor, mask: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Moves the padding of each row to one side, keeping the real tokens in order.

    Args:
        ids: (B, L) token ids, or any (B, L, ...) per-position tensor (e.g. embeddings).
        mask: (B, L) 1 for real tokens, 0 for padding.
        side: "left" (real tokens at the end of the row) or "right" (real tokens first).

    Returns:
        (ids, mask) with the same shapes.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    real = mask.bool().long()
    key = real if side == "left" else 1 - real
    order = torch.sort(key, dim=1, stable=True).indices
    index = order.view(*order.shape, *([1] * (ids.dim() - 2))).expand_as(ids)
    return ids.gather(1, index), mask.gather(1, order)


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift them."""
    return (mask.long().cumsum(1) - 1).clamp_min(0)


class PrefixMapper(nn.Module):
    """Maps a variable number of discarded visual tokens to prefix embeddings.

    mode 'queries' (ClipCap): P learned queries and the projected visual tokens go through a small
    transformer encoder together; the outputs at the query positions are the prefix. The queries are
    never masked, so a sample with no (or only padded) discarded tokens still gets a finite prefix.
    The queries depend on nothing but training, and the mapper does not see the question: on the
    embedded default they attended almost uniformly to every discarded token, and the prefix was
    nearly the same for every image.
    mode 'tokens': the encoder's outputs at the visual tokens are the prefix (one embedding per
    discarded token, padding masked), so the caption decoder attends to each of them with the
    instruction in view; `prefix_length` is unused.

    Args:
        visual_dim: width of the visual tokens (the LLM width when they are taken after the
            projector).
        embed_dim: width of the caption decoder.
        prefix_length: number of prefix embeddings P.
        num_layers: transformer layers of the mapper.
        num_heads: attention heads of the mapper.
        dropout: dropout inside the mapper.
        mode: 'queries' or 'tokens' (above).
    """

    def __init__(
        self,
        visual_dim: int,
        embed_dim: int,
        prefix_length: int = 8,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.0,
        mode: str = "queries",
    ) -> None:
        super().__init__()
        if mode not in ("queries", "tokens"):
            raise ValueError(f"prefix mapper mode={mode!r}; choose 'queries' or 'tokens'")
        if mode == "queries" and prefix_length < 1:
            raise ValueError(f"prefix_length must be >= 1, got {prefix_length}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.mode = mode
        self.prefix_length = prefix_length if mode == "queries" else 0
        if mode == "queries":
            self.queries = nn.Parameter(torch.randn(prefix_length, embed_dim) * 0.02)
        self.visual_proj = nn.Linear(visual_dim, embed_dim)
        layer = nn.TransformerEncoderLayer(
            embed_dim, num_heads, dim_feedforward=4 * embed_dim, dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, visual: torch.Tensor, visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            visual: (B, Nd, visual_dim) discarded visual tokens (Nd may be 0).
            visual_mask: (B, Nd) 1/True for real tokens, 0/False for padding; None = all real.

        Returns:
            (B, P, embed_dim) prefix embeddings ('tokens': (B, Nd, embed_dim), finite also at padding).
        """
        batch, num_tokens, _ = visual.shape
        if visual_mask is None:
            visual_mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=visual.device)
        if visual_mask.shape != (batch, num_tokens):
            raise ValueError(
                f"visual_mask shape {tuple(visual_mask.shape)} does not match visual {(batch, num_tokens)}"
            )
        # in the weights' precision also under autocast: a bf16 cast of the input would round away the small
        # grid-position embedding the compensation adds to each discarded token
        with torch.autocast(device_type=visual.device.type, enabled=False):
            projected = self.visual_proj(visual.to(self.visual_proj.weight.dtype))
        if self.mode == "tokens":
            if num_tokens == 0:
                return self.norm(projected)
            padding = ~visual_mask.bool()
            padding[:, 0] &= visual_mask.bool().any(1)  # a row with no real token attends to its first: no NaN
            return self.norm(self.encoder(projected, src_key_padding_mask=padding))
        tokens = torch.cat([self.queries.expand(batch, -1, -1), projected], dim=1)
        query_keep = torch.ones(batch, self.prefix_length, dtype=torch.bool, device=visual.device)
        padding = ~torch.cat([query_keep, visual_mask.bool()], dim=1)
        out = self.encoder(tokens, src_key_padding_mask=padding)
        return self.norm(out[:, : self.prefix_length])


@dataclass
class CaptionCandidates:
    """Candidates from `CaptionModel.generate_candidates`, best first.

    Attributes:
        token_ids: (B, M, T) caption ids, each ending with EOS, right-padded with the pad id.
        lengths: (B, M) generated tokens per candidate, EOS included.
        logprobs: (B, M) summed log-probability of each candidate under the model (temperature 1).
        prefix_lengths: (B,) real prefix tokens per sample (instruction + P), run once as prefill.
        decode_tokens: (B,) tokens fed through the decoder after the prefill for that sample, all
            beams / samples counted (a finished sample row too, fed EOS) until the sample's last one finished (the
            decode cost with a KV cache).
    """

    token_ids: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor
    prefix_lengths: torch.Tensor
    decode_tokens: torch.Tensor


class CaptionModel(nn.Module):
    """Small GPT-2 caption decoder conditioned on the instruction and the discarded visual tokens.

    Instructions and captions may be padded on either side; internally the instruction is moved to
    left padding and the caption to right padding, with position ids that count real tokens only,
    so a sample gives the same result whatever it is batched with.

    Args:
        vocab_size: the LVLM tokenizer's vocabulary size (shared, so captions splice as ids).
            Ignored with `decoder`.
        visual_dim: width of the discarded visual tokens.
        embed_dim: decoder width (ignored with `decoder`).
        num_layers: decoder layers (ignored with `decoder`).
        num_heads: decoder and mapper attention heads (with `decoder`: its `n_head`).
        prefix_length: number P of prefix embeddings made from the visual tokens ('queries' mode).
        mapper_layers: transformer layers of the prefix mapper.
        prefix_mode: the mapper's mode: 'queries' (P learned queries) or 'tokens' (one prefix embedding per
            discarded visual token).
        max_length: longest total sequence (instruction + P + caption); the decoder's position table
            (with `decoder`: its `n_positions`).
        bos_token_id: the tokenizer's BOS id (stored in the decoder config).
        eos_token_id: the tokenizer's EOS id; every caption ends with it.
        pad_token_id: the tokenizer's pad id, used to pad generated candidates.
        dropout: dropout of the decoder and the mapper.
        attn_implementation: "sdpa" or "eager" for the decoder.
        initializer_range: std of the decoder's normal initialisation (GPT-2's 0.02 by default).
            Ignored with `decoder`.
        decoder: a pretrained `GPT2LMHeadModel` to use instead of a new one (its dropout is the caller's);
            vocab_size, embed_dim, num_heads and max_length then come from it, and bos/eos/pad ids are
            ids of its tokenizer.
    """

    def __init__(
        self,
        vocab_size: int,
        visual_dim: int,
        embed_dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        prefix_length: int = 8,
        mapper_layers: int = 2,
        max_length: int = 64,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        dropout: float = 0.1,
        attn_implementation: str = "sdpa",
        prefix_mode: str = "queries",
        initializer_range: float = 0.02,
        decoder: GPT2LMHeadModel | None = None,
    ) -> None:
        super().__init__()
        if decoder is not None:
            vocab_size = decoder.get_input_embeddings().num_embeddings
            embed_dim, num_heads, max_length = decoder.config.n_embd, decoder.config.n_head, decoder.config.n_positions
        if not initializer_range > 0:
            raise ValueError(f"initializer_range={initializer_range} must be > 0")
        for name, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                            ("pad_token_id", pad_token_id)):
            if not 0 <= value < vocab_size:
                raise ValueError(f"{name}={value} outside vocab_size={vocab_size}")
        if max_length <= prefix_length:
            raise ValueError(f"max_length={max_length} must exceed prefix_length={prefix_length}")
        self.vocab_size = vocab_size
        self.prefix_length = prefix_length
        self.max_length = max_length
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        if decoder is None:
            config = GPT2Config(
                vocab_size=vocab_size, n_positions=max_length, n_embd=embed_dim, n_layer=num_layers,
                n_head=num_heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                initializer_range=initializer_range,
            )
            decoder = GPT2LMHeadModel._from_config(config, attn_implementation=attn_implementation)
        self.decoder = decoder
        self.mapper = PrefixMapper(
            visual_dim, embed_dim, prefix_length=prefix_length, num_layers=mapper_layers,
            num_heads=num_heads, dropout=dropout, mode=prefix_mode,
        )

    # ------------------------------------------------------------------ prefix

    def embed_prefix(
        self,
        instruction_ids: torch.Tensor,
        instruction_mask: torch.Tensor,
        discarded_visual: torch.Tensor,
        discarded_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Builds `[instruction embeddings ; P prefix embeddings]`, left-padded (all padding first).

        Args:
            instruction_ids: (B, Q) instruction token ids, padded on either side.
            instruction_mask: (B, Q) 1 for real tokens.
            discarded_visual: (B, Nd, visual_dim).
            discarded_mask: (B, Nd) 1 for real tokens, or None.

        Returns:
            embeds (B, Q + P, D) and mask (B, Q + P).
        """
        if instruction_ids.shape != instruction_mask.shape:
            raise ValueError(
                f"instruction_mask shape {tuple(instruction_mask.shape)} != instruction_ids "
                f"shape {tuple(instruction_ids.shape)}"
            )
        if discarded_visual.shape[0] != instruction_ids.shape[0]:
            raise ValueError(
                f"discarded_visual batch {discarded_visual.shape[0]} != instruction batch "
                f"{instruction_ids.shape[0]}"
            )
        mask = instruction_mask.long()
        instruction_embeds = self.decoder.transformer.wte(instruction_ids)
        prefix = self.mapper(discarded_visual, discarded_mask).to(instruction_embeds.dtype)
        if self.mapper.mode == "tokens" and discarded_mask is not None:
            prefix_mask = discarded_mask.to(mask.dtype)
        else:
            prefix_mask = torch.ones(prefix.shape[:2], dtype=mask.dtype, device=mask.device)
        # all padding to the left: the last position must be real, its logits predict the first caption token
        return pack_padding(torch.cat([instruction_embeds, prefix], 1), torch.cat([mask, prefix_mask], 1), "left")

    # ------------------------------------------------------------------ teacher forcing

    def caption_token_logprobs(
        self,
        instruction_ids: torch.Tensor,
        instruction_mask: torch.Tensor,
        discarded_visual: torch.Tensor,
        discarded_mask: torch.Tensor | None,
        caption_ids: torch.Tensor,
        caption_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probability of every caption token.

        Args:
            instruction_ids, instruction_mask, discarded_visual, discarded_mask: see `embed_prefix`.
            caption_ids: (B, T) or (B, M, T) caption ids (with their EOS); M candidates per
                sample share the sample's prefix.
            caption_mask: same shape as caption_ids, 1 for real tokens; None = caption_ids differ
                from the pad id (only when the pad id is not the EOS id).

        Returns:
            logprobs (B, T) or (B, M, T), zero at padding, and the caption mask (same shape, bool).
        """
        if caption_mask is None:
            if self.pad_token_id == self.eos_token_id:
                raise ValueError("caption_mask is required when pad_token_id == eos_token_id")
            caption_mask = caption_ids != self.pad_token_id
        if caption_mask.shape != caption_ids.shape:
            raise ValueError(
                f"caption_mask shape {tuple(caption_mask.shape)} != caption_ids shape {tuple(caption_ids.shape)}"
            )
        out_shape = caption_ids.shape
        prefix, prefix_mask = self.embed_prefix(
            instruction_ids, instruction_mask, discarded_visual, discarded_mask
        )
        if caption_ids.dim() == 3:
            repeats = caption_ids.shape[1]
            prefix = prefix.repeat_interleave(repeats, 0)
            prefix_mask = prefix_mask.repeat_interleave(repeats, 0)
            caption_ids = caption_ids.flatten(0, 1)
            caption_mask = caption_mask.flatten(0, 1)
        elif caption_ids.dim() != 2:
            raise ValueError(f"caption_ids must be (B, T) or (B, M, T), got {tuple(caption_ids.shape)}")
        if caption_ids.shape[0] != prefix.shape[0]:
            raise ValueError(
                f"caption_ids batch {caption_ids.shape[0]} != instruction batch {prefix.shape[0]}"
            )
        caption_ids, caption_mask = pack_padding(caption_ids, caption_mask.long(), side="right")
        length = caption_ids.shape[1]
        total = prefix.shape[1] + length
        if total > self.max_length:
            raise ValueError(
                f"instruction + prefix + caption = {total} tokens exceeds max_length={self.max_length}"
            )
        embeds = torch.cat([prefix, self.decoder.transformer.wte(caption_ids)], 1)
        mask = torch.cat([prefix_mask, caption_mask], 1)
        # Only the logits that predict caption tokens go through the vocabulary projection.
        logits = self.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=_position_ids(mask),
            use_cache=False, logits_to_keep=length + 1,
        ).logits[:, :length]
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, caption_ids[..., None]).squeeze(-1)
        caption_mask = caption_mask.bool()
        logprobs = logprobs.masked_fill(~caption_mask, 0.0)
        return logprobs.reshape(out_shape), caption_mask.reshape(out_shape)

    def forward(
        self,
        instruction_ids: torch.Tensor,
        instruction_mask: torch.Tensor,
        discarded_visual: torch.Tensor,
        discarded_mask: torch.Tensor | None,
        caption_ids: torch.Tensor,
        caption_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean token cross-entropy of each caption (teacher forcing, EOS included).

        Returns:
            (B,) or (B, M) per-caption mean NLL; 0 for a caption with no real tokens.
        """
        logprobs, mask = self.caption_token_logprobs(
            instruction_ids, instruction_mask, discarded_visual, discarded_mask, caption_ids, caption_mask
        )
        return -logprobs.sum(-1) / mask.sum(-1).clamp_min(1)

    def sequence_logprob(
        self,
        instruction_ids: torch.Tensor,
        instruction_mask: torch.Tensor,
        discarded_visual: torch.Tensor,
        discarded_mask: torch.Tensor | None,
        caption_ids: torch.Tensor,
        caption_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Summed log-probability of each caption (the DPO sequence score).

        Returns:
            (B,) or (B, M).
        """
        logprobs, _ = self.caption_token_logprobs(
            instruction_ids, instruction_mask, discarded_visual, discarded_mask, caption_ids, caption_mask
        )
        return logprobs.sum(-1)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate_candidates(
        self,
        instruction_ids: torch.Tensor,
        instruction_mask: torch.Tensor,
        discarded_visual: torch.Tensor,
        discarded_mask: torch.Tensor | None,
        num_candidates: int = 3,
        num_beams: int = 3,
        max_new_tokens: int = 16,
        strategy: str = "beam",
        temperature: float = 1.0,
        top_p: float = 1.0,
        length_penalty: float = 1.0,
        min_new_tokens: int = 1,
        suppress_token_ids: Sequence[int] = (),
        generator: torch.Generator | None = None,
        lockstep: bool = False,
    ) -> CaptionCandidates:
        """Generates M distinct captions per sample with the KV cache.

        Beam search keeps the M best distinct finished beams (score = summed log-prob /
        length ** length_penalty). Sampling draws the M first tokens without replacement, so the M
        candidates differ, then samples each continuation independently. Every candidate ends with
        EOS: at the last allowed step EOS is forced (its real log-probability is scored). The pad id
        (when it is not the EOS id) and `suppress_token_ids` are never generated. The model runs in
        eval mode during generation and its mode is restored after.

        Args:
            instruction_ids, instruction_mask, discarded_visual, discarded_mask: see `embed_prefix`.
            num_candidates: M.
            num_beams: beams for "beam" (>= num_candidates).
            max_new_tokens: longest caption, EOS included.
            strategy: "beam" or "sample".
            temperature: softmax temperature for "sample".
            top_p: nucleus mass for "sample" (the first step always keeps at least M tokens).
            length_penalty: exponent of the length normalisation for "beam".
            min_new_tokens: EOS is blocked before this many tokens (1 = no empty caption).
            suppress_token_ids: ids never generated (e.g. the image token).
            generator: random generator for "sample".
            lockstep: decode `max_new_tokens` steps even when every candidate has ended (the extra steps change
                nothing), so that processes whose weights are gathered collectively (ZeRO-3) make the same calls.

        Returns:
            CaptionCandidates (token ids (B, M, T) plus lengths and costs).
        """
        if strategy not in ("beam", "sample"):
            raise ValueError(f"strategy must be 'beam' or 'sample', got {strategy!r}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if strategy == "beam" and num_beams < num_candidates:
            raise ValueError(f"num_beams={num_beams} must be >= num_candidates={num_candidates}")
        if strategy == "sample" and temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if max_new_tokens < 1 or not 0 <= min_new_tokens < max_new_tokens:
            raise ValueError(
                f"need max_new_tokens >= 1 and 0 <= min_new_tokens < max_new_tokens, got "
                f"max_new_tokens={max_new_tokens}, min_new_tokens={min_new_tokens}"
            )
        if num_candidates > 1 and max_new_tokens < 2:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves only EOS: no {num_candidates} distinct captions")
        banned = set(int(t) for t in suppress_token_ids)
        if self.pad_token_id != self.eos_token_id:
            banned.add(self.pad_token_id)
        if self.eos_token_id in banned:
            raise ValueError(f"suppress_token_ids must not contain eos_token_id={self.eos_token_id}")
        was_training = self.training
        self.eval()
        try:
            prefix, prefix_mask = self.embed_prefix(
                instruction_ids, instruction_mask, discarded_visual, discarded_mask
            )
            if prefix.shape[1] + max_new_tokens > self.max_length:
                raise ValueError(
                    f"instruction + prefix ({prefix.shape[1]}) + max_new_tokens ({max_new_tokens}) "
                    f"exceeds max_length={self.max_length}"
                )
            out = self.decoder(
                inputs_embeds=prefix, attention_mask=prefix_mask,
                position_ids=_position_ids(prefix_mask), use_cache=True, logits_to_keep=1,
            )
            run = _Decoding(
                model=self, cache=output_cache(out), attention_mask=prefix_mask,
                first_logits=out.logits[:, -1], banned=sorted(banned),
                max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, lockstep=lockstep,
            )
            if strategy == "beam":
                finished, decode_tokens = run.beam_search(num_beams, length_penalty)
            else:
                finished, decode_tokens = run.sample(num_candidates, temperature, top_p, generator)
        finally:
            self.train(was_training)
        return self._collect(finished, num_candidates, prefix_mask, decode_tokens)

    def _collect(
        self,
        finished: list[list[tuple[float, list[int], float]]],
        num_candidates: int,
        prefix_mask: torch.Tensor,
        decode_tokens: torch.Tensor,
    ) -> CaptionCandidates:
        batch = len(finished)
        chosen = []
        for b, hyps in enumerate(finished):
            unique: dict[tuple[int, ...], tuple[float, float]] = {}
            for rank_score, tokens, logprob in sorted(hyps, key=lambda h: h[0], reverse=True):
                unique.setdefault(tuple(tokens), (rank_score, logprob))
            if len(unique) < num_candidates:
                raise RuntimeError(
                    f"sample {b}: only {len(unique)} distinct captions for num_candidates={num_candidates}"
                )
            chosen.append(list(unique.items())[:num_candidates])
        longest = max(len(tokens) for rows in chosen for tokens, _ in rows)
        device = prefix_mask.device
        token_ids = torch.full((batch, num_candidates, longest), self.pad_token_id, dtype=torch.long)
        lengths = torch.zeros(batch, num_candidates, dtype=torch.long)
        logprobs = torch.zeros(batch, num_candidates)
        for b, rows in enumerate(chosen):
            for m, (tokens, (_, logprob)) in enumerate(rows):
                token_ids[b, m, : len(tokens)] = torch.tensor(tokens)
                lengths[b, m] = len(tokens)
                logprobs[b, m] = logprob
        return CaptionCandidates(
            token_ids=token_ids.to(device), lengths=lengths.to(device), logprobs=logprobs.to(device),
            prefix_lengths=prefix_mask.sum(1).long(), decode_tokens=decode_tokens.to(device),
        )


class _Decoding:
    """State of one cached decoding run: the cache, its 2-D mask and next positions per row."""

    def __init__(
        self,
        model: CaptionModel,
        cache,
        attention_mask: torch.Tensor,
        first_logits: torch.Tensor,
        banned: list[int],
        max_new_tokens: int,
        min_new_tokens: int,
        lockstep: bool = False,
    ) -> None:
        self.model = model
        self.lockstep = lockstep
        self.cache = cache
        self.attention_mask = attention_mask
        self.next_position = attention_mask.sum(1).long()
        self.first_logprobs = torch.log_softmax(first_logits.float(), -1)
        self.banned = banned
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.eos = model.eos_token_id

    def _expand(self, repeats: int) -> torch.Tensor:
        self.cache.batch_repeat_interleave(repeats)
        self.attention_mask = self.attention_mask.repeat_interleave(repeats, 0)
        self.next_position = self.next_position.repeat_interleave(repeats, 0)
        return self.first_logprobs.repeat_interleave(repeats, 0)

    def _allowed(self, logprobs: torch.Tensor, step: int) -> torch.Tensor:
        """Log-probs with disallowed tokens at -inf (selection only; scores use the raw ones)."""
        if step == self.max_new_tokens - 1:
            allowed = torch.full_like(logprobs, float("-inf"))
            allowed[:, self.eos] = logprobs[:, self.eos]
            return allowed
        allowed = logprobs.clone()
        if self.banned:
            allowed[:, self.banned] = float("-inf")
        if step < self.min_new_tokens:
            allowed[:, self.eos] = float("-inf")
        return allowed

    def _step(self, rows: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """Reorders the cache to `rows` (None = keep the order), feeds one token per row and
        returns the next log-probs (rows, V)."""
        if rows is not None:
            self.cache.reorder_cache(rows)
            self.attention_mask = self.attention_mask[rows]
            self.next_position = self.next_position[rows]
        ones = torch.ones(len(tokens), 1, dtype=self.attention_mask.dtype, device=tokens.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], 1)
        position = self.next_position
        self.next_position = position + 1
        embeds = self.model.decoder.transformer.wte(tokens[:, None])
        out = self.model.decoder(
            inputs_embeds=embeds, attention_mask=self.attention_mask, position_ids=position[:, None],
            use_cache=True, **cache_argument(self.cache),
        )
        self.cache = output_cache(out)
        return torch.log_softmax(out.logits[:, -1].float(), -1)

    def beam_search(self, num_beams: int, length_penalty: float):
        batch, vocab = self.first_logprobs.shape
        device = self.first_logprobs.device
        logprobs = self._expand(num_beams)
        # All beams of a sample start identical: only beam 0 may expand at the first step.
        beam_scores = torch.zeros(batch, num_beams, device=device)
        beam_scores[:, 1:] = float("-inf")
        sequences: list[list[int]] = [[] for _ in range(batch * num_beams)]
        finished: list[list[tuple[float, list[int], float]]] = [[] for _ in range(batch)]
        done = [False] * batch
        decode_tokens = torch.zeros(batch, dtype=torch.long)
        width = min(2 * num_beams, num_beams * vocab)
        for step in range(self.max_new_tokens):
            total = beam_scores.reshape(-1, 1) + self._allowed(logprobs, step)
            top_scores, top_index = total.reshape(batch, -1).topk(width, dim=1)
            top_scores, top_index = top_scores.tolist(), top_index.tolist()
            rows, next_tokens, next_scores = [], [], []
            for b in range(batch):
                base = b * num_beams
                if done[b]:
                    rows += [base + k for k in range(num_beams)]
                    next_tokens += [self.eos] * num_beams
                    next_scores += [float("-inf")] * num_beams
                    continue
                alive = []
                for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b])):
                    if score == float("-inf"):
                        break
                    beam, token = divmod(index, vocab)
                    if token == self.eos:
                        # As in HF beam search: an EOS below the top num_beams is not a finished hypothesis.
                        if rank < num_beams:
                            length = step + 1
                            finished[b].append(
                                (score / length**length_penalty, sequences[base + beam] + [token], score)
                            )
                    else:
                        alive.append((score, base + beam, token))
                    if len(alive) == num_beams:
                        break
                alive += [(float("-inf"), base, self.eos)] * (num_beams - len(alive))
                for score, row, token in alive:
                    rows.append(row)
                    next_tokens.append(token)
                    next_scores.append(score)
                done[b] = self._beam_done(finished[b], alive, num_beams, step + 1, length_penalty)
                if not done[b] and step < self.max_new_tokens - 1:
                    decode_tokens[b] += num_beams
            if (all(done) and not self.lockstep) or step == self.max_new_tokens - 1:
                break
            sequences = [sequences[r] + [t] for r, t in zip(rows, next_tokens)]
            beam_scores = torch.tensor(next_scores, device=device).reshape(batch, num_beams)
            rows_t = torch.tensor(rows, device=device)
            logprobs = self._step(rows_t, torch.tensor(next_tokens, device=device))
        return finished, decode_tokens

    @staticmethod
    def _beam_done(finished, alive, num_beams: int, length: int, length_penalty: float) -> bool:
        if len(finished) < num_beams:
            return False
        worst_kept = sorted((h[0] for h in finished), reverse=True)[num_beams - 1]
        best_alive = max(score for score, _, _ in alive)
        return best_alive == float("-inf") or worst_kept >= best_alive / length**length_penalty

    def sample(self, num_candidates: int, temperature: float, top_p: float, generator):
        batch, _ = self.first_logprobs.shape
        device = self.first_logprobs.device
        logprobs = self._expand(num_candidates)
        rows_total = batch * num_candidates
        sequences: list[list[int]] = [[] for _ in range(rows_total)]
        scores = [0.0] * rows_total
        active = [True] * rows_total
        for step in range(self.max_new_tokens):
            scaled = self._allowed(logprobs, step) / temperature
            if step == 0:  # M distinct first tokens per sample
                tokens = _distinct_draws(scaled[::num_candidates], top_p, num_candidates, generator).reshape(-1)
            else:
                probs = torch.softmax(scaled, -1).masked_fill(~_nucleus_keep(scaled, top_p, 1), 0.0)
                tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            picked = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
            token_list = tokens.tolist()
            for r in range(rows_total):
                if not active[r]:
                    continue
                sequences[r].append(token_list[r])
                scores[r] += picked[r]
                if token_list[r] == self.eos:
                    active[r] = False
            if step == self.max_new_tokens - 1 or (not any(active) and not self.lockstep):
                break
            # Finished rows keep feeding EOS (their outputs are ignored) until the sample's last candidate ends.
            feed = torch.tensor(
                [token_list[r] if active[r] else self.eos for r in range(rows_total)], device=device
            )
            logprobs = self._step(None, feed)
        finished: list[list[tuple[float, list[int], float]]] = [[] for _ in range(batch)]
        for r in range(rows_total):
            finished[r // num_candidates].append((scores[r], sequences[r], scores[r]))
        # every row of a sample is fed (EOS once finished) until its longest candidate ends, as beams are
        decode_tokens = torch.tensor([num_candidates * (max(len(s) for _, s, _ in rows) - 1) for rows in finished],
                                     dtype=torch.long)
        return finished, decode_tokens


def _nucleus_keep(logits: torch.Tensor, top_p: float, min_keep: int) -> torch.Tensor:
    """Which tokens the top-p nucleus keeps (at least the `min_keep` likeliest allowed ones; never a -inf one)."""
    sorted_logits, order = logits.sort(-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, -1)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) <= top_p
    keep[:, :min_keep] = True
    keep &= torch.isfinite(sorted_logits)
    return torch.zeros_like(keep).scatter(-1, order, keep)


def _distinct_draws(logits: torch.Tensor, top_p: float, count: int, generator) -> torch.Tensor:
    """`count` distinct tokens per row, drawn without replacement from the nucleus of softmax(logits) (Gumbel top-k,
    in log space: a token whose probability underflows stays drawable, a suppressed one never is). torch's
    multinomial without replacement picks zero-probability tokens once fewer than `count` are nonzero."""
    logprobs = torch.log_softmax(logits, -1).masked_fill(~_nucleus_keep(logits, top_p, count), float("-inf"))
    uniform = torch.rand(logprobs.shape, generator=generator, device=logprobs.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1 - 1e-7)))
    tokens = (logprobs + gumbel).topk(count, -1).indices
    if not torch.isfinite(logprobs.gather(1, tokens)).all():
        raise ValueError(f"fewer than {count} tokens may start a caption (the others are suppressed): lower "
                         "num_candidates")
    return tokens
