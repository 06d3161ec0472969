"""How ACCM's stage 2 is wired together (METHODS.md section 4): the KL ranking's student side sees the pruned visual
tokens, the lowest-KL candidate is the pseudo-label of both the caption CE and the selector CE, and a stage-2 step
with non-degenerate margins actually trains the caption model and the selector."""

import pytest
import torch
import torch.nn.functional as F

from lvlm_prune.accm import compensation
from lvlm_prune.accm.compensation import KeptVisualTokens
from lvlm_prune.data import answer_generation_mask

# the tiny LVLM, tokenizer, collated batch (3 samples) and plug-in factory of the compensation tests
from test_accm_compensation import RATIO, make_plugin, setup  # noqa: F401  (setup is a fixture)

# hand-built candidate KLs (B=3, M=3): lowest KL at 1, 0, 2 and highest at 2, 1, 0, with unequal margins
HAND_KL = torch.tensor([[0.5, 0.1, 0.9],
                        [0.2, 0.8, 0.3],
                        [0.6, 0.4, 0.05]])
BEST = torch.tensor([1, 0, 2])
MARGIN = HAND_KL.mean(-1) - HAND_KL.min(-1).values  # 0.4, 0.2333, 0.3


def _fixed_candidates(plugin, engine, batch, monkeypatch):
    """Candidates generated once and replayed, so the losses and the checks below see the same captions."""
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    candidates = plugin.caption_candidates(batch, selection)
    monkeypatch.setattr(plugin, "caption_candidates", lambda *args: candidates)
    return selection, candidates


def _candidate_nll(plugin, batch, selection, candidates):
    """(B, M) mean token NLL of each candidate (EOS included), scored one candidate at a time as a (B, T) caption."""
    ids, mask = plugin.instructions(batch["questions"], selection.features.device)
    batch_size, num, width = candidates.token_ids.shape
    nll = torch.zeros(batch_size, num)
    with torch.no_grad():
        for m in range(num):
            lengths = candidates.lengths[:, m]
            caption_mask = torch.arange(width)[None] < lengths[:, None]
            logprobs, _ = plugin.caption_model.caption_token_logprobs(
                ids, mask, plugin.caption_visual(selection), selection.discarded_mask, candidates.token_ids[:, m],
                caption_mask)
            nll[:, m] = -(logprobs * caption_mask).sum(-1) / lengths
    return nll


def test_training_targets_the_lowest_kl_candidate(setup, monkeypatch):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    selection, candidates = _fixed_candidates(plugin, engine, batch, monkeypatch)
    assert candidates.lengths.shape == HAND_KL.shape
    monkeypatch.setattr(plugin, "candidate_kl",
                        lambda *args: {"kl": HAND_KL.clone(), "kl_no_caption": torch.ones(3)})
    scores_seen = []
    selector_scores = plugin.selector_scores
    monkeypatch.setattr(plugin, "selector_scores",
                        lambda *args: scores_seen.append(selector_scores(*args)) or scores_seen[-1])

    losses = plugin.training_losses(engine, batch, progress=0.9)

    nll = _candidate_nll(plugin, batch, selection, candidates)
    rows = torch.arange(3)

    def weighted(per_sample):
        return float((MARGIN * per_sample).sum() / MARGIN.sum())

    # the candidates differ, so training toward any other candidate would give another caption loss
    expected = weighted(nll[rows, BEST])
    for other in (HAND_KL.argmax(-1), (BEST + 1) % 3, (BEST + 2) % 3):
        assert abs(weighted(nll[rows, other]) - expected) > 1e-3
    assert losses["caption"].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)

    # the selector's CE target is the same lowest-KL candidate
    (scores, _), = scores_seen
    scores = scores.detach().float()
    expected_selector = weighted(F.cross_entropy(scores, BEST, reduction="none"))
    assert abs(weighted(F.cross_entropy(scores, HAND_KL.argmax(-1), reduction="none")) - expected_selector) > 1e-4
    assert losses["selector"].item() == pytest.approx(expected_selector, rel=1e-4, abs=1e-6)
    assert losses["selector_accuracy"].item() == pytest.approx((scores.argmax(-1) == BEST).float().mean().item())
    assert losses["kl_best"].item() == pytest.approx(HAND_KL.min(-1).values.mean().item())
    assert losses["kl_margin"].item() == pytest.approx(MARGIN.mean().item())

    # and the gradient raises the best candidate's score: d loss / d score[b, best_b] < 0 on every sample
    grads = []

    def hooked_scores(*args):
        scores, lengths = selector_scores(*args)
        scores.register_hook(grads.append)
        return scores, lengths

    monkeypatch.setattr(plugin, "selector_scores", hooked_scores)
    plugin.training_losses(engine, batch, progress=0.9)["loss"].backward()
    (grad,) = grads
    assert (grad[rows, BEST] < 0).all()
    others = torch.ones(3, 3, dtype=torch.bool)
    others[rows, BEST] = False
    assert (grad[others] > 0).all()


def test_candidate_kl_scores_each_candidate_on_the_kept_visual_tokens(setup, monkeypatch):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    assert selection.keep.sum(1).tolist() == [2, 2, 2]
    candidates = plugin.caption_candidates(batch, selection)
    num = candidates.lengths.shape[1]
    calls = []
    answer_kl = compensation.answer_kl
    monkeypatch.setattr(compensation, "answer_kl",
                        lambda *args: calls.append(args) or answer_kl(*args))
    kl = plugin.candidate_kl(engine, batch, selection, candidates, RATIO)["kl"]
    assert len(calls) == 2  # the pruned prompt without caption, then the candidates
    _, candidate_logits, _ = calls[1]
    assert candidate_logits.shape[0] == 3 * num

    # the engine's own pass on the spliced sequences, from the pixels, showing only the kept visual tokens
    spliced = plugin.spliced_teacher_forced(batch, candidates)
    pixels = batch["pixel_values"].repeat_interleave(num, 0)
    args = (spliced.input_ids, spliced.attention_mask, pixels)
    with torch.no_grad():
        kept = engine(*args, labels=spliced.labels, method=KeptVisualTokens(selection.keep.repeat_interleave(num, 0)))
        every = engine(*args, labels=spliced.labels)
    assert (kept.visual_tokens_per_layer == 2).all()
    positions = answer_generation_mask(spliced.labels)
    for row in range(3 * num):
        answers = int(positions[row].sum())
        assert answers > 0
        torch.testing.assert_close(candidate_logits[row, :answers], kept.logits[row][positions[row]],
                                   atol=1e-5, rtol=1e-5)
        # with every visual token shown the logits differ: the comparison above tells the two apart
        assert (candidate_logits[row, :answers] - every.logits[row][positions[row]]).abs().max() > 1e-3
    # and the ranked KL is the KL of the kept-token logits against the full-token reference
    reference, _, mask = calls[1]
    expected_logits = torch.zeros_like(candidate_logits)
    for row in range(3 * num):
        answers = int(positions[row].sum())
        expected_logits[row, :answers] = kept.logits[row][positions[row]]
    torch.testing.assert_close(kl, answer_kl(reference, expected_logits, mask), atol=1e-5, rtol=1e-4)

def test_a_stage_two_step_gives_the_caption_model_and_selector_nonzero_gradients(setup, monkeypatch):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    rankings = []
    candidate_kl = plugin.candidate_kl
    monkeypatch.setattr(plugin, "candidate_kl", lambda *args: rankings.append(candidate_kl(*args)) or rankings[-1])
    plugin.zero_grad(set_to_none=True)
    losses = plugin.training_losses(engine, batch, progress=0.9)
    assert losses["stage"].item() == 2
    (ranking,) = rankings
    kl = ranking["kl"]
    assert (kl.mean(-1) - kl.min(-1).values > 1e-6).all()  # every sample's margin is non-degenerate
    assert losses["caption"].item() > 0 and losses["selector"].item() > 0
    losses["loss"].backward()

    def grad_norm(module):
        grads = [p.grad.abs().sum() for p in module.parameters() if p.grad is not None]
        return float(sum(grads)) if grads else 0.0

    caption = plugin.caption_model
    assert grad_norm(caption) > 0
    for part in ("decoder", "mapper"):
        assert grad_norm(getattr(caption, part)) > 0, part
    assert grad_norm(plugin.selector) > 0
    assert float(plugin.selector.score_head[1].weight.grad.abs().sum()) > 0
    assert float(plugin.selector.input_proj[1].weight.grad.abs().sum()) > 0
