"""Splicing ACCM's caption into the LVLM prompt, right after the image tokens."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class SplicedBatch(NamedTuple):
    """Result of `splice_after_image`.

    Attributes:
        input_ids: (B, L') the new prompt ids.
        attention_mask: (B, L') 1 for real tokens.
        labels: (B, L') labels with -100 on inserted tokens and padding, or None.
        positions: (B, L) new index of every old position; -1 for old padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    positions: torch.Tensor

    def inserted_mask(self) -> torch.Tensor:
        """(B, L') True at the inserted tokens."""
        hit = torch.zeros_like(self.attention_mask, dtype=torch.bool)
        valid = self.positions >= 0
        rows = torch.arange(len(self.positions), device=self.positions.device)[:, None].expand_as(self.positions)
        hit[rows[valid], self.positions[valid]] = True
        return self.attention_mask.bool() & ~hit


def splice_after_image(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    image_token_id: int,
    insert_ids: Sequence[torch.Tensor],
    pad_token_id: int,
    padding_side: str = "left",
) -> SplicedBatch:
    """Inserts each sample's ids right after its last image token (before the question).

    The rows may come padded on either side; the output is re-padded to the new longest row on
    `padding_side`. The caller builds the insert ids, e.g. from
    `tokenizer("additional information: " + caption, add_special_tokens=False)`.

    Args:
        input_ids: (B, L) prompt ids.
        attention_mask: (B, L) 1 for real tokens.
        labels: (B, L) labels (-100 = ignored) or None.
        image_token_id: the LVLM's image token id.
        insert_ids: B 1-D tensors (may be empty), one per sample.
        pad_token_id: pad id of the output.
        padding_side: "left" or "right".

    Returns:
        SplicedBatch(input_ids, attention_mask, labels, positions).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    batch, old_length = input_ids.shape
    if len(insert_ids) != batch:
        raise ValueError(f"insert_ids has {len(insert_ids)} entries for a batch of {batch}")
    device = input_ids.device
    rows_ids, rows_labels, rows_old_to_new = [], [], []
    for b in range(batch):
        real_positions = attention_mask[b].bool().nonzero().squeeze(1)
        ids = input_ids[b, real_positions]
        image_positions = (ids == image_token_id).nonzero()
        if image_positions.numel() == 0:
            raise ValueError(f"sample {b} has no image token (image_token_id={image_token_id}) in input_ids")
        cut = int(image_positions[-1]) + 1
        insert = insert_ids[b].to(device=device, dtype=input_ids.dtype).reshape(-1)
        rows_ids.append(torch.cat([ids[:cut], insert, ids[cut:]]))
        if labels is not None:
            row_labels = labels[b, real_positions]
            ignored = torch.full_like(insert, -100, dtype=labels.dtype)
            rows_labels.append(torch.cat([row_labels[:cut], ignored, row_labels[cut:]]))
        within = torch.arange(len(ids), device=device)
        within = torch.where(within >= cut, within + len(insert), within)
        rows_old_to_new.append((real_positions, within))
    new_length = max(len(r) for r in rows_ids)
    new_ids = torch.full((batch, new_length), pad_token_id, dtype=input_ids.dtype, device=device)
    new_mask = torch.zeros(batch, new_length, dtype=attention_mask.dtype, device=device)
    new_labels = None
    if labels is not None:
        new_labels = torch.full((batch, new_length), -100, dtype=labels.dtype, device=device)
    positions = torch.full((batch, old_length), -1, dtype=torch.long, device=device)
    for b, row in enumerate(rows_ids):
        offset = new_length - len(row) if padding_side == "left" else 0
        new_ids[b, offset:offset + len(row)] = row
        new_mask[b, offset:offset + len(row)] = 1
        if new_labels is not None:
            new_labels[b, offset:offset + len(row)] = rows_labels[b]
        real_positions, within = rows_old_to_new[b]
        positions[b, real_positions] = within + offset
    return SplicedBatch(new_ids, new_mask, new_labels, positions)
