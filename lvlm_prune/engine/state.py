"""The sequence as the engine carries it through the decoder: hidden states plus per-token bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class SequenceState:
    """Per-token tensors of one batch at one point of the decoder. All are (B, T) except `hidden`.

    Args:
        hidden: (B, T, d) residual stream.
        position_ids: original RoPE positions (never renumbered after removal).
        key_valid: bool, the token may be attended to (real, not padding, not hidden, not removed).
        visual_index: index of the token among its sample's original visual tokens, -1 for text and padding.
        question_mask: bool, question tokens (text after the image, before the answer).
        answer_mask: bool, answer-generation positions (last prompt token + answer tokens).
        source_index: index of the token in the input sequence, -1 for padding added by the engine.
        key_weight: soft path only: float in [0, 1] per token, multiplies its attention as a key
            (straight-through mask values); None on the hard path.
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor
    key_valid: torch.Tensor
    visual_index: torch.Tensor
    question_mask: torch.Tensor
    answer_mask: torch.Tensor
    source_index: torch.Tensor
    key_weight: torch.Tensor | None = None

    @property
    def visual_mask(self) -> torch.Tensor:
        """(B, T) bool: visual tokens still present (valid, and weight > 0.5 on the soft path)."""
        present = (self.visual_index >= 0) & self.key_valid
        if self.key_weight is not None:
            present = present & (self.key_weight > 0.5)
        return present

    def last_real_index(self) -> torch.Tensor:
        """(B,) index of each sample's last real token: not padding of the input (right padding is not a valid key
        either) nor of the engine's compaction."""
        real = (self.source_index >= 0) & self.key_valid
        return self.source_index.masked_fill(~real, -1).argmax(1)

    def visual_counts(self) -> torch.Tensor:
        """(B,) float: visual tokens present per sample."""
        return self.visual_mask.sum(1).float()

    def compact(self, keep: torch.Tensor) -> "SequenceState":
        """Physically remove every token where `keep` is False: gather the kept tokens of each sample in
        order, right-pad to the longest sample; padding is not a valid key. (B, T) -> (B, T')."""
        keep = keep & self.key_valid
        counts = keep.sum(1)
        width = int(counts.max().item()) if keep.numel() else 0
        # stable sort puts the kept indices first, in their original order
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
        gathered = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                gathered[f.name] = None
            elif f.name == "hidden":
                gathered[f.name] = value.gather(1, order[..., None].expand(-1, -1, value.shape[-1]))
            else:
                gathered[f.name] = value.gather(1, order)
        state = SequenceState(**gathered)
        state.key_valid = state.key_valid & valid
        state.visual_index = torch.where(valid, state.visual_index, torch.full_like(state.visual_index, -1))
        state.question_mask = state.question_mask & valid
        state.answer_mask = state.answer_mask & valid
        state.source_index = torch.where(valid, state.source_index, torch.full_like(state.source_index, -1))
        return state

    def with_hidden(self, hidden: torch.Tensor) -> "SequenceState":
        return replace(self, hidden=hidden)


def gather_rows(values: torch.Tensor, mask: torch.Tensor, min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, ...) -> (B, A, ...): the rows where `mask` (B, T) is True, in order, right-padded to the longest
    sample (at least `min_width` rows); and (B, A) validity of each gathered row."""
    counts = mask.sum(1)
    width = max(min_width, int(counts.max().item()) if mask.numel() else 0)
    index = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    expanded = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return values.gather(1, expanded), torch.arange(width, device=mask.device)[None] < counts[:, None]
