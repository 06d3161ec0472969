import math

import pytest
import torch

from lvlm_prune.accm import answer_kl, caption_and_selector_losses, dpo_loss, preference_pairs, pseudo_labels


def test_answer_kl_is_zero_for_identical_logits_and_finds_the_closest_candidate():
    torch.manual_seed(0)
    reference = torch.randn(2, 5, 11)
    noise = torch.randn(2, 3, 5, 11)
    scale = torch.tensor([[2.0, 0.1, 1.0], [0.5, 3.0, 0.05]])
    candidates = reference[:, None] + scale[..., None, None] * noise
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    kl = answer_kl(reference, candidates, mask)
    assert kl.shape == (2, 3) and (kl >= 0).all()
    assert kl.argmin(1).tolist() == [1, 2]
    same = answer_kl(reference, reference[:, None].expand(-1, 3, -1, -1), mask)
    torch.testing.assert_close(same, torch.zeros(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(answer_kl(reference, candidates.flatten(0, 1), mask), kl)
    # Masked positions do not count.
    changed = candidates.clone()
    changed[0, :, 3:] += 50.0
    torch.testing.assert_close(answer_kl(reference, changed, mask)[0], kl[0])


def test_answer_kl_matches_the_definition_and_handles_empty_masks():
    reference = torch.randn(1, 2, 4, dtype=torch.float16)
    candidate = torch.randn(1, 1, 2, 4, dtype=torch.float16)
    p = reference.float().softmax(-1)
    expected = (p * (p.log() - candidate[:, 0].float().log_softmax(-1))).sum(-1).mean()
    kl = answer_kl(reference, candidate, torch.ones(1, 2, dtype=torch.bool))
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl[0, 0], expected, atol=1e-5, rtol=1e-5)
    empty = answer_kl(reference, candidate, torch.zeros(1, 2, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(1, 1))
    with pytest.raises(ValueError, match="answer_mask"):
        answer_kl(reference, candidate, torch.ones(1, 3, dtype=torch.bool))


def test_pseudo_labels_and_preference_pairs():
    kl = torch.tensor([[0.3, 0.1, 0.5], [1.0, 1.0, 1.0]], requires_grad=True)
    best, margin = pseudo_labels(kl)
    assert best.tolist() == [1, 0]
    torch.testing.assert_close(margin, torch.tensor([0.2, 0.0]))
    assert not margin.requires_grad
    chosen, rejected = preference_pairs(kl)
    assert chosen.tolist()[0] == 1 and rejected.tolist()[0] == 2


def test_caption_and_selector_losses_weight_by_margin():
    kl = torch.tensor([[0.3, 0.1, 0.5], [1.0, 1.0, 1.0], [0.0, 0.9, 0.3]])
    nll = torch.rand(3, 3, requires_grad=True)
    scores = torch.randn(3, 3, requires_grad=True)
    losses = caption_and_selector_losses(nll, scores, kl)
    weights = torch.tensor([0.2, 0.0, 0.4])
    expected_caption = (weights * nll.detach()[[0, 1, 2], [1, 0, 0]]).sum() / weights.sum()
    torch.testing.assert_close(losses["caption"], expected_caption)
    ce = torch.nn.functional.cross_entropy(scores.detach(), torch.tensor([1, 0, 0]), reduction="none")
    torch.testing.assert_close(losses["selector"], (weights * ce).sum() / weights.sum())
    (losses["caption"] + losses["selector"]).backward()
    # The zero-margin sample gets no gradient; only the best candidate's NLL is trained.
    assert torch.equal(nll.grad[1], torch.zeros(3)) and torch.equal(scores.grad[1], torch.zeros(3))
    assert nll.grad[0, 1] > 0 and nll.grad[0, 0] == 0
    # Masked (-inf) selector entries are fine; a batch with no margin gives 0.
    masked_scores = scores.detach().clone()
    masked_scores[0, 2] = float("-inf")
    assert torch.isfinite(caption_and_selector_losses(nll, masked_scores, kl)["selector"])
    flat = caption_and_selector_losses(nll, scores, torch.ones(3, 3))
    assert flat["caption"].item() == 0.0 and flat["selector"].item() == 0.0


def test_dpo_loss_sign_and_gradient():
    reference_chosen, reference_rejected = torch.tensor([-5.0, -6.0]), torch.tensor([-5.0, -6.0])
    assert math.isclose(dpo_loss(reference_chosen, reference_rejected, reference_chosen, reference_rejected).item(),
                        math.log(2), rel_tol=1e-6)
    prefers_chosen = dpo_loss(torch.tensor([-4.0, -5.0]), torch.tensor([-6.0, -7.0]), reference_chosen, reference_rejected)
    prefers_rejected = dpo_loss(torch.tensor([-6.0, -7.0]), torch.tensor([-4.0, -5.0]), reference_chosen, reference_rejected)
    assert prefers_chosen.item() < math.log(2) < prefers_rejected.item()
    chosen = torch.tensor([-5.0, -6.0], requires_grad=True)
    rejected = torch.tensor([-5.0, -6.0], requires_grad=True)
    dpo_loss(chosen, rejected, reference_chosen, reference_rejected, beta=0.5).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    weighted = dpo_loss(torch.tensor([-4.0, -7.0]), torch.tensor([-6.0, -5.0]), reference_chosen, reference_rejected,
                        weights=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(weighted, dpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]),
                                                  reference_chosen[:1], reference_rejected[:1]))


def test_a_batch_without_answer_positions_gives_zero_kl():
    # (B * M, 0, V) sample-major: the candidate count cannot be inferred from an empty tensor
    kl = answer_kl(torch.randn(2, 0, 7), torch.randn(6, 0, 7), torch.zeros(2, 0, dtype=torch.bool))
    assert kl.shape == (2, 3) and (kl == 0).all()
