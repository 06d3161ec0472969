"""RCP's optional saliency ranking loss: the listwise target, the saliency the teacher pass computes, and what the
training step does with them."""

import math

import pytest
import torch

from datamodules.synthetic import SyntheticVQADataModule
from lvlm_prune.engine import KeepWeightProbe, PrunedLlava
from lvlm_prune.modeling.loading import freeze, load_base_model
from lvlm_prune.rcp.compensation import RCPCompensation
from lvlm_prune.rcp.losses import saliency_ranking_loss

PLUGIN_ARGS = dict(target_prune_ratio=0.75, pruning_layers=[0, 1, 2], repair_layers=[2, 3], bottleneck=16,
                   num_queries=4, context_dim=16, adapter_bottleneck=8)


@pytest.fixture(scope="module")
def batch(tiny_base_dir):
    from conftest import TINY_DATA_ARGS

    data = SyntheticVQADataModule(processor_path=str(tiny_base_dir), **TINY_DATA_ARGS)
    return next(iter(data.train_dataloader()))


@pytest.fixture
def setup(tiny_base_dir, batch):
    torch.manual_seed(0)
    engine = PrunedLlava(freeze(load_base_model(tiny_base_dir)))
    plugin = RCPCompensation(**PLUGIN_ARGS, saliency_weight=1.0)
    plugin.attach(engine)
    return engine, plugin, batch


def inputs_of(batch):
    return batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["position_ids"]


# ---------------------------------------------------------------------------------------------- the ranking loss
def test_the_loss_is_zero_when_the_top_k_salient_present_tokens_lead_together_by_a_wide_margin():
    saliency = torch.tensor([[0.5, 3.0, 2.0, -1.0, 9.0]])
    present = torch.tensor([[True, True, True, True, False]])  # 9.0 is gone already: not a target
    logits = torch.tensor([[-50.0, 40.0, 40.0, -50.0, -50.0]])
    assert saliency_ranking_loss(logits, present, saliency, keep=2).item() == pytest.approx(0.0, abs=1e-6)
    # the target is uniform over the k: an order among the kept tokens costs (they are all kept)
    assert saliency_ranking_loss(logits + torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]]), present, saliency,
                                 keep=2).item() > 0.05
    # the same logits with the absent token's saliency as a target would cost
    assert saliency_ranking_loss(logits, torch.ones_like(present), saliency, keep=2).item() > 10


def test_uniform_logits_cost_log_of_present_over_kept_and_the_loss_ignores_a_shift():
    saliency = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    present = torch.ones(3, 8, dtype=torch.bool)
    present[1, :4] = False  # 4 present: the target is 3 of them
    loss = saliency_ranking_loss(torch.zeros(3, 8), present, saliency, keep=3)
    assert loss.item() == pytest.approx((2 * math.log(8 / 3) + math.log(4 / 3)) / 3, rel=1e-5)
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(saliency_ranking_loss(logits + 7.0, present, saliency, keep=3),
                               saliency_ranking_loss(logits, present, saliency, keep=3))


def test_fewer_present_tokens_than_kept_ones_make_every_present_token_the_target_and_empty_rows_are_skipped():
    saliency = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    present = torch.tensor([[False, True, False, True], [False, False, False, False]])
    logits = torch.tensor([[0.0, 30.0, -30.0, 30.0], [5.0, 0.0, 0.0, 0.0]], requires_grad=True)
    loss = saliency_ranking_loss(logits, present, saliency, keep=3)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert logits.grad[1].abs().sum() == 0  # the row with nothing present takes no part
    logits, saliency_one = torch.randn(1, 4, generator=torch.Generator().manual_seed(2)), saliency[:1]
    alone = saliency_ranking_loss(logits, torch.ones(1, 4, dtype=torch.bool), saliency_one, keep=2)
    beside_an_empty_row = saliency_ranking_loss(torch.cat([logits, logits]), torch.tensor([[True] * 4, [False] * 4]),
                                                torch.cat([saliency_one, saliency_one]), keep=2)
    torch.testing.assert_close(beside_an_empty_row, alone)  # the mean is over rows with a present token
    nothing = torch.zeros(2, 4, dtype=torch.bool)
    fresh = torch.zeros(2, 4, requires_grad=True)
    empty = saliency_ranking_loss(fresh, nothing, saliency, keep=3)
    assert empty.item() == 0.0 and empty.requires_grad


def test_its_gradient_raises_the_salient_tokens_logits_and_lowers_the_others():
    saliency = torch.tensor([[0.1, 5.0, 4.0, -2.0, 0.3, 0.2]])
    logits = torch.zeros(1, 6, requires_grad=True)
    saliency_ranking_loss(logits, torch.ones(1, 6, dtype=torch.bool), saliency, keep=2).backward()
    assert (logits.grad[0, [1, 2]] < 0).all() and (logits.grad[0, [0, 3, 4, 5]] > 0).all()


def test_bad_shapes_and_budgets_are_named():
    good = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="saliency has shape"):
        saliency_ranking_loss(good, good.bool(), torch.zeros(2, 5), keep=1)
    with pytest.raises(ValueError, match="keep=0"):
        saliency_ranking_loss(good, good.bool(), good, keep=0)
    with pytest.raises(ValueError, match="saliency_weight=-1"):
        RCPCompensation(saliency_weight=-1.0)


# ------------------------------------------------------------------------------------- the saliency and the step
def test_the_saliency_is_the_finite_difference_slope_of_the_teacher_answer_loss(setup):
    """-dCE/dw_i at every weight 1, against the central difference (CE(w_i = 1 - h) - CE(w_i = 1 + h)) / 2h in
    float64, for the three tokens of largest |saliency| over the batch (the pass keeps some float32 parts, whose
    rounding is noise on a small slope)."""
    engine, plugin, batch = setup
    engine.model.double()
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    inputs, labels = inputs_of(batch), batch["labels"]
    _, saliency = plugin.teacher_with_saliency(engine, inputs, labels, ())
    n = engine.info.num_visual_tokens

    def loss_at(weights):
        with torch.no_grad():
            out = engine(*inputs, labels=labels, method=KeepWeightProbe(weights), soft=True)
            shifted = labels[:, 1:]  # answer_ce's mean, in float64 (answer_ce rounds to float32)
            return torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), shifted, ignore_index=-100)

    ones, h = torch.ones(labels.shape[0], n, dtype=torch.float64), 1e-3
    per_token = saliency.sum(0)  # one token of every sample moves: the batch-mean CE's slope sums the samples'
    assert per_token.abs().max() > 1e-3  # not a zero that any slope check would pass
    for token in per_token.abs().topk(3).indices.tolist():
        lower, upper = ones.clone(), ones.clone()
        lower[:, token], upper[:, token] = 1 - h, 1 + h
        slope = (loss_at(lower) - loss_at(upper)) / (2 * h)
        assert slope.item() == pytest.approx(per_token[token].item(), rel=5e-3, abs=5e-5)


def test_the_teacher_with_saliency_captures_what_the_no_grad_teacher_captures(setup):
    engine, plugin, batch = setup
    layers = tuple(plugin.repair_layers)
    teacher, saliency = plugin.teacher_with_saliency(engine, inputs_of(batch), batch["labels"], layers)
    with torch.no_grad():
        plain = engine(*inputs_of(batch), labels=batch["labels"], capture_layers=layers, logits="none")
    assert saliency.shape == (batch["labels"].shape[0], engine.info.num_visual_tokens)
    for layer in layers:
        assert not teacher.captured[layer].requires_grad
        torch.testing.assert_close(teacher.captured[layer], plain.captured[layer], atol=1e-4, rtol=1e-4)


def test_a_training_step_adds_the_weighted_ranking_loss_of_every_pruning_layer(setup, monkeypatch):
    from lvlm_prune.rcp import compensation

    engine, plugin, batch = setup
    calls = []
    original = compensation.saliency_ranking_loss

    def recording(logits, present, saliency, keep):
        calls.append((logits.shape, present.clone(), keep))
        return original(logits, present, saliency, keep)

    monkeypatch.setattr(compensation, "saliency_ranking_loss", recording)
    plugin.saliency_weight = 2.5
    losses = plugin.training_losses(engine, batch, progress=0.5)
    assert [keep for _, _, keep in calls] == plugin.keep_counts(plugin.target_prune_ratio)
    assert calls[0][1].all()  # the first pruner ranks every token; later ones only those still present
    expected = (plugin.ce_weight * losses["ce"] + plugin.sparsity_weight * losses["sparsity"]
                + plugin.repair_weight * losses["repair"] + 2.5 * losses["saliency"])
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    assert all(p.grad is None for p in engine.model.parameters())


def test_without_its_weight_the_step_has_no_saliency_term_and_a_no_grad_teacher(setup, monkeypatch):
    engine, plugin, batch = setup
    plugin.saliency_weight = 0.0
    monkeypatch.setattr(RCPCompensation, "teacher_with_saliency", lambda *a: pytest.fail("saliency computed"))
    assert "saliency" not in plugin.training_losses(engine, batch, progress=0.5)


def test_a_short_fit_on_the_ranking_loss_alone_teaches_the_pruners_the_saliency_order(setup):
    engine, plugin, batch = setup
    plugin.ce_weight = plugin.repair_weight = plugin.sparsity_weight = 0.0
    optimizer = torch.optim.Adam(plugin.parameters(), lr=3e-3)
    history = []
    for _ in range(20):
        losses = plugin.training_losses(engine, batch, progress=0.9)  # noise off: a deterministic objective
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(losses["saliency"].item())
    assert history[-1] < 0.8 * history[0], history  # measured: 1.43 -> 1.05 in 15 steps
