"""Unit checks of RCP's plug-in pieces that the other RCP tests leave open: the pruner's input validation and
keep-mask threshold, the adapter's FiLM formula and its initial state, loss dtypes and edge values, schedule bounds,
and the plug-in's layer checks, context sums and token budgets (on a stand-in engine that only carries ModelInfo)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_rcp_adapter import make_adapter, make_encoder, make_stream, perturb
from test_rcp_pruner import B, N, make_inputs, make_pruner
from test_rcp_wiring import PLUGIN_ARGS, batch, data, setup  # noqa: F401  (fixtures)

from lvlm_prune.engine import ModelInfo
from lvlm_prune.rcp import (
    DelayedRepairAdapter,
    RCPSchedule,
    answer_ce,
    gumbel_sigmoid,
    gumbel_temperature,
    layer_averaged_keep_fraction,
    repair_loss,
    sparsity_loss,
    sparsity_target_keep,
    threshold_keep,
    training_progress,
    warmup_cosine_lr_lambda,
)
from lvlm_prune.rcp.compensation import RCPCompensation, RCPPruning

SMALL = dict(bottleneck=16, num_queries=4, context_dim=16, adapter_bottleneck=8)


def attached(num_layers=4, num_visual=16, **kwargs):
    """An RCP plug-in attached to a stand-in engine that has only the base model's ModelInfo."""
    plugin = RCPCompensation(**{**SMALL, **kwargs})
    info = ModelInfo(num_layers=num_layers, num_visual_tokens=num_visual, hidden_size=32, vision_feature_layer=-2)
    plugin.attach(SimpleNamespace(info=info))
    return plugin


# ------------------------------------------------------------------------------------------------------- pruner
def test_pruner_rejects_a_keep_mask_of_the_wrong_rank_and_a_zero_attention_floor():
    """Shape checks compare the rank too (a trailing axis is no match); the log floor must be positive."""
    pruner = make_pruner()
    visual, q2v, question, question_mask, keep = make_inputs()
    with pytest.raises(ValueError, match="keep_mask has shape"):
        pruner(visual, q2v, question, question_mask, keep[..., None])
    with pytest.raises(ValueError, match="attention_floor"):
        make_pruner(attention_floor=0.0)


def test_pruner_without_cross_attention_needs_no_head_divisible_bottleneck():
    """The heads constraint belongs to the cross-attention: without it, any bottleneck builds and runs."""
    pruner = make_pruner(use_cross_attention=False, bottleneck=10, num_heads=4)
    visual, q2v, _, _, keep = make_inputs()
    logits = pruner(visual, q2v, None, None, keep)
    assert logits.shape == (B, N) and torch.isfinite(logits).all()
    assert set(pruner.components(visual, q2v, None, None, keep)) == {"llm_baseline", "mlp", "bias"}
    # the same widths with the cross-attention are refused, naming the heads
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        make_pruner(use_cross_attention=True, bottleneck=10, num_heads=4)


def test_a_float_keep_mask_counts_tokens_above_one_half_as_kept():
    """A float running mask is thresholded at 0.5: 0.3 is a dropped token, 0.7 a kept one."""
    pruner = make_pruner()
    visual, q2v, question, question_mask, keep = make_inputs()
    keep[:, ::3] = False
    soft = torch.where(keep, torch.tensor(0.7), torch.tensor(0.3))
    expected = pruner(visual, q2v, question, question_mask, keep)
    torch.testing.assert_close(pruner(visual, q2v, question, question_mask, soft), expected)


def test_logits_at_dropped_tokens_stay_moderate_and_give_finite_gradients():
    """A loss that reads every logit, dropped tokens included, backpropagates finite gradients."""
    pruner = make_pruner()
    visual, q2v, question, question_mask, keep = make_inputs()
    keep[:, ::3] = False
    logits = pruner(visual, q2v, question, question_mask, keep)
    assert logits.abs().max() < 1e3
    logits.sum().backward()
    for name, parameter in pruner.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name


def test_hard_mask_without_noise_is_the_inference_threshold_also_at_a_zero_logit():
    """Noise-free training keeps exactly what inference keeps: logit > 0, a zero logit dropped; threshold in (0, 1)."""
    logits = torch.tensor([[-1.0, -1e-3, 0.0, 1e-3, 1.0]])
    _, mask = gumbel_sigmoid(logits, temperature=0.5, noise=False, hard=True)
    assert mask.tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]
    assert torch.equal(mask.bool(), threshold_keep(logits, 0.5))
    with pytest.raises(ValueError, match="threshold"):
        threshold_keep(logits, 1.0, 0.0)


def test_layer_averaged_keep_fraction_bounds_and_gradient():
    """A start at num_layers is allowed (weight 0); the gradient is span / (layers * tokens); bad input is named."""
    first = torch.tensor([[1.0, 1.0, 0.0, 0.0]], requires_grad=True)
    second = torch.tensor([[1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    # a mask in force from the last layer on counts for no layer: 2 full layers, 2 at a half, 0 at a quarter
    value = layer_averaged_keep_fraction([first, second], [2, 4], num_layers=4)
    assert value.item() == pytest.approx((2 + 2 * 0.5) / 4)
    value.backward()
    # d/d mask_i = span / (num_layers * tokens): straight-through masks get the budget's gradient
    assert torch.allclose(first.grad, torch.full_like(first, 2 / (4 * 4)))
    assert torch.allclose(second.grad, torch.zeros_like(second))
    with pytest.raises(ValueError, match="non-empty"):
        layer_averaged_keep_fraction([], [], 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        layer_averaged_keep_fraction([first, second], [2, 2], 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, num_layers=4\]"):
        layer_averaged_keep_fraction([first, second], [2, 5], 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, num_layers=4\]"):
        layer_averaged_keep_fraction([first, second], [-1, 2], 4)


# ------------------------------------------------------------------------------------------------------ adapter
def film_reference(adapter, x, context, answer_mask, alpha):
    """out = x + alpha * Up(gamma * GELU(Down(n(x))) + beta), gamma = 1 + W_gamma(cond), beta = W_beta(cond),
    cond = context + proj(n(x)), position by position; x itself elsewhere."""
    out = x.clone()
    for b, t in answer_mask.nonzero().tolist():
        normed = F.layer_norm(x[b, t], (x.shape[-1],), adapter.norm.weight, adapter.norm.bias)
        cond = context[b] + adapter.cond_proj(normed)
        gamma, beta = 1.0 + adapter.film_gamma(cond), adapter.film_beta(cond)
        out[b, t] = x[b, t] + alpha * adapter.up(gamma * F.gelu(adapter.down(normed)) + beta)
    return out


def test_adapter_at_init_adds_a_tenth_of_the_unmodulated_bottleneck():
    """Zero FiLM (gamma = 1, beta = 0), a zero Up bias and alpha = 0.1 at init."""
    adapter = make_adapter()
    x, context, answer_mask = make_stream()
    with torch.no_grad():
        out = adapter(x, context, answer_mask)
        normed = F.layer_norm(x, (x.shape[-1],))  # the LayerNorm's affine starts at the identity
        expected = x + 0.1 * F.gelu(adapter.down(normed)) @ adapter.up.weight.T
    torch.testing.assert_close(out[answer_mask], expected[answer_mask], atol=1e-6, rtol=1e-5)
    assert (out - x)[answer_mask].abs().max() > 1e-5  # not the identity: the comparison above can fail


def test_trained_adapter_follows_the_film_formula_with_each_samples_own_context():
    """With non-zero weights the output is METHODS' FiLM formula, each sample conditioned on its own context."""
    adapter = make_adapter()
    perturb(adapter)
    x, context, answer_mask = make_stream()
    with torch.no_grad():
        out = adapter(x, context, answer_mask)
        expected = film_reference(adapter, x, context, answer_mask, adapter.alpha)
        swapped = adapter(x, context.flip(0), answer_mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(swapped[answer_mask], out[answer_mask])


def test_adapter_rejects_an_empty_width():
    """Each width of the adapter must be at least 1."""
    for name in ("hidden_size", "context_dim", "bottleneck"):
        with pytest.raises(ValueError, match=name):
            DelayedRepairAdapter(**{**dict(hidden_size=8, context_dim=4, bottleneck=2), name: 0})


def test_context_is_exactly_the_position_term_when_nothing_was_pruned_also_after_training():
    """The pruned-token term has no bias anywhere (norm or projection): zero, whatever the weights."""
    encoder = make_encoder()
    perturb(encoder)
    n = encoder.num_positions
    hidden = torch.randn(2, n, 32, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, ::2] = False
    with torch.no_grad():
        context = encoder(hidden, torch.zeros_like(keep), keep)
        torch.testing.assert_close(context, encoder.position_embedding(keep.float()))


def test_context_encoder_reads_a_float_keep_mask_at_one_half():
    """A float keep mask is thresholded at 0.5 for the kept-position term, like the pruner's."""
    encoder = make_encoder()
    n = encoder.num_positions
    hidden = torch.randn(2, n, 32, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[:, :5] = False
    soft = torch.where(keep, torch.tensor(0.7), torch.tensor(0.3))
    with torch.no_grad():
        torch.testing.assert_close(encoder(hidden, ~keep, soft), encoder(hidden, ~keep, keep))


# ------------------------------------------------------------------------------------------------------- losses
def test_losses_are_float32_for_bf16_inputs():
    """bf16 states and logits (DeepSpeed's bf16) give float32 losses, computed in float32."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 4, generator=g).to(torch.bfloat16)
    teacher = torch.randn(2, 5, 4, generator=g).to(torch.bfloat16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss = repair_loss(student, teacher, mask)
    s, t = student.float().reshape(-1, 4), teacher.float().reshape(-1, 4)
    expected = F.mse_loss(s.mean(0), t.mean(0)) + 3.0 * F.mse_loss(s.var(0, unbiased=False), t.var(0, unbiased=False))
    assert loss.dtype == torch.float32 and torch.allclose(loss, expected, atol=1e-6)
    assert sparsity_loss(torch.tensor(0.3, dtype=torch.bfloat16), 0.25).dtype == torch.float32
    logits = torch.randn(2, 5, 7, generator=g).to(torch.bfloat16)
    assert answer_ce(logits, torch.randint(0, 7, (2, 5), generator=g)).dtype == torch.float32


def test_losses_reject_inputs_without_a_feature_axis():
    """A (B, L) student or logits tensor is refused, not silently reduced."""
    student = torch.randn(2, 5)
    with pytest.raises(ValueError, match="expected \\(B, L, d\\)"):
        repair_loss(student, student, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected \\(B, L, V\\)"):
        answer_ce(student, torch.zeros(2, 5, dtype=torch.long))


def test_sparsity_loss_accepts_the_keep_all_target_of_the_schedules_start():
    """Targets 1 (the annealing's start) and 0 are in range."""
    assert sparsity_loss(torch.tensor(0.75), 1.0).item() == pytest.approx(0.25)
    assert sparsity_loss(torch.tensor(0.75), 0.0).item() == pytest.approx(0.75)


def test_answer_ce_skips_its_own_ignore_index():
    """The ignore_index argument sets both the skipped labels and the count the mean divides by."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, 6, generator=g)
    labels = torch.tensor([[-1, -1, 2, 5]])
    expected = -(F.log_softmax(logits[0, 1], -1)[2] + F.log_softmax(logits[0, 2], -1)[5]) / 2
    assert torch.allclose(answer_ce(logits, labels, ignore_index=-1), expected)


# ---------------------------------------------------------------------------------------------------- schedules
def test_training_progress_is_clamped_to_one_and_rejects_negative_steps():
    """Steps past the plan give progress 1; a negative step is an error."""
    assert training_progress(250, 1000) == 0.25
    assert training_progress(1200, 1000) == 1.0
    with pytest.raises(ValueError, match="step=-1"):
        training_progress(-1, 1000)


def test_schedule_fractions_accept_both_ends_of_their_ranges():
    """Fractions documented as [0, 1] or (0, 1] accept their closed ends."""
    assert sparsity_target_keep(0.5, 0.0) == 0.0  # prune everything: a valid (if useless) target
    assert sparsity_target_keep(0.5, 1.0) == 1.0
    assert sparsity_target_keep(0.5, 0.25, anneal_fraction=1.0) == pytest.approx(0.625)
    assert gumbel_temperature(0.5, anneal_fraction=1.0) == pytest.approx((1.5 * 0.2) ** 0.5)
    never, always = RCPSchedule(0.5, noise_off_fraction=0.0), RCPSchedule(0.5, noise_off_fraction=1.0)
    assert not never(0.0).noise and always(0.999).noise and not always(1.0).noise
    assert warmup_cosine_lr_lambda(10, final_ratio=0.0)(10) == 0.0
    assert warmup_cosine_lr_lambda(10, warmup_fraction=0.0)(0) == 1.0


def test_schedules_reject_out_of_range_settings():
    """A zero end temperature, negative fractions and an empty plan are refused."""
    with pytest.raises(ValueError, match="end=0"):
        gumbel_temperature(0.5, end=0.0)
    with pytest.raises(ValueError, match="noise_off_fraction"):
        RCPSchedule(0.5, noise_off_fraction=-0.1)
    with pytest.raises(ValueError, match="warmup_fraction"):
        warmup_cosine_lr_lambda(10, warmup_fraction=-0.1)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine_lr_lambda(0)


def test_lr_multiplier_when_warm_up_takes_every_planned_step():
    """With no decay phase left the multiplier is final_ratio at and after total_steps (not the peak again)."""
    lr_lambda = warmup_cosine_lr_lambda(2, warmup_fraction=0.9, final_ratio=0.3)  # ceil(1.8) = 2 warm-up steps
    assert [lr_lambda(step) for step in range(4)] == pytest.approx([0.5, 1.0, 0.3, 0.3])


# ------------------------------------------------------------------------------------------- plug-in (RCP wiring)
def test_plug_in_rejects_impossible_settings():
    """r = 1, empty layer lists, layers out of range or unsorted, and spec timing with no layer to drop at."""
    with pytest.raises(ValueError, match="target_prune_ratio=1.0"):
        RCPCompensation(target_prune_ratio=1.0)
    for name in ("pruning_layers", "repair_layers"):
        with pytest.raises(ValueError, match=rf"rcp {name}=\[\] is empty"):
            RCPCompensation(**{name: []})
    with pytest.raises(ValueError, match=r"pruning_layers=\[0, 4\] must be increasing layers in \[0, 3\]"):
        attached(pruning_layers=[0, 4])
    with pytest.raises(ValueError, match=r"pruning_layers=\[2, 0\] must be increasing"):
        attached(pruning_layers=[2, 0])
    with pytest.raises(ValueError, match=r"repair_layers=\[3, 3\] must be increasing"):
        attached(pruning_layers=[0], repair_layers=[3, 3])
    with pytest.raises(ValueError, match=r"pruning_layers=\[3\] with drop_after_pruning_layer"):
        attached(pruning_layers=[3], repair_layers=[3], drop_after_pruning_layer=True)  # no layer after 3 to drop at


def test_a_repair_layer_may_be_the_first_pruning_layer_and_reads_its_context():
    """Tokens go at the pruning layer's input, so its own output already lacks them: an adapter there has work, and
    the pruning layer that is also the last repair layer keeps a context encoder."""
    plugin = attached(pruning_layers=[1, 2], repair_layers=[2])
    assert sorted(plugin.context_encoders) == ["0", "1"]
    assert len(attached(pruning_layers=[2], repair_layers=[2]).adapters) == 1


def test_paper_layers_switch_to_the_early_set_only_above_a_ratio_of_0_8():
    """METHODS' default layers: 4/14/24 up to r = 0.8 (0.667, 0.778), 1/13/25 above; repair 22/29."""
    assert attached(num_layers=32, target_prune_ratio=0.8).pruning_layers == (4, 14, 24)
    assert attached(num_layers=32, target_prune_ratio=0.889).pruning_layers == (1, 13, 25)
    assert attached(num_layers=32).repair_layers == (22, 29)


def test_schedule_uses_the_configured_temperatures_and_the_kept_fraction():
    """The plug-in's schedule anneals between its own temperatures to 1 - r; inference uses the final one."""
    plugin = attached(target_prune_ratio=0.75, pruning_layers=[1], temperature_start=2.0, temperature_end=0.5)
    start, end = plugin.schedule(0.0), plugin.schedule(1.0)
    assert (start.temperature, end.temperature) == pytest.approx((2.0, 0.5))
    assert end.target_keep_fraction == pytest.approx(0.25)
    assert plugin.inference_method().temperature == 0.5


def test_keep_counts_count_the_full_layers_before_the_first_drop():
    # drops at layers 1 and 3 of 4 (decided at 0 and 2): (1 + 2 lam + lam^2) / 4 = 1/2 gives lam = sqrt(2) - 1
    """Budget counts solve the layer average with the drop layers (spec timing) and keep at least one token."""
    plugin = attached(target_prune_ratio=0.5, pruning_layers=[0, 2], repair_layers=[3], drop_after_pruning_layer=True)
    lam = 2 ** 0.5 - 1
    assert plugin.keep_counts(0.5) == [round(16 * lam), round(16 * lam ** 2)] == [7, 3]
    # a budget below one token still keeps one
    assert attached(pruning_layers=[0]).keep_counts(0.99) == [1]


def test_planned_tokens_under_the_trained_threshold_are_the_target_ratios_average():
    """Without a ratio, the plan is (1 - r*) N in every layer."""
    plugin = attached(target_prune_ratio=0.75, pruning_layers=[1])
    method = plugin.inference_method()
    method.bind(plugin.info)
    assert method.planned_visual_tokens() == [4.0] * 4


def test_repair_context_sums_the_pruning_layers_up_to_and_including_the_repair_layer():
    """A repair layer's context is the sum over pruning layers <= it; none before the first."""
    plugin = attached(pruning_layers=[0, 2], repair_layers=[2, 3])
    method = RCPPruning(plugin, training=False, temperature=0.2)
    first, second = torch.tensor([[1.0, 2.0]]), torch.tensor([[10.0, 20.0]])
    method.contexts = [(0, first), (2, second)]
    assert torch.equal(method.context_for(1), first)
    assert torch.equal(method.context_for(2), first + second)
    method.contexts = [(2, second)]
    assert method.context_for(1) is None


def test_keep_fraction_counts_from_the_drop_layers_over_the_tokens_present_at_the_start():
    """The budget's realised fraction counts layers from the drop layers, per sample over its present tokens."""
    plugin = attached(target_prune_ratio=0.5, pruning_layers=[0, 2], repair_layers=[3], drop_after_pruning_layer=True)
    method = RCPPruning(plugin, training=True, temperature=1.0)
    method.bind(plugin.info)
    start = torch.ones(2, 16, dtype=torch.bool)
    start[1, 8:] = False  # the second sample has 8 visual tokens
    first, second = torch.zeros(2, 16), torch.zeros(2, 16)
    first[:, :4], second[:, :2] = 1.0, 1.0
    method._start, method.cumulative = start, [first, second]
    # layer 0 full, layers 1-2 keep 4 tokens, layer 3 keeps 2: of 16, and of 8
    expected = ((1 + 2 * 4 / 16 + 2 / 16) / 4 + (1 + 2 * 4 / 8 + 2 / 8) / 4) / 2
    assert method.keep_fraction().item() == pytest.approx(expected)


def test_soft_path_attention_weight_is_the_cumulative_mask_in_value_and_gradient(setup):
    """The engine multiplies the pruning layers' decisions into a token's key weight: each layer must hand over its
    own decision once, so that the product is the cumulative mask with the cumulative mask's gradient."""
    engine, plugin, batch = setup
    for pruner in plugin.pruners:  # logits near 0: the noise drops about half of the tokens at each layer
        pruner.bias.data.zero_()
    torch.manual_seed(0)
    method = RCPPruning(plugin, training=True, temperature=1.0, noise=True)
    out = engine(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["position_ids"],
                 labels=batch["labels"], method=method, soft=True, logits="none")
    rows, columns = (out.state.visual_index >= 0).nonzero(as_tuple=True)
    tokens = out.state.visual_index[rows, columns]
    start = method._start[rows, tokens]
    weight = out.state.key_weight[rows, columns][start]
    cumulative = method.cumulative[-1][rows, tokens][start]
    assert torch.equal(weight, cumulative) and 0.1 < cumulative.mean() < 0.9
    parameters = [p for p in plugin.pruners.parameters() if p.requires_grad]
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    from_weight = torch.autograd.grad((weight * direction).sum(), parameters, retain_graph=True, allow_unused=True)
    from_mask = torch.autograd.grad((cumulative * direction).sum(), parameters, allow_unused=True)
    for a, b in zip(from_weight, from_mask):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))


def test_the_budget_replaces_the_threshold_only_once_the_noise_is_off(setup):
    """noise_free_keep='budget' applies in the noise-free phase only; the logged keep fraction has no graph."""
    engine, _, batch = setup
    plugin = RCPCompensation(**{**PLUGIN_ARGS, "target_prune_ratio": 0.6, "noise_free_keep": "budget"})
    plugin.attach(engine)
    for pruner in plugin.pruners:  # the noisy threshold keeps every token
        pruner.bias.data.fill_(50.0)
    torch.manual_seed(0)
    noisy = plugin.training_losses(engine, batch, progress=0.5)
    assert noisy["keep_fraction"].item() == 1.0 and not noisy["keep_fraction"].requires_grad
    assert plugin.training_losses(engine, batch, progress=0.9)["keep_fraction"].item() < 0.9
