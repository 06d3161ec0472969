"""ACCM's optional caption gate: a head of the selector, trained from the stage-2 KLs, that decides per sample whether
the selector's pick is spliced at all ('accm_gated')."""

import pytest
import torch

from lvlm_prune.accm.compensation import KeptVisualTokens, splice_context
from lvlm_prune.accm.ranking import gate_loss
from lvlm_prune.accm.selector import CandidateSelector, GatedSelectorView
from lvlm_prune.flops import module_flops

from test_accm_compensation import RATIO, make_plugin, setup  # noqa: F401  (setup is a fixture)


def test_the_gate_starts_undecided_and_leaves_the_scores_alone():
    torch.manual_seed(0)
    plain = CandidateSelector(12, hidden=16, num_heads=2)
    torch.manual_seed(0)
    gated = CandidateSelector(12, hidden=16, num_heads=2, gate=True)
    features = torch.randn(4, 3, 12)
    scores, logits = gated.scores_and_gate(features)
    assert torch.equal(scores, plain(features)) and torch.equal(gated(features), scores)
    assert torch.equal(logits, torch.zeros(4))
    with pytest.raises(ValueError, match="no gate head"):
        plain.scores_and_gate(features)
    assert plain.scores_and_gate(features, with_gate=False)[1] is None
    with pytest.raises(ValueError, match="gate_scale"):
        CandidateSelector(12, hidden=16, num_heads=2, gate=True, gate_scale=0.0)


def test_the_gate_scale_multiplies_the_heads_logit():
    features = torch.randn(4, 3, 12)
    logits = []
    for scale in (1.0, 10.0):
        torch.manual_seed(0)
        selector = CandidateSelector(12, hidden=16, num_heads=2, gate=True, gate_scale=scale)
        torch.nn.init.normal_(selector.gate_head[1].weight)
        logits.append(selector.scores_and_gate(features)[1])
    assert logits[0].abs().min() > 0
    torch.testing.assert_close(logits[1], 10 * logits[0])


def test_the_gate_pools_the_real_candidates_only():
    torch.manual_seed(0)
    selector = CandidateSelector(12, hidden=16, num_heads=2, gate=True)
    torch.nn.init.normal_(selector.gate_head[1].weight)
    features = torch.randn(2, 3, 12)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    _, logits = selector.scores_and_gate(features, mask)
    changed = features.clone()
    changed[0, 2] += 5.0  # the masked candidate of sample 0
    _, again = selector.scores_and_gate(changed, mask)
    assert torch.equal(again, logits)
    # the same two real candidates alone give the same gate
    _, alone = selector.scores_and_gate(features[:1, :2])
    torch.testing.assert_close(alone, logits[:1])


def test_gate_loss_targets_the_lower_kl_and_decides_by_the_expected_difference():
    logits = torch.zeros(4, requires_grad=True)
    # three samples where the caption helps a little, one where it hurts a lot
    kl_caption = torch.tensor([0.4, 0.4, 0.4, 1.0])
    kl_none = torch.tensor([0.5, 0.5, 0.5, 0.5])
    loss = gate_loss(logits, kl_caption, kl_none)
    torch.testing.assert_close(loss, torch.log(torch.tensor(2.0)))
    # one shared logit: the loss's minimiser says "no caption", although the caption wins three samples of four
    shared = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([shared], lr=1.0)
    for _ in range(200):
        optimizer.zero_grad()
        gate_loss(shared.expand(4), kl_caption, kl_none).backward()
        optimizer.step()
    # the optimum: sigmoid(z) = sum of the helped samples' weights / all weights = 0.3 / 0.8
    torch.testing.assert_close(torch.sigmoid(shared), torch.tensor([0.3 / 0.8]), rtol=0, atol=1e-3)
    assert gate_loss(logits, kl_none, kl_none).item() == 0.0
    with pytest.raises(ValueError, match="same"):
        gate_loss(logits, kl_caption[:3], kl_none)


def test_the_gated_variant_exists_only_with_a_gate(setup):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    assert "accm_gated" not in plugin.variants()
    assert plugin.selector.gate_head is None
    with pytest.raises(ValueError, match="caption_gate: true"):
        plugin.generate(engine, batch, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id, variant="accm_gated")
    gated = make_plugin(engine, tokenizer, caption_gate=True, gate_scale=3.0)
    assert gated.variants()[-1] == "accm_gated"
    assert gated.export_config()["caption_gate"] is True and gated.selector.gate_scale == 3.0
    # an untrained gate (logit exactly 0) is not open: the gated variant answers as pruning alone
    args = (engine, batch, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id)
    alone, untrained = gated.generate(*args, variant="accm_prune_only"), gated.generate(*args, variant="accm_gated")
    assert torch.equal(untrained.tokens, alone.tokens) and torch.equal(untrained.text_tokens, alone.text_tokens)


def test_stage_2_trains_the_gate_on_the_selectors_pick(setup, monkeypatch):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, caption_gate=True, gate_weight=2.0)
    plain = plugin.training_losses(engine, batch, 0.0)  # stage 1: no gate term
    assert "gate" not in plain
    kl = torch.tensor([[0.3, 0.1, 0.2], [0.9, 0.8, 0.7], [0.2, 0.2, 0.2]])
    no_caption = torch.tensor([0.5, 0.5, 0.1])
    monkeypatch.setattr(plugin, "candidate_kl", lambda *args: {"kl": kl, "kl_no_caption": no_caption})
    scores = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    logits = torch.tensor([0.5, -0.5, 2.0], requires_grad=True)
    monkeypatch.setattr(plugin, "selector_scores_and_gate", lambda *args: (scores, logits, None))
    losses = plugin.training_losses(engine, batch, 0.9)
    # picks 2, 0, 1: KL 0.2 < 0.5 (caption helps), 0.9 > 0.5 (hurts), 0.2 > 0.1 (hurts)
    expected = gate_loss(logits, torch.tensor([0.2, 0.9, 0.2]), no_caption)
    torch.testing.assert_close(losses["gate"], expected.detach())
    torch.testing.assert_close(losses["gate_target_rate"], torch.tensor(1 / 3))
    torch.testing.assert_close(losses["gate_splice_rate"], torch.tensor(2 / 3))
    losses["loss"].backward()
    expected_grad, = torch.autograd.grad(2.0 * gate_loss(logits, torch.tensor([0.2, 0.9, 0.2]), no_caption), logits)
    torch.testing.assert_close(logits.grad, expected_grad)


def test_a_real_gate_gets_gradients_in_stage_2(setup):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, caption_gate=True)
    losses = plugin.training_losses(engine, batch, 0.9)
    assert {"gate", "gate_splice_rate", "gate_target_rate"} <= set(losses)
    losses["loss"].backward()
    assert all(p.grad is not None for p in plugin.selector.gate_head.parameters())


def test_the_gated_variant_splices_the_pick_only_where_the_gate_opens(setup, monkeypatch):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, caption_gate=True)
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    candidates = plugin.caption_candidates(batch, selection)
    scores, _, lengths = plugin.selector_scores_and_gate(batch, candidates)
    pick = scores.argmax(-1)
    # a gate that opens for sample 1 only
    monkeypatch.setattr(plugin.selector, "scores_and_gate",
                        lambda features: (scores, torch.tensor([-1.0, 1.0, -1.0])))
    result = plugin.generate(engine, batch, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             variant="accm_gated")
    empty = torch.zeros(0, dtype=torch.long)
    inserts = [empty, plugin.caption_inserts(candidates, pick)[1], empty]
    prompt = splice_context(batch["prompt_input_ids"], batch["prompt_attention_mask"], None, plugin.image_token_id,
                            inserts, tokenizer.pad_token_id, "left")
    expected, _ = engine.generate(prompt.input_ids, prompt.attention_mask, batch["pixel_values"], prompt.position_ids,
                                  method=KeptVisualTokens(selection.keep), max_new_tokens=4,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(result.tokens, expected)
    assert result.text_tokens.tolist() == (prompt.attention_mask.sum(1) - 16).tolist()
    # the caption model runs for every sample; the selector's count includes the gate head
    assert set(result.plugin_flops) == {"caption_model", "selector"}
    monkeypatch.undo()
    plugin._flops_cache.clear()  # counted under the stub above
    features, _ = plugin.selector_features(batch, candidates)
    plugin.selector.train()  # the unfused transformer, as selector_flops counts it
    head = module_flops(GatedSelectorView(plugin.selector), features[:1]) - module_flops(plugin.selector, features[:1])
    assert head > 0
    torch.testing.assert_close(plugin.selector_flops(lengths, with_gate=True) - plugin.selector_flops(lengths),
                               torch.full((3,), float(head)))
    result = plugin.generate(engine, batch, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             variant="accm_gated")
    torch.testing.assert_close(result.plugin_flops["selector"], plugin.selector_flops(lengths, with_gate=True))
