import math

import pytest
import torch

from lvlm_prune.rcp import (
    CrossAttentionPruner,
    gumbel_sigmoid,
    layer_averaged_keep_fraction,
    threshold_keep,
)

HIDDEN, N, Q, B = 32, 24, 5, 3


def make_pruner(**overrides):
    torch.manual_seed(0)
    kwargs = dict(hidden_size=HIDDEN, bottleneck=16, num_queries=4, num_heads=2, mlp_hidden=8)
    kwargs.update(overrides)
    return CrossAttentionPruner(**kwargs)


def make_inputs(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(batch, N, HIDDEN, generator=g)
    q2v = torch.randn(batch, N, generator=g).softmax(-1)
    question = torch.randn(batch, Q, HIDDEN, generator=g)
    question_mask = torch.ones(batch, Q, dtype=torch.bool)
    question_mask[0, 3:] = False
    keep = torch.ones(batch, N, dtype=torch.bool)
    return visual, q2v, question, question_mask, keep


def test_pruner_keeps_almost_all_tokens_at_init():
    pruner = make_pruner()
    logits = pruner(*make_inputs())
    assert logits.shape == (B, N)
    assert (torch.sigmoid(logits) > 0.5).float().mean() > 0.9
    # Without the (input-dependent) LLM baseline the learned parts start near 0: keep-all.
    learned_only = make_pruner(use_llm_baseline=False)(*make_inputs())
    assert torch.all(learned_only > 1.5)
    assert torch.all(threshold_keep(learned_only, temperature=1.5, threshold=0.5))


def test_pruner_logits_depend_only_on_kept_tokens_and_real_question_tokens():
    pruner = make_pruner()
    visual, q2v, question, question_mask, keep = make_inputs()
    keep[:, ::3] = False
    keep[2] = False  # a sample with nothing left must stay finite
    base = pruner(visual, q2v, question, question_mask, keep)
    assert torch.isfinite(base).all()

    visual2, q2v2, question2 = visual.clone(), q2v.clone(), question.clone()
    visual2[~keep] = 100.0 * torch.randn_like(visual2[~keep])
    q2v2[~keep] = 0.0  # below the floor: must still be finite
    question2[~question_mask] = 50.0
    changed = pruner(visual2, q2v2, question2, question_mask, keep)
    assert torch.isfinite(changed).all()
    assert torch.allclose(changed[keep], base[keep], atol=1e-5)

    float_keep = pruner(visual, q2v, question, question_mask, keep.float())
    assert torch.allclose(float_keep, base)


def test_llm_baseline_is_centered_log_attention_over_kept_tokens():
    pruner = make_pruner(use_cross_attention=False, use_mlp=False, init_bias=0.0)
    visual, q2v, _, _, keep = make_inputs()
    keep[1, N // 2:] = False
    logits = pruner(visual, q2v, None, None, keep)
    log_q = q2v.log()
    for b in range(B):
        expected = log_q[b] - log_q[b][keep[b]].mean()
        assert torch.allclose(logits[b], expected, atol=1e-5)
    assert torch.allclose((logits * keep).sum(1), torch.zeros(B), atol=1e-4)


def test_cross_attention_score_combines_log_attention_over_queries_and_keeps_every_token_distinct():
    pruner = make_pruner(use_llm_baseline=False, use_mlp=False, init_bias=0.0)
    visual, _, question, question_mask, keep = make_inputs()
    keep[2, : N // 3] = False
    with torch.no_grad():
        pruner.queries.normal_(0.0, 3.0)  # sharp attention
        pruner.query_combine.weight.copy_(torch.linspace(-1.0, 1.0, 4)[None])  # a combination with negative weights
        pruner.query_combine.bias.fill_(-0.5)
    score = pruner.components(visual, None, question, question_mask, keep)["cross_attention"]

    head_dim = pruner.bottleneck // pruner.num_heads
    projected = pruner.visual_proj(visual)
    question_state = torch.stack([question[b][question_mask[b]].mean(0) for b in range(B)])
    queries = pruner.query_proj(pruner.queries[None] + pruner.question_proj(question_state)[:, None])
    keys = pruner.key_proj(projected)
    for b in range(B):
        kept = keep[b]
        q = queries[b].view(4, pruner.num_heads, head_dim).transpose(0, 1)
        k = keys[b][kept].view(-1, pruner.num_heads, head_dim).transpose(0, 1)
        weights = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1).mean(0)  # (queries, kept)
        combined = pruner.query_combine(weights.log().T).squeeze(-1)
        assert torch.allclose(score[b][kept], combined - combined.mean(), atol=1e-4)
        # no floor: every kept token keeps its own value (a floored log of a negative combination tied them)
        assert score[b][kept].unique().numel() == int(kept.sum())
    assert torch.isfinite(score).all()


def test_ablation_switches_change_logit_composition():
    inputs = make_inputs()
    full = make_pruner()
    terms = full.components(*inputs)
    assert set(terms) == {"llm_baseline", "cross_attention", "mlp", "bias"}
    summed = terms["llm_baseline"] + terms["cross_attention"] + terms["mlp"] + terms["bias"]
    assert torch.allclose(full(*inputs), summed)

    no_cross = make_pruner(use_cross_attention=False)
    assert set(no_cross.components(*inputs)) == {"llm_baseline", "mlp", "bias"}
    assert not any("query" in name or "question" in name for name, _ in no_cross.named_parameters())
    assert not torch.allclose(no_cross(*inputs), full(*inputs))

    bias_only = make_pruner(use_llm_baseline=False, use_cross_attention=False, use_mlp=False, init_bias=1.25)
    assert [name for name, _ in bias_only.named_parameters()] == ["bias"]
    visual, _, _, _, keep = inputs
    assert torch.equal(bias_only(visual, None, None, None, keep), torch.full((B, N), 1.25))

    with pytest.raises(ValueError, match="q2v is required"):
        full(visual, None, inputs[2], inputs[3], keep)
    with pytest.raises(ValueError, match="question and question_mask are required"):
        full(visual, inputs[1], None, None, keep)


def test_gradients_reach_learned_parts():
    pruner = make_pruner()
    logits = pruner(*make_inputs())
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    (logits * weights).sum().backward()
    for name in ("bias", "queries", "question_proj.weight", "key_proj.weight", "query_combine.weight",
                 "mlp.2.weight", "visual_proj.0.weight"):
        grad = dict(pruner.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_pruner_rejects_bad_shapes_and_settings():
    pruner = make_pruner()
    visual, q2v, question, question_mask, keep = make_inputs()
    with pytest.raises(ValueError, match="visual has shape"):
        pruner(visual[..., :-1], q2v, question, question_mask, keep)
    with pytest.raises(ValueError, match="q2v has shape"):
        pruner(visual, q2v[:, :-1], question, question_mask, keep)
    with pytest.raises(ValueError, match="keep_mask has shape"):
        pruner(visual, q2v, question, question_mask, keep[:2])
    with pytest.raises(ValueError, match="question has shape"):
        pruner(visual, q2v, question[:, :, :8], question_mask, keep)
    with pytest.raises(ValueError, match="question_mask has shape"):
        pruner(visual, q2v, question, question_mask[:, :2], keep)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        CrossAttentionPruner(HIDDEN, bottleneck=10, num_heads=4)
    with pytest.raises(ValueError, match="num_queries"):
        CrossAttentionPruner(HIDDEN, num_queries=0)


def test_gumbel_sigmoid_straight_through():
    logits = torch.randn(4, N, generator=torch.Generator().manual_seed(0), requires_grad=True)
    soft, hard = gumbel_sigmoid(logits, temperature=0.7, noise=True, hard=True,
                                generator=torch.Generator().manual_seed(1))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard, (soft > 0.5).float())
    assert torch.all((soft > 0) & (soft < 1))
    (hard * torch.arange(N)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # Straight-through: the gradient is the soft value's gradient.
    soft_grad = (soft * (1 - soft) / 0.7 * torch.arange(N)).detach()
    assert torch.allclose(logits.grad, soft_grad, atol=1e-6)


def test_gumbel_sigmoid_noise_and_determinism():
    logits = torch.linspace(-3, 3, 12)
    soft, same = gumbel_sigmoid(logits, 2.0, noise=False, hard=False)
    assert torch.equal(soft, same)
    assert torch.allclose(soft, torch.sigmoid(logits / 2.0))
    first = gumbel_sigmoid(logits, 1.0, noise=True, hard=True, generator=torch.Generator().manual_seed(5))[1]
    again = gumbel_sigmoid(logits, 1.0, noise=True, hard=True, generator=torch.Generator().manual_seed(5))[1]
    assert torch.equal(first, again)
    # Logistic noise makes P(keep) = sigmoid(logit), whatever the temperature.
    zeros = torch.full((20000,), 1.0)
    kept = gumbel_sigmoid(zeros, 0.3, noise=True, hard=True, generator=torch.Generator().manual_seed(2))[1]
    assert abs(kept.mean().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02
    with pytest.raises(ValueError, match="temperature"):
        gumbel_sigmoid(logits, 0.0)


def test_gumbel_sigmoid_noise_is_logistic_for_bf16_logits_and_unchanged_for_fp32():
    # DeepSpeed's bf16 casts the plug-in, so its logits arrive in bf16; the noise must still be logistic
    temperature = 8.0  # keeps soft away from 0 and 1, where bf16 could not give the noise back
    logits = torch.zeros(100_000, dtype=torch.bfloat16, requires_grad=True)
    soft, mask = gumbel_sigmoid(logits, temperature, generator=torch.Generator().manual_seed(3))
    assert soft.dtype == mask.dtype == torch.bfloat16
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    noise = temperature * torch.logit(soft.detach().double())
    assert abs(noise.std().item() - math.pi / math.sqrt(3)) < 0.05
    assert abs(noise.mean().item()) < 0.05 and noise.abs().max() < 20  # ln(1e5) = 11.5: no draw near -87
    mask.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0

    # float32 logits: the same values as before for the same seed
    logits = torch.randn(4, N, generator=torch.Generator().manual_seed(0))
    uniform = torch.rand(logits.shape, generator=torch.Generator().manual_seed(7)).clamp(
        torch.finfo(torch.float32).tiny, 1.0 - torch.finfo(torch.float32).eps)
    expected = torch.sigmoid((logits + uniform.log() - torch.log1p(-uniform)) / 0.7)
    soft, mask = gumbel_sigmoid(logits, 0.7, generator=torch.Generator().manual_seed(7))
    assert soft.dtype == torch.float32 and torch.equal(soft, expected) and torch.equal(mask, (expected > 0.5).float())


def test_threshold_keep_matches_sigmoid_rule():
    logits = torch.linspace(-4, 4, 81).reshape(3, 27)
    for temperature, threshold in ((1.0, 0.5), (0.2, 0.5), (1.5, 0.8), (0.5, 0.1)):
        keep = threshold_keep(logits, temperature, threshold)
        assert keep.dtype == torch.bool
        probabilities = torch.sigmoid(logits / temperature)
        away = (probabilities - threshold).abs() > 1e-6
        assert torch.equal(keep[away], (probabilities > threshold)[away])
    assert torch.equal(threshold_keep(logits, 0.2, 0.5), logits > 0)
    with pytest.raises(ValueError, match="threshold"):
        threshold_keep(logits, 1.0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        threshold_keep(logits, -1.0, 0.5)


def test_layer_averaged_keep_fraction():
    first = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    second = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # 10 layers: 2 full, layers 2..5 with `first`, layers 6..9 with `second`.
    value = layer_averaged_keep_fraction([first, second], start_layers=[2, 6], num_layers=10)
    sample0 = (2 * 1.0 + 4 * 0.5 + 4 * 0.25) / 10
    sample1 = (2 * 1.0 + 4 * 1.0 + 4 * 0.5) / 10
    assert math.isclose(value.item(), (sample0 + sample1) / 2, rel_tol=1e-6)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    masked = layer_averaged_keep_fraction([first, second], [2, 6], 10, valid_mask=valid)
    assert math.isclose(masked.item(), ((2 + 4 * 1.0 + 4 * 0.5) / 10 + sample1) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="strictly increasing"):
        layer_averaged_keep_fraction([first, second], [6, 2], 10)
    with pytest.raises(ValueError, match="equal length"):
        layer_averaged_keep_fraction([first], [2, 6], 10)
