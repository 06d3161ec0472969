import pytest
import torch

from lvlm_prune.rcp import DelayedRepairAdapter, PrunedContextEncoder

HIDDEN, CONTEXT, N, L, B = 32, 12, 16, 10, 2


def make_adapter(**overrides):
    torch.manual_seed(0)
    kwargs = dict(hidden_size=HIDDEN, context_dim=CONTEXT, bottleneck=8)
    kwargs.update(overrides)
    return DelayedRepairAdapter(**kwargs)


def make_stream(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 5.0 * torch.randn(B, L, HIDDEN, generator=g)
    context = torch.randn(B, CONTEXT, generator=g)
    answer_mask = torch.zeros(B, L, dtype=torch.bool)
    answer_mask[0, -3:] = True
    answer_mask[1, 4:6] = True  # a different (left-padded-like) place in the second sample
    return x, context, answer_mask


def perturb(module, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=g))


def test_adapter_is_identity_off_answer_positions_and_almost_identity_at_init():
    adapter = make_adapter()
    x, context, answer_mask = make_stream()
    out = adapter(x, context, answer_mask)
    assert out.shape == x.shape
    assert torch.equal(out[~answer_mask], x[~answer_mask])
    relative = (out - x)[answer_mask].norm(dim=-1) / x[answer_mask].norm(dim=-1)
    assert 0 < relative.max() < 1e-3

    exact = make_adapter(up_init_std=0.0)
    assert torch.equal(exact(x, context, answer_mask), x)


def test_perturbed_adapter_changes_only_answer_positions_and_reads_the_context():
    adapter = make_adapter()
    perturb(adapter)
    x, context, answer_mask = make_stream()
    out = adapter(x, context, answer_mask)
    assert torch.equal(out[~answer_mask], x[~answer_mask])
    assert torch.all((out - x)[answer_mask].abs().sum(-1) > 1e-3)
    other_context = adapter(x, context + 1.0, answer_mask)
    assert torch.equal(other_context[~answer_mask], x[~answer_mask])
    assert not torch.allclose(other_context[answer_mask], out[answer_mask])


def test_adapter_trains_from_the_first_step_and_passes_gradient_to_the_stream():
    adapter = make_adapter()
    x, context, answer_mask = make_stream()
    x.requires_grad_(True)
    target = torch.randn(B, L, HIDDEN, generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.1)
    loss = ((adapter(x, context, answer_mask) - target) ** 2).mean()
    loss.backward()
    for name, parameter in adapter.named_parameters():
        has_grad = parameter.grad is not None and parameter.grad.abs().sum() > 0
        # proj(x) reaches the output only through W_gamma / W_beta, which start at zero.
        assert has_grad == (not name.startswith("cond_proj")), name
    assert torch.allclose(x.grad[~answer_mask], 2 * (x - target)[~answer_mask] / target.numel())

    optimizer.step()
    optimizer.zero_grad()
    ((adapter(x.detach(), context, answer_mask) - target) ** 2).mean().backward()
    for name, parameter in adapter.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_adapter_keeps_input_dtype_and_handles_no_answer_positions():
    adapter = make_adapter()
    perturb(adapter)
    x, context, answer_mask = make_stream()
    low = x.to(torch.bfloat16)
    out = adapter(low, context, answer_mask)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[~answer_mask], low[~answer_mask])
    nothing = torch.zeros_like(answer_mask)
    assert torch.equal(adapter(x, context, nothing), x)


def test_adapter_rejects_bad_shapes():
    adapter = make_adapter()
    x, context, answer_mask = make_stream()
    with pytest.raises(ValueError, match="x has shape"):
        adapter(x[..., :-1], context, answer_mask)
    with pytest.raises(ValueError, match="context has shape"):
        adapter(x, context[:, :-1], answer_mask)
    with pytest.raises(ValueError, match="answer_mask has shape"):
        adapter(x, context, answer_mask[:, :-1])
    with pytest.raises(ValueError, match="up_init_std"):
        DelayedRepairAdapter(HIDDEN, up_init_std=-1.0)


def make_encoder():
    torch.manual_seed(0)
    return PrunedContextEncoder(HIDDEN, context_dim=CONTEXT, num_positions=N)


def test_context_encoder_summarises_pruned_tokens_and_kept_positions():
    encoder = make_encoder()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, N, HIDDEN, generator=g)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, :6] = False
    pruned = ~keep
    context = encoder(hidden, pruned, keep)
    assert context.shape == (B, CONTEXT)

    # Nothing pruned in sample 1: only the kept-position embedding remains.
    assert torch.allclose(context[1], encoder.position_embedding(keep[1].float()))
    # The pruned term reads only the pruned tokens, and through their mean.
    changed = hidden.clone()
    changed[keep] += 10.0
    changed[0, :6] = changed[0, :6].flip(0)
    assert torch.allclose(encoder(changed, pruned, keep), context, atol=1e-5)
    moved = hidden.clone()
    moved[0, :6] += 3.0 * torch.randn(6, HIDDEN, generator=g)
    assert not torch.allclose(encoder(moved, pruned, keep)[0], context[0])
    # Which positions survive matters, not only how many.
    shifted_keep = keep.clone()
    shifted_keep[0] = keep[0].roll(3)
    assert not torch.allclose(encoder(hidden, pruned, shifted_keep)[0], context[0])


def test_context_encoder_rejects_bad_shapes():
    encoder = make_encoder()
    hidden = torch.randn(B, N, HIDDEN)
    keep = torch.ones(B, N, dtype=torch.bool)
    with pytest.raises(ValueError, match="hidden has shape"):
        encoder(torch.randn(B, N + 1, HIDDEN), torch.zeros(B, N + 1, dtype=torch.bool), keep)
    with pytest.raises(ValueError, match="pruned_mask has shape"):
        encoder(hidden, torch.zeros(B, N - 1, dtype=torch.bool), keep)
    with pytest.raises(ValueError, match="keep_mask has shape"):
        encoder(hidden, ~keep, keep[:1])
    with pytest.raises(ValueError, match="num_positions"):
        PrunedContextEncoder(HIDDEN, num_positions=0)
