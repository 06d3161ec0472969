import math

import pytest
import torch
import torch.nn.functional as F

from lvlm_prune.rcp import answer_ce, repair_loss, sparsity_loss

B, L, D = 2, 7, 6


def make_states(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, L, D, generator=g, requires_grad=True)
    teacher = torch.randn(B, L, D, generator=g)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, -3:] = True
    mask[1, 2:4] = True
    return student, teacher, mask


@pytest.mark.parametrize("statistic", ["mean_var", "mean_std"])
def test_repair_loss_is_zero_for_identical_statistics(statistic):
    student, _, mask = make_states()
    # Same set of vectors at the answer positions, in another order, different everywhere else:
    # identical batch statistics although no position matches.
    teacher = torch.randn(B, L, D)
    selected = student.detach()[mask]
    teacher[mask] = selected.flip(0)
    loss = repair_loss(student, teacher, mask, statistic=statistic)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_repair_loss_matches_its_definition_and_is_positive_otherwise():
    student, teacher, mask = make_states()
    loss = repair_loss(student, teacher, mask, variance_weight=3.0)
    s, t = student[mask], teacher[mask]
    variance_term = F.mse_loss(s.var(0, unbiased=False), t.var(0, unbiased=False))
    expected = F.mse_loss(s.mean(0), t.mean(0)) + 3.0 * variance_term
    assert torch.allclose(loss, expected)
    assert loss.item() > 0
    shifted = repair_loss(student, student.detach() + 1.0, mask)
    assert shifted.item() == pytest.approx(1.0, rel=1e-5)  # mean off by 1 in every feature, same variance
    scaled = repair_loss(student, 2.0 * student.detach(), mask, variance_weight=0.0)
    assert torch.allclose(scaled, F.mse_loss(s.mean(0), 2 * s.mean(0)))
    std_loss = repair_loss(student, teacher, mask, statistic="mean_std")
    assert std_loss.item() > 0 and not torch.allclose(std_loss, loss)


def test_repair_loss_ignores_unmasked_positions_and_trains_only_the_student():
    student, teacher, mask = make_states()
    teacher.requires_grad_(True)
    base = repair_loss(student, teacher, mask)
    other = teacher.detach().clone()
    other[~mask] = 1e3
    assert torch.allclose(repair_loss(student, other, mask), base)
    base.backward()
    assert teacher.grad is None
    assert torch.all(student.grad[~mask] == 0)
    assert student.grad[mask].abs().sum() > 0


@pytest.mark.parametrize("statistic", ["mean_var", "mean_std"])
def test_repair_loss_single_answer_token(statistic):
    student, teacher, _ = make_states()
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[1, 3] = True
    loss = repair_loss(student, teacher, mask, statistic=statistic)
    expected = F.mse_loss(student[1, 3], teacher[1, 3])  # variance is 0 on both sides
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_repair_loss_empty_mask_is_a_graph_connected_zero():
    student, teacher, _ = make_states()
    empty = torch.zeros(B, L, dtype=torch.bool)
    loss = repair_loss(student, teacher, empty)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.all(student.grad == 0)


def test_repair_loss_rejects_bad_input():
    student, teacher, mask = make_states()
    with pytest.raises(ValueError, match="teacher has shape"):
        repair_loss(student, teacher[:, :-1], mask)
    with pytest.raises(ValueError, match="mask has shape"):
        repair_loss(student, teacher, mask[:1])
    with pytest.raises(ValueError, match="statistic"):
        repair_loss(student, teacher, mask, statistic="mean")
    with pytest.raises(ValueError, match="variance_weight"):
        repair_loss(student, teacher, mask, variance_weight=-1.0)


def test_sparsity_loss_pulls_toward_the_target():
    realised = torch.tensor(0.6, requires_grad=True)
    loss = sparsity_loss(realised, 0.25)
    assert loss.item() == pytest.approx(0.35)
    loss.backward()
    assert realised.grad.item() == pytest.approx(1.0)  # gradient descent lowers the kept fraction
    # Same value as on the prune ratio: |(1 - 0.6) - (1 - 0.25)|.
    assert sparsity_loss(torch.tensor(0.1), 0.25).item() == pytest.approx(0.15)
    with pytest.raises(ValueError, match="target_keep_fraction"):
        sparsity_loss(realised, 1.5)
    with pytest.raises(ValueError, match="realised_keep_fraction"):
        sparsity_loss(torch.ones(2), 0.5)


def test_answer_ce_is_shifted_token_mean():
    g = torch.Generator().manual_seed(0)
    vocab = 11
    logits = torch.randn(B, L, vocab, generator=g, requires_grad=True)
    labels = torch.full((B, L), -100)
    labels[0, 5:] = torch.tensor([3, 4])
    labels[1, 2] = 7
    loss = answer_ce(logits, labels)
    manual = [
        -F.log_softmax(logits[0, 4], -1)[3],
        -F.log_softmax(logits[0, 5], -1)[4],
        -F.log_softmax(logits[1, 1], -1)[7],
    ]
    assert torch.allclose(loss, torch.stack(manual).mean())
    loss.backward()
    assert logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_answer_ce_without_answer_tokens_is_a_graph_connected_zero():
    logits = torch.randn(B, L, 5, requires_grad=True)
    loss = answer_ce(logits, torch.full((B, L), -100))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.all(logits.grad == 0)
    assert math.isfinite(answer_ce(torch.randn(1, 1, 5, requires_grad=True), torch.tensor([[2]])).item())
    with pytest.raises(ValueError, match="labels has shape"):
        answer_ce(logits, torch.zeros(B, L + 1, dtype=torch.long))
