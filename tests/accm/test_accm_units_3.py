"""Unit checks of ACCM's KL ranking, caption splice and vision-side selection that the other ACCM tests leave open."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from lvlm_prune.accm import (
    answer_kl,
    caption_and_selector_losses,
    dpo_loss,
    prumerge_plus_select,
    splice_after_image,
    text_relevance_scores,
)
from lvlm_prune.accm.vision_pruning import cls_attention_from_layer, cls_attention_to_visual_tokens

# ------------------------------------------------------------------ ranking


def test_answer_kl_averages_over_a_single_answer_position_without_halving_it():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3); the masked position does not count
    reference = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    candidate = torch.tensor([[[[0.0, math.log(3.0)], [-5.0, 5.0]]]])
    kl = answer_kl(reference, candidate, torch.tensor([[True, False]]))
    torch.testing.assert_close(kl, torch.tensor([[0.5 * math.log(4 / 3)]]))


def test_answer_kl_refuses_candidates_that_do_not_fit_the_reference_batch():
    reference = torch.zeros(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"candidate_logits batch 7 is not a multiple of the reference batch 2"):
        answer_kl(reference, torch.zeros(7, 3, 4), mask)
    with pytest.raises(ValueError, match=r"candidate_logits shape \(3, 1, 3, 4\) does not fit reference \(2, 3, 4\)"):
        answer_kl(reference, torch.zeros(3, 1, 3, 4), mask)


def test_caption_and_selector_losses_refuse_inputs_of_different_shapes():
    with pytest.raises(ValueError, match="must have the same"):
        caption_and_selector_losses(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))


def test_dpo_loss_refuses_a_zero_beta():
    one = torch.zeros(1)
    with pytest.raises(ValueError, match=r"^beta must be > 0, got 0.0$"):
        dpo_loss(one, one, one, one, beta=0.0)


def test_dpo_loss_scales_the_margin_by_beta():
    # policy margin (-4 - -5) - (-6 - -5) = 2, reference margin 0: loss = -log sigmoid(beta * 2)
    chosen, rejected, reference = torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-5.0])
    loss = dpo_loss(chosen, rejected, reference, reference, beta=0.25)
    torch.testing.assert_close(loss, torch.tensor(math.log1p(math.exp(-0.5))))


def test_dpo_loss_takes_no_gradient_through_the_weights_and_all_zero_weights_give_zero():
    chosen = torch.tensor([-4.0, -6.0], requires_grad=True)
    rejected, reference = torch.tensor([-6.0, -5.0]), torch.tensor([-5.0, -5.0])
    weights = torch.tensor([0.5, 1.5], requires_grad=True)
    dpo_loss(chosen, rejected, reference, reference, weights=weights).backward()
    assert weights.grad is None and chosen.grad is not None
    zero = dpo_loss(chosen.detach(), rejected, reference, reference, weights=torch.zeros(2))
    assert zero.item() == 0.0

# ------------------------------------------------------------------ splice

IMG = 63


def test_splice_pads_with_the_given_pad_id_not_the_input_one():
    ids = torch.tensor([[1, IMG, 10, 0], [1, IMG, 11, 12]])
    out = splice_after_image(ids, (ids != 0).long(), None, IMG, [torch.tensor([], dtype=torch.long), torch.tensor([5])],
                             pad_token_id=7, padding_side="left")
    assert out.input_ids.tolist() == [[7, 7, 1, IMG, 10], [1, IMG, 5, 11, 12]]
    assert out.attention_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_splice_refuses_mismatched_masks_labels_and_insert_counts():
    ids = torch.tensor([[1, IMG, 10], [1, IMG, 11]])
    mask = torch.ones_like(ids)
    inserts = [torch.tensor([5]), torch.tensor([6])]
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 2\) != input_ids shape \(2, 3\)"):
        splice_after_image(ids, mask[:, :2], None, IMG, inserts, 0)
    with pytest.raises(ValueError, match=r"labels shape \(2, 2\) != input_ids shape \(2, 3\)"):
        splice_after_image(ids, mask, mask[:, :2], IMG, inserts, 0)
    with pytest.raises(ValueError, match="insert_ids has 1 entries for a batch of 2"):
        splice_after_image(ids, mask, None, IMG, inserts[:1], 0)

# ------------------------------------------------------------------ vision-side selection


def test_prumerge_select_refuses_a_bad_text_fraction_and_a_relevance_of_another_shape():
    attention = torch.rand(1, 16)
    with pytest.raises(ValueError, match=r"^text_fraction must be in \[0, 1\], got 1.5$"):
        prumerge_plus_select(attention, torch.rand(1, 16), keep=4, text_fraction=1.5)
    with pytest.raises(ValueError, match=r"^text_relevance shape \(1, 9\) != cls_attention shape \(1, 16\)$"):
        prumerge_plus_select(attention, torch.rand(1, 9), keep=4)


def test_text_relevance_is_the_cosine_whatever_the_token_norms_and_zero_without_question_tokens():
    visual = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]]).repeat(2, 1, 1)
    text = torch.tensor([[[5.0, 0.0]], [[5.0, 0.0]]])
    relevance = text_relevance_scores(visual, text, torch.tensor([[1], [0]]))
    torch.testing.assert_close(relevance, torch.tensor([[1.0, 0.0, 0.5 ** 0.5], [0.0, 0.0, 0.0]]))


def test_the_text_share_skips_outliers_already_kept_instead_of_choosing_them_twice():
    attention = torch.zeros(1, 64)
    attention[0, :12] = torch.linspace(2.0, 1.0, 12)  # twelve outliers, 0 the strongest
    relevance = torch.zeros(1, 64)
    relevance[0, [0, 50, 60]] = torch.tensor([9.0, 5.0, 4.0])  # the most relevant patch is the kept outlier 0
    # keep 3: one outlier (0), then the text share of 2 goes to the next most relevant patches, 50 and 60
    assert prumerge_plus_select(attention, relevance, keep=3)[0].tolist() == [0, 50, 60]


def test_under_the_full_strategy_the_cls_token_comes_first_and_ranks_strictly_above_every_patch():
    torch.manual_seed(0)
    layer = CLIPEncoderLayer(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2)).eval()
    hidden = torch.randn(2, 5, 8)  # CLS + 4 patches
    with torch.no_grad():
        patches = cls_attention_from_layer(layer, hidden)
        assert torch.equal(cls_attention_to_visual_tokens(layer, hidden, 4), patches)
        full = cls_attention_to_visual_tokens(layer, hidden, 5)
    assert full.shape == (2, 5) and torch.equal(full[:, 1:], patches)
    torch.testing.assert_close(full[:, 0], patches.max(1).values + 1.0)
    for wrong in (3, 6):
        with pytest.raises(ValueError, match=rf"^{wrong} visual tokens from a vision layer with 4 patches"):
            cls_attention_to_visual_tokens(layer, hidden, wrong)
