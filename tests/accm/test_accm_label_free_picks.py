"""The label-free candidate picks that need no trained selector: the caption model's first beam, and the frozen
LVLM's confidence in its first answer token with each candidate spliced (on the kept visual tokens only)."""

import pytest
import torch

from lvlm_prune.accm.compensation import KeptVisualTokens, splice_context
from lvlm_prune.flops import llm_prefill_flops

from test_accm_compensation import RATIO, make_plugin, setup  # noqa: F401  (setup is a fixture)


def spy_on_picks(plugin, monkeypatch):
    picks = []
    inserts = plugin.caption_inserts
    monkeypatch.setattr(plugin, "caption_inserts",
                        lambda candidates, pick=None: (pick is not None and picks.append(pick)) or
                        inserts(candidates, pick))
    return picks


def test_top_beam_splices_each_samples_first_candidate_at_no_extra_cost(setup, monkeypatch):  # noqa: F811
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    picks = spy_on_picks(plugin, monkeypatch)
    result = plugin.generate(engine, batch, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             variant="accm_top_beam")
    assert [p.tolist() for p in picks] == [[0, 0, 0]]
    assert set(result.plugin_flops) == {"caption_model"}


@pytest.mark.parametrize("gate", [False, True], ids=["candidates", "gate"])
def test_confidence_picks_the_option_whose_prompt_gives_the_surest_first_token(setup, monkeypatch, gate):  # noqa: F811
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    candidates = plugin.caption_candidates(batch, selection)
    num = candidates.lengths.shape[1]
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    # each candidate spliced alone for the whole batch (the gate: and the prompt as it is, option M), scored by the
    # greedy token's log-probability
    confidence, flops = [], torch.zeros(3, dtype=torch.float64)
    for m in range(num + gate):
        inserts = plugin.caption_inserts(candidates, torch.full((3,), min(m, num - 1)))
        prompt = splice_context(ids, mask, None, plugin.image_token_id,
                                inserts if m < num else [torch.zeros(0, dtype=torch.long)] * 3,
                                tokenizer.pad_token_id, "left")
        if m == num:
            assert torch.equal(prompt.input_ids, ids)
        out = engine(prompt.input_ids, prompt.attention_mask, None, prompt.position_ids, logits="last",
                     method=KeptVisualTokens(selection.keep, RATIO), visual_inputs=(selection.kept_features, ()))
        confidence.append(torch.log_softmax(out.logits, -1).max(-1).values)
        text = ((prompt.attention_mask > 0) & (prompt.input_ids != plugin.image_token_id)).sum(1)
        flops += torch.tensor([llm_prefill_flops(plugin.llm_shape, float(text[b]), [2.0] * 4, "exact",
                                                 include_lm_head=True) for b in range(3)], dtype=torch.float64)
    expected = torch.stack(confidence, 1).argmax(1)
    pick, cost = plugin.confidence_pick(engine, batch, selection, candidates, RATIO, tokenizer.pad_token_id, gate)
    assert torch.equal(pick, expected)
    torch.testing.assert_close(cost.double(), flops, rtol=1e-6, atol=0)
    # a sample's pick does not depend on what it is batched with
    for b in range(3):
        one = {k: (v[b:b + 1] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
        alone = plugin.select_visual_tokens(engine, one, RATIO)
        single, _ = plugin.confidence_pick(engine, one, alone, plugin.caption_candidates(one, alone), RATIO,
                                           tokenizer.pad_token_id, gate)
        assert single.tolist() == [int(expected[b])]
    # generate splices that pick and reports the scoring prefills beside the caption model
    picks = spy_on_picks(plugin, monkeypatch)
    result = plugin.generate(engine, batch, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             variant="accm_confidence_gate" if gate else "accm_confidence")
    assert [p.tolist() for p in picks] == [expected.clamp(max=num - 1).tolist()]
    assert set(result.plugin_flops) == {"caption_model", "confidence"}
    torch.testing.assert_close(result.plugin_flops["confidence"].double(), flops, rtol=1e-6, atol=0)


def test_gate_answers_from_the_prompt_without_a_caption_where_it_picks_none(setup, monkeypatch):  # noqa: F811
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    num = plugin.num_candidates
    prompts = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda ids, mask, *args, **kwargs: (
        prompts.append((ids, mask)) or generate(ids, mask, *args, **kwargs)))
    monkeypatch.setattr(plugin, "confidence_pick", lambda *args: (torch.tensor([num, 1, num]), torch.zeros(3)))
    plugin.generate(engine, batch, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id,
                    variant="accm_confidence_gate")
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    caption = plugin.caption_inserts(plugin.caption_candidates(batch, selection), torch.tensor([1, 1, 1]))[1]
    (ids, mask), = prompts
    original = [batch["prompt_input_ids"][b][batch["prompt_attention_mask"][b].bool()] for b in range(3)]
    spliced = [ids[b][mask[b].bool()] for b in range(3)]
    assert torch.equal(spliced[0], original[0]) and torch.equal(spliced[2], original[2])
    cut = int((original[1] == plugin.image_token_id).nonzero()[-1]) + 1
    assert torch.equal(spliced[1], torch.cat([original[1][:cut], caption, original[1][cut:]]))
