"""RCP on the engine: masks, gradients, soft/physical agreement, frozen base, a short fit."""

import pytest
import torch

from datamodules.synthetic import SyntheticVQADataModule
from lvlm_prune.data import answer_generation_mask
from lvlm_prune.engine import PrunedLlava
from lvlm_prune.modeling.loading import freeze, load_base_model
from lvlm_prune.rcp.compensation import RCPCompensation, RCPPruning, scale_layers


@pytest.fixture
def setup(tiny_base_dir):
    from conftest import TINY_DATA_ARGS

    torch.manual_seed(0)
    base = freeze(load_base_model(tiny_base_dir))
    engine = PrunedLlava(base)
    data = SyntheticVQADataModule(processor_path=str(tiny_base_dir), **TINY_DATA_ARGS)
    batch = next(iter(data.train_dataloader()))
    plugin = RCPCompensation(target_prune_ratio=0.75, pruning_layers=[0, 1, 2], repair_layers=[2, 3],
                             bottleneck=16, num_queries=4, context_dim=16, adapter_bottleneck=8)
    plugin.attach(engine)
    return engine, plugin, batch


def test_paper_layers_scale_with_depth():
    assert scale_layers((1, 13, 25), 32) == (1, 13, 25)
    assert scale_layers((1, 13, 25), 12) == (0, 5, 9)
    assert scale_layers((22, 29), 12) == (8, 11)


def test_initial_pruner_keeps_almost_everything_and_inference_masks_are_cumulative(setup):
    engine, plugin, batch = setup
    threshold, budgeted = plugin.inference_method(), plugin.inference_method(0.6)
    first_logits = []
    hook = plugin.pruners[0].register_forward_hook(lambda module, args, output: first_logits.append(output))
    with torch.no_grad():
        out = engine(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"],
                     method=threshold, logits="none")
    hook.remove()
    assert out.visual_tokens_per_layer.mean() / engine.info.num_visual_tokens >= 0.95  # measured: 1.0
    # the first pruner drops about half the tokens, the last one wants every token back (physical removal alone
    # could not show a comeback: it only ever removes)
    plugin.pruners[0].bias.data -= first_logits[0].median()
    plugin.pruners[-1].bias.data.fill_(25.0)
    with torch.no_grad():
        for method in (threshold, budgeted):
            engine(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"], method=method,
                   logits="none")
            masks = [mask.bool() for mask in method.cumulative]
            assert len(masks) == len(plugin.pruning_layers) and 0 < masks[0].float().mean() < 1
            for earlier, later in zip(masks, masks[1:]):
                assert not (later & ~earlier).any(), "a dropped token came back"


def test_gradients_reach_pruners_and_adapters_never_the_base(setup):
    engine, plugin, batch = setup
    losses = plugin.training_losses(engine, batch, progress=0.3)
    # the answer CE alone reaches the pruners only through the straight-through masks the attention uses
    # (that it is the only route: test_the_answer_ce_reaches_the_pruners_only_through_the_straight_through_mask)
    losses["ce"].backward(retain_graph=True)
    assert all(p.grad is None for p in engine.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in plugin.pruners.parameters())
    plugin.zero_grad(set_to_none=True)
    losses["loss"].backward()
    assert all(p.grad is None for p in engine.model.parameters())
    assert not any(p.requires_grad for p in engine.model.parameters())
    pruner_grads = [p.grad for p in plugin.pruners.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in pruner_grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in plugin.adapters.parameters())
    assert torch.isfinite(losses["loss"]) and set(losses) >= {"ce", "repair", "sparsity", "keep_fraction"}


def test_the_answer_ce_reaches_the_pruners_only_through_the_straight_through_mask(setup, monkeypatch):
    """With the straight-through term of the Gumbel mask detached (the forward unchanged), the answer CE gives the
    pruners no gradient at all: the mask the attention applies is the gradient's only route to them."""
    from lvlm_prune.rcp import compensation

    engine, plugin, batch = setup
    torch.manual_seed(0)
    plugin.training_losses(engine, batch, progress=0.3)["ce"].backward()
    live = [p.grad.clone() for p in plugin.pruners.parameters() if p.grad is not None]
    assert any(g.abs().sum() > 0 for g in live)
    plugin.zero_grad(set_to_none=True)

    straight_through = compensation.gumbel_sigmoid
    calls = []

    def detached(*args, **kwargs):
        soft, mask = straight_through(*args, **kwargs)
        calls.append(1)
        return soft, mask.detach()

    monkeypatch.setattr(compensation, "gumbel_sigmoid", detached)
    torch.manual_seed(0)
    losses = plugin.training_losses(engine, batch, progress=0.3)
    assert len(calls) == len(plugin.pruning_layers)  # every pruning layer's mask went through the patched function
    losses["ce"].backward()
    assert all(p.grad is None or not p.grad.any() for p in plugin.pruners.parameters())
    # the adapters still train from the CE: the loss was differentiable, only the masks' route was cut
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in plugin.adapters.parameters())


def test_a_noisy_training_pass_never_brings_a_dropped_token_back(setup):
    """The cumulative masks the training pass builds (which the sparsity loss and the repair context read): each
    pruning layer's kept set lies inside the previous one's, also when its own decision would keep dropped tokens."""
    engine, plugin, batch = setup
    # the first two pruners' logits sit near 0, so the noise drops about half the tokens at each; the last one's
    # bias outweighs the LLM baseline's penalty on tokens already dropped (their attention is floored): it would keep
    # them all
    for pruner, bias in zip(plugin.pruners, (0.0, 0.0, 25.0)):
        pruner.bias.data.fill_(bias)
    torch.manual_seed(0)
    method = RCPPruning(plugin, training=True, temperature=1.0, noise=True)
    engine(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["position_ids"],
           labels=batch["labels"], method=method, soft=True, logits="none")
    masks = [mask.detach() for mask in method.cumulative]
    assert len(masks) == len(plugin.pruning_layers) == 3
    assert ((masks[0] == 0) | (masks[0] == 1)).all() and 0 < masks[0].mean() < 0.9
    for earlier, later in zip(masks, masks[1:]):
        assert (later <= earlier).all(), "a dropped token came back"
    assert (masks[1] < masks[0]).any()  # the second layer drops tokens of its own
    assert torch.equal(masks[2], masks[1])


def calibrate_pruners_to_drop_about_half(engine, plugin, args, labels):
    """Sets each pruner's bias so that its threshold drops about half of the tokens still present at its layer (the
    cut halfway between the two middle logits, away from 0 on both paths), pruner by pruner: a later pruner's
    logits depend on the earlier ones' decisions."""
    for pruner in plugin.pruners:
        seen = []
        hook = pruner.register_forward_hook(lambda module, inputs, output: seen.append((output, inputs[4])))
        with torch.no_grad():
            engine(*args, labels=labels, method=RCPPruning(plugin, training=False, temperature=0.2), logits="none")
        hook.remove()
        logits, present = seen[0]
        values = logits[present > 0.5].sort().values
        middle = len(values) // 2
        pruner.bias.data -= (values[middle - 1] + values[middle]) / 2


def hard_and_soft_passes(engine, plugin, batch):
    """The physical-removal pass and the soft (noise-free) pass of pruners calibrated to drop about half of the
    tokens at each pruning layer, with non-identity adapters reading RCP's context of the pruned tokens, teacher
    forced; after checking that they agree at every answer position (and every other real text position)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-identity repair, so that the context of the pruned tokens enters the logits
        for module in (*plugin.adapters, *plugin.context_encoders.values()):
            for p in module.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["position_ids"])
    calibrate_pruners_to_drop_about_half(engine, plugin, args, batch["labels"])
    with torch.no_grad():
        hard = engine(*args, labels=batch["labels"], method=RCPPruning(plugin, training=False, temperature=0.2))
        soft = engine(*args, labels=batch["labels"], method=RCPPruning(plugin, training=True, temperature=0.2,
                                                                        noise=False), soft=True)
        unpruned = engine(*args, labels=batch["labels"])
    torch.testing.assert_close(hard.visual_tokens_per_layer, soft.visual_tokens_per_layer)
    answers = answer_generation_mask(batch["labels"])
    text = batch["attention_mask"].bool() & (batch["input_ids"] != engine.image_token_id)
    assert answers.any(1).all() and not (answers & ~text).any()
    torch.testing.assert_close(hard.logits[answers], soft.logits[answers], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(hard.logits[text], soft.logits[text], atol=2e-4, rtol=1e-4)
    # the pruning and the repair change the answers' logits: the agreement is not that of two unpruned passes
    assert (hard.logits[answers] - unpruned.logits[answers]).abs().max() > 1e-2
    return hard, soft


def assert_partial_and_falling(counts, drop_layers, n):
    """At every drop layer every sample keeps some of its tokens but not all, and fewer than at the one before."""
    for layer in drop_layers:
        assert ((counts[:, layer] > 0) & (counts[:, layer] < n)).all(), (layer, counts[:, layer])
    for earlier, later in zip(drop_layers, drop_layers[1:]):
        assert (counts[:, later] < counts[:, earlier]).all(), (earlier, later, counts)


def test_soft_and_physical_paths_agree_for_the_same_hard_mask(setup):
    engine, plugin, batch = setup
    hard, _ = hard_and_soft_passes(engine, plugin, batch)
    n = engine.info.num_visual_tokens
    assert plugin.drop_layers == (0, 1, 2)
    assert_partial_and_falling(hard.visual_tokens_per_layer, plugin.drop_layers, n)
    assert hard.visual_tokens_per_layer.mean() < n * 0.9


@pytest.mark.parametrize("ratio", [0.5, 0.6, 0.7])
def test_budgeted_inference_realises_the_requested_ratio(setup, ratio):
    engine, plugin, batch = setup
    with torch.no_grad():
        out = engine(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"],
                     method=plugin.inference_method(ratio), logits="none")
    counts = out.visual_tokens_per_layer
    realised = 1 - counts.mean().item() / engine.info.num_visual_tokens
    assert abs(realised - ratio) < 1 / 64  # rounding to whole tokens: one token at one layer of 16 x 4
    assert (counts == counts[:1]).all(), "every sample gets the same per-layer budget"
    assert counts[0].tolist() == engine.bind(plugin.inference_method(ratio)).planned_visual_tokens()
    with pytest.raises(ValueError, match="largest reachable ratio"):
        late = RCPCompensation(pruning_layers=[2, 3])
        late.attach(engine)
        late.keep_counts(0.9)


def test_budget_phase_trains_on_the_inference_token_counts(setup):
    engine, _, batch = setup
    keep = {}
    for mode in ("budget", "threshold"):
        torch.manual_seed(0)
        plugin = RCPCompensation(target_prune_ratio=0.6, pruning_layers=[0, 1, 2], repair_layers=[2, 3],
                                 bottleneck=16, num_queries=4, context_dim=16, adapter_bottleneck=8,
                                 noise_free_keep=mode)
        plugin.attach(engine)
        for pruner in plugin.pruners:  # logits above 0: the threshold keeps (nearly) every token
            pruner.bias.data.fill_(1.0)
        losses = plugin.training_losses(engine, batch, progress=0.9)  # noise off
        keep[mode] = losses["keep_fraction"].item()
        if mode == "budget":
            losses["loss"].backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in plugin.pruners.parameters())
            planned, starts = plugin.keep_counts(0.6), plugin.pruning_layers
            n, layers = engine.info.num_visual_tokens, engine.info.num_layers
            spans = [b - a for a, b in zip(starts, (*starts[1:], layers))]
            expected = (starts[0] * n + sum(k * span for k, span in zip(planned, spans))) / (layers * n)
    assert keep["budget"] == pytest.approx(expected, abs=1e-6)
    assert keep["threshold"] > 0.9
    with pytest.raises(ValueError, match="noise_free_keep"):
        RCPCompensation(noise_free_keep="topk")


def short_fit(engine, plugin, batch, steps=12):
    """Loss histories of `steps` Adam steps on one batch, noise off (a deterministic objective)."""
    optimizer = torch.optim.Adam(plugin.parameters(), lr=3e-3)
    history = {"loss": [], "ce": []}
    for _ in range(steps):
        losses = plugin.training_losses(engine, batch, progress=0.9)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        for key, values in history.items():
            values.append(losses[key].item())
    return history


def test_a_short_fit_lowers_the_loss(setup):
    engine, plugin, batch = setup
    history = short_fit(engine, plugin, batch)
    assert history["loss"][-1] < 0.8 * history["loss"][0], history["loss"]  # measured: 156 -> 74


def test_a_short_fit_without_the_sparsity_term_lowers_the_answer_ce(setup):
    """The sparsity term dominates the total, and pruning alone moves the CE of this random base; without it, the
    answer CE falls only if its own gradient trains the plug-in."""
    engine, plugin, batch = setup
    plugin.sparsity_weight = 0.0
    history = short_fit(engine, plugin, batch)
    assert history["ce"][-1] < history["ce"][0] - 0.1, history["ce"]
    assert history["loss"][-1] < history["loss"][0]


def test_bad_layers_are_named(tiny_base_dir):
    engine = PrunedLlava(freeze(load_base_model(tiny_base_dir)))
    with pytest.raises(ValueError, match=r"rcp pruning_layers=\[0, 7\]"):
        RCPCompensation(pruning_layers=[0, 7]).attach(engine)
    with pytest.raises(ValueError, match=r"repair_layers=\[1\] start before the first pruned layer 2"):
        RCPCompensation(pruning_layers=[2], repair_layers=[1]).attach(engine)
    RCPCompensation(pruning_layers=[2], repair_layers=[1], use_adapter=False).attach(engine)  # no adapter, no check
    with pytest.raises(ValueError, match=r"pruning_layers=\[0, 1\] with drop_after_pruning_layer: .* at least 2 apart"):
        RCPCompensation(pruning_layers=[0, 1], drop_after_pruning_layer=True).attach(engine)
    with pytest.raises(ValueError, match=r"repair_layers=\[1\] start before the first pruned layer 2"):
        RCPCompensation(pruning_layers=[1], repair_layers=[1], drop_after_pruning_layer=True).attach(engine)


def test_spec_timing_drops_after_the_pruning_layer(setup):
    """drop_after_pruning_layer: the pruning layer runs on every token, the next one on the kept ones, and the
    budget counts one more full layer; the soft and physical paths still agree."""
    engine, _, batch = setup
    plugin = RCPCompensation(target_prune_ratio=0.5, pruning_layers=[0, 2], repair_layers=[3], bottleneck=16,
                             num_queries=4, context_dim=16, adapter_bottleneck=8, drop_after_pruning_layer=True)
    plugin.attach(engine)
    hard, _ = hard_and_soft_passes(engine, plugin, batch)
    with torch.no_grad():
        budget = engine(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"],
                        batch["prompt_position_ids"], method=plugin.inference_method(0.5), logits="none")
    counts = hard.visual_tokens_per_layer
    n = engine.info.num_visual_tokens
    assert plugin.drop_layers == (1, 3)
    assert (counts[:, 0] == n).all()  # layer 0 decides on every token, layer 1 is the first pruned
    assert (counts[:, 1] == counts[:, 2]).all()  # layer 2 decides on layer 1's tokens; they go at layer 3
    assert_partial_and_falling(counts, plugin.drop_layers, n)
    assert abs(1 - budget.visual_tokens_per_layer.mean().item() / n - 0.5) < 0.05
    assert (budget.visual_tokens_per_layer[:, 0] == n).all()
    losses = plugin.training_losses(engine, batch, progress=0.5)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and 0 < losses["keep_fraction"] < 1
    assert all(p.grad is not None for p in plugin.pruners.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="target_prune_ratio=1.2"):
        RCPCompensation(target_prune_ratio=1.2)


def test_one_inference_method_reused_for_several_generations_gives_what_fresh_ones_give(setup):
    """The engine binds the method at every forward; nothing of an earlier forward (masks, adapter context) may
    carry over to the next."""
    engine, plugin, batch = setup
    for adapter in plugin.adapters:  # a non-identity adapter, so a doubled context would change the answers
        for p in adapter.parameters():
            torch.nn.init.normal_(p, std=0.5)
    prompt = (batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"])
    position_ids = batch["prompt_position_ids"]
    fresh = engine.generate(*prompt, position_ids=position_ids, method=plugin.inference_method(0.6), max_new_tokens=3)
    reused = plugin.inference_method(0.6)
    for _ in range(3):
        again = engine.generate(*prompt, position_ids=position_ids, method=reused, max_new_tokens=3)
        assert torch.equal(again[0], fresh[0]) and torch.equal(again[1], fresh[1])
    assert len(reused.cumulative) == len(plugin.pruning_layers)
    context = reused.context_for(engine.info.num_layers).clone()
    engine(*prompt, position_ids=position_ids, method=reused, logits="none")
    assert torch.allclose(reused.context_for(engine.info.num_layers), context)


def test_tokens_hidden_by_the_attention_mask_are_never_counted_or_kept(setup):
    engine, plugin, batch = setup
    n = engine.info.num_visual_tokens
    mask = batch["prompt_attention_mask"].clone()
    image = batch["prompt_input_ids"] == engine.image_token_id
    hidden = torch.zeros_like(image)
    for row in range(mask.shape[0]):  # hide the first half of each sample's visual tokens
        positions = image[row].nonzero().flatten()
        hidden[row, positions[: n // 2]] = True
    mask[hidden] = 0
    method = plugin.inference_method(0.6)
    with torch.no_grad():
        out = engine(batch["prompt_input_ids"], mask, batch["pixel_values"], method=method, logits="none")
    budget = plugin.keep_counts(0.6)
    assert method._start.sum(1).tolist() == [n - n // 2] * mask.shape[0]
    # each pruning layer keeps min(budget, what is still visible) tokens, all of them visible ones
    first = plugin.drop_layers[0]
    assert out.visual_tokens_per_layer[:, first].tolist() == [float(min(budget[0], n - n // 2))] * mask.shape[0]
    assert not (method.cumulative[0].bool() & ~method._start).any()


def test_a_repair_layer_reads_the_same_context_while_decoding_as_in_the_prefill(setup):
    """The context of a repair layer sums the pruning layers before it; decoding steps come after the whole prefill,
    when the later pruning layers' contexts exist too, and must not add them."""
    engine, _, batch = setup
    plugin = RCPCompensation(target_prune_ratio=0.5, pruning_layers=[0, 2], repair_layers=[1, 3], bottleneck=16,
                             num_queries=4, context_dim=16, adapter_bottleneck=8)
    plugin.attach(engine)
    contexts = []
    plugin.adapters[0].register_forward_hook(lambda module, args, output: contexts.append(args[1].detach().clone()))
    engine.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"],
                    position_ids=batch["prompt_position_ids"], method=plugin.inference_method(0.5), max_new_tokens=3)
    assert len(contexts) == 3  # the prefill and two decoding steps
    assert all(torch.equal(context, contexts[0]) for context in contexts[1:])


def test_flops_count_the_context_encoders_of_every_pruning_layer(setup):
    engine, plugin, _ = setup
    d, n, context = engine.info.hidden_size, engine.info.num_visual_tokens, plugin.context_dim
    projection, positions = 2 * d * context, 2 * n * context  # matmuls only: the masked mean is a sum
    flops = plugin.flops_per_sample(text_tokens=5)
    assert flops["rcp_context"] == len(plugin.pruning_layers) * (projection + positions)


def test_the_repair_loss_is_the_mean_over_the_repair_layers(setup, monkeypatch):
    from lvlm_prune.rcp import compensation

    engine, plugin, batch = setup
    per_layer = iter([torch.tensor(1.0), torch.tensor(3.0)])  # repair layers 2 and 3, in order
    monkeypatch.setattr(compensation, "repair_loss", lambda *args: next(per_layer))
    losses = plugin.training_losses(engine, batch, progress=0.3)
    assert losses["repair"].item() == 2.0
    expected = (plugin.ce_weight * losses["ce"] + plugin.sparsity_weight * losses["sparsity"]
                + plugin.repair_weight * 2.0)
    assert torch.allclose(losses["loss"], expected)
