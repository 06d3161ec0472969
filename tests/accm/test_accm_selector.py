import pytest
import torch
from torch import nn

from conftest import make_tiny_llava
from lvlm_prune.accm import CandidateSelector, MeanPooledTextEncoder, build_selector_inputs


def make_selector():
    torch.manual_seed(0)
    return CandidateSelector(text_dim=12, hidden=16, num_layers=1, num_heads=2).eval()


def test_selector_masks_candidates_without_nan():
    selector = make_selector()
    features = torch.randn(3, 4, 12)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    scores = selector(features, mask)
    assert scores.shape == (3, 4)
    assert torch.isfinite(scores[mask]).all()
    assert (scores[~mask] == float("-inf")).all()
    assert not scores.isnan().any()
    # A masked candidate's features do not change the others' scores.
    changed = features.clone()
    changed[1, 1] = 100.0
    torch.testing.assert_close(selector(changed, mask)[1], scores[1])


def test_selector_scores_permute_with_candidates():
    selector = make_selector()
    features = torch.randn(2, 3, 12)
    order = torch.tensor([2, 0, 1])
    torch.testing.assert_close(selector(features[:, order]), selector(features)[:, order], atol=1e-5, rtol=1e-5)


def test_selector_gets_gradients():
    selector = make_selector().train()
    scores = selector(torch.randn(2, 3, 12), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    torch.nn.functional.cross_entropy(scores, torch.tensor([0, 2])).backward()
    for name, p in selector.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # the score bias shifts every candidate alike, which a softmax over candidates ignores: its gradient is 0
        assert (p.grad.abs().sum() == 0) if name == "score_head.1.bias" else (p.grad.abs().sum() > 0), name


def test_build_selector_inputs_layout():
    question_ids = [torch.tensor([10, 11]), torch.tensor([12])]
    candidates = torch.tensor([
        [[20, 21, 2, 0], [22, 2, 0, 0]],
        [[23, 24, 25, 2], [26, 2, 0, 0]],
    ])
    ids, mask = build_selector_inputs(
        question_ids, candidates, question_prefix_ids=[1, 5], supplement_prefix_ids=torch.tensor([6, 7]),
        pad_token_id=0, eos_token_id=2,
    )
    assert ids.shape == (4, 8) and mask.shape == (4, 8)
    real = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert real == [
        [1, 5, 10, 11, 6, 7, 20, 21],
        [1, 5, 10, 11, 6, 7, 22],
        [1, 5, 12, 6, 7, 23, 24, 25],
        [1, 5, 12, 6, 7, 26],
    ]
    assert mask.sum(1).tolist() == [8, 7, 8, 6] and (mask[:, 1:] <= mask[:, :-1]).all()  # right padding
    assert (ids[~mask.bool()] == 0).all()
    with pytest.raises(ValueError, match="question_ids"):
        build_selector_inputs(question_ids[:1], candidates, [1], [6], pad_token_id=0)


def test_mean_pooled_encoder_ignores_padding_and_holds_no_parameters(tiny_spec):
    language_model = make_tiny_llava(tiny_spec).model.language_model
    encoder = MeanPooledTextEncoder(language_model, batch_size=1)
    assert not isinstance(encoder, nn.Module)
    ids = torch.tensor([[1, 5, 6, 7, 0, 0], [1, 8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    features = encoder(ids, mask)
    assert features.shape == (2, tiny_spec.hidden_size) and not features.requires_grad
    alone = encoder(ids[:1, :4], mask[:1, :4])
    torch.testing.assert_close(features[0], alone[0], atol=1e-5, rtol=1e-5)
    hidden = language_model(input_ids=ids[1:], attention_mask=mask[1:]).last_hidden_state
    torch.testing.assert_close(features[1], hidden[0].mean(0), atol=1e-5, rtol=1e-5)
    embedding = nn.Embedding(16, 4)
    pooled = MeanPooledTextEncoder(embedding)(ids[:1, :4], mask[:1, :4])
    torch.testing.assert_close(pooled[0], embedding.weight[[1, 5, 6, 7]].mean(0))
