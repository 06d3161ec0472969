"""Unit checks of ACCM's selector and caption model that the other ACCM tests leave open: argument validation,
boundary cases of the length limits, and beam search / sampling on a hand-made Markov chain with exact values.
(The compensation plug-in's are in test_accm_units_2.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, GPT2Config, GPT2LMHeadModel

from lvlm_prune.accm import CandidateSelector, CaptionModel, MeanPooledTextEncoder, PrefixMapper, build_selector_inputs
from lvlm_prune.accm.selector import CLIPTextEncoder

from test_accm_caption_model import EOS, PAD, make_inputs, make_model
from test_accm_pretrained import EOT, SOT, UNK, word_tokenizer

# ------------------------------------------------------------------ selector


def test_selector_refuses_a_mask_of_another_shape_and_heads_that_do_not_divide():
    selector = CandidateSelector(text_dim=6, hidden=8, num_heads=2)
    with pytest.raises(ValueError, match="candidate_mask shape"):
        selector(torch.randn(2, 3, 6), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_heads"):
        CandidateSelector(text_dim=6, hidden=10, num_heads=4)


def test_mean_pooled_encoder_refuses_batch_size_zero_and_pools_an_empty_row_to_zero():
    with pytest.raises(ValueError, match="batch_size"):
        MeanPooledTextEncoder(nn.Embedding(8, 3), batch_size=0)
    torch.manual_seed(0)
    embedding = nn.Embedding(8, 3)
    ids = torch.tensor([[4, 5, 0], [6, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    pooled = MeanPooledTextEncoder(embedding, batch_size=1)(ids, mask)
    torch.testing.assert_close(pooled[0], (embedding.weight[4] + embedding.weight[5]) / 2)
    assert torch.equal(pooled[1], torch.zeros(3))  # no real token: zero features, not NaN


def test_mean_pooled_encoder_reads_the_last_hidden_states_of_a_causal_lm():
    """A *ForCausalLM has no last_hidden_state: its last hidden_states entry (after the final norm) is pooled."""
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2)).eval()
    ids = torch.tensor([[3, 4, 5, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    pooled = MeanPooledTextEncoder(lm)(ids, mask)
    with torch.no_grad():
        hidden = lm.transformer(input_ids=ids[:, :3]).last_hidden_state
    torch.testing.assert_close(pooled[0], hidden[0].mean(0), atol=1e-5, rtol=1e-5)


def test_selector_reads_features_of_another_precision_in_its_own():
    torch.manual_seed(0)
    selector = CandidateSelector(text_dim=6, hidden=8, num_heads=2).eval()
    features = torch.randn(2, 3, 6)
    torch.testing.assert_close(selector(features.double()), selector(features))


def test_mean_pooled_encoder_calls_the_model_on_at_most_batch_size_rows():
    calls = []
    embedding = nn.Embedding(8, 3)
    embedding.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    ids = torch.randint(1, 8, (5, 4))
    pooled = MeanPooledTextEncoder(embedding, batch_size=2)(ids, torch.ones(5, 4))
    assert calls == [2, 2, 1]
    torch.testing.assert_close(pooled, embedding.weight[ids].mean(1))


def test_build_selector_inputs_refuses_candidates_that_are_not_three_dimensional():
    with pytest.raises(ValueError, match=r"\(B, M, T\)"):
        build_selector_inputs([torch.tensor([5])], torch.tensor([[7, 2, 0]]), [1], [6], pad_token_id=0)


def make_clip_encoder(max_positions=8):
    """A tiny CLIP text encoder; its tokenizer adds BOS/EOS and has no pad token (the encoder pads with EOS)."""
    tokenizer = word_tokenizer([SOT, EOT, UNK], list("abcdefgh"), template=f"{SOT} $A {EOT}", bos_token=SOT,
                               eos_token=EOT)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=max_positions, projection_dim=8,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    return CLIPTextEncoder(CLIPTextModelWithProjection(config), tokenizer), tokenizer


def test_clip_encoder_pads_with_eos_and_cuts_an_overlong_caption_to_the_position_table():
    encoder, tokenizer = make_clip_encoder(max_positions=8)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 1
    a, e, h = tokenizer.convert_tokens_to_ids(["a", "e", "h"])
    # the caption alone is longer than the 6 positions between BOS and EOS: it is cut, the question dropped
    ids, mask = encoder.tokenize([("a b", "e f g h h h h h h"), ("a", "e")])
    assert ids.shape == (2, 8)
    assert ids[0].tolist() == [0, e, e + 1, e + 2, h, h, h, 1] and mask[0].tolist() == [1] * 8
    assert ids[1].tolist() == [0, a, e, 1, 1, 1, 1, 1] and mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    features, counts = encoder([("a b", "e f g h h h h h h"), ("a", "e")])
    assert features.shape == (2, 8) and counts.tolist() == [8, 4]


def test_clip_encoder_flops_of_an_empty_text_are_zero():
    encoder, _ = make_clip_encoder()
    assert encoder.flops(0) == 0.0
    d, i = 16, 32
    assert encoder.flops(3) == 8 * 3 * d * d + 4 * 9 * d + 4 * 3 * d * i + 2 * d * 8

# ------------------------------------------------------------------ caption model


def test_prefix_mapper_and_caption_model_refuse_bad_shapes():
    with pytest.raises(ValueError, match="prefix_length"):
        PrefixMapper(visual_dim=4, embed_dim=8, prefix_length=0, num_heads=2)
    PrefixMapper(visual_dim=4, embed_dim=8, prefix_length=0, num_heads=2, mode="tokens")  # unused there
    with pytest.raises(ValueError, match="bos_token_id"):
        CaptionModel(vocab_size=8, visual_dim=4, embed_dim=8, num_heads=2, prefix_length=2, bos_token_id=8)
    with pytest.raises(ValueError, match="max_length"):
        CaptionModel(vocab_size=8, visual_dim=4, embed_dim=8, num_heads=2, prefix_length=4, max_length=4)
    CaptionModel(vocab_size=8, visual_dim=4, embed_dim=8, num_heads=2, prefix_length=4, max_length=5)


def test_caption_model_refuses_inputs_of_different_batches():
    model = make_model()
    instruction, instruction_mask, visual, visual_mask, caption, caption_mask = make_inputs()
    with pytest.raises(ValueError, match="discarded_visual batch"):
        model(instruction, instruction_mask, visual[:1], visual_mask[:1], caption, caption_mask)
    with pytest.raises(ValueError, match="caption_ids batch"):
        model(instruction, instruction_mask, visual, visual_mask, caption[[0, 1, 1]], caption_mask[[0, 1, 1]])


def test_a_caption_mask_is_required_when_pad_is_eos():
    torch.manual_seed(0)
    model = CaptionModel(vocab_size=16, visual_dim=4, embed_dim=8, num_layers=1, num_heads=2, prefix_length=2,
                         mapper_layers=1, max_length=16, eos_token_id=2, pad_token_id=2)
    with pytest.raises(ValueError, match="caption_mask is required"):
        model(torch.tensor([[5, 6]]), torch.ones(1, 2), torch.randn(1, 3, 4), None, torch.tensor([[7, 2]]))


def test_teacher_forcing_fills_max_length_exactly_and_refuses_one_token_more():
    """Instruction (5 columns) + 4 prefix embeddings + caption columns must fit in max_length (14 here)."""
    model = make_model(max_length=14)
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    fits = torch.tensor([[5, 9, 11, 13, EOS], [7, 11, 13, 17, EOS]])
    nll = model(instruction, instruction_mask, visual, visual_mask, fits)
    assert nll.shape == (2,) and torch.isfinite(nll).all()
    with pytest.raises(ValueError, match="max_length"):
        model(instruction, instruction_mask, visual, visual_mask, torch.cat([fits[:, :1], fits], 1))


def test_a_caption_without_real_tokens_has_zero_loss():
    model = make_model()
    instruction, instruction_mask, visual, visual_mask, caption, caption_mask = make_inputs()
    caption_mask = caption_mask.clone()
    caption_mask[1] = False
    nll = model(instruction, instruction_mask, visual, visual_mask, caption, caption_mask)
    assert nll[1].item() == 0.0
    logprobs, mask = model.caption_token_logprobs(instruction, instruction_mask, visual, visual_mask, caption,
                                                  caption_mask)
    torch.testing.assert_close(nll[0], -logprobs[0].sum() / 3)  # the mean over its 3 real tokens (EOS included)


def test_generation_fills_max_length_exactly_and_refuses_one_token_more():
    model = make_model(max_length=13)
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    args = (instruction, instruction_mask, visual, visual_mask)
    candidates = model.generate_candidates(*args, num_candidates=2, num_beams=2, max_new_tokens=4)  # 5 + 4 + 4
    assert candidates.token_ids.shape[:2] == (2, 2)
    with pytest.raises(ValueError, match="exceeds max_length"):
        model.generate_candidates(*args, num_candidates=2, num_beams=2, max_new_tokens=5)


def test_generate_candidates_refuses_more_settings():
    model = make_model()
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    args = (instruction, instruction_mask, visual, visual_mask)
    with pytest.raises(ValueError, match="top_p"):
        model.generate_candidates(*args, strategy="sample", top_p=0.0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        model.generate_candidates(*args, max_new_tokens=3, min_new_tokens=3)
    with pytest.raises(ValueError, match="only EOS"):
        model.generate_candidates(*args, num_candidates=2, num_beams=2, max_new_tokens=1, min_new_tokens=0)
    with pytest.raises(ValueError, match="num_candidates"):
        model.generate_candidates(*args, num_candidates=0)
    one = model.generate_candidates(*args, num_candidates=1, num_beams=1, max_new_tokens=1, min_new_tokens=0)
    assert one.token_ids.tolist() == [[[EOS]], [[EOS]]] and one.lengths.tolist() == [[1], [1]]


def test_generation_keeps_an_eval_model_in_eval_mode():
    model = make_model()
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    model.generate_candidates(instruction, instruction_mask, visual, visual_mask, num_candidates=2, num_beams=2,
                              max_new_tokens=3)
    assert not model.training and not model.decoder.training


def test_beam_search_refuses_too_few_distinct_captions():
    """Only one word may be generated: two tokens make one caption, [word, EOS], not two."""
    model = make_model()
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    others = [t for t in range(64) if t not in (EOS, 7)]
    with pytest.raises(RuntimeError, match="distinct captions"):
        model.generate_candidates(instruction, instruction_mask, visual, visual_mask, num_candidates=2, num_beams=2,
                                  max_new_tokens=2, suppress_token_ids=others)


def markov_decoder(model, start, table):
    """Makes the caption decoder a first-order Markov chain: the next-token distribution depends only on the last
    fed token (`table[token]`, {token: probability}); after the prefix it is `start[b]` for sample b (or `start`
    for all when it is a dict). Returns the hook handles."""
    vocab = model.vocab_size
    wte = model.decoder.transformer.wte.weight

    def row(probabilities):
        out = torch.full((vocab,), float("-inf"))
        for token, p in probabilities.items():
            out[token] = torch.tensor(p).log()
        return out

    rows = {token: row(p) for token, p in table.items()}
    first = [row(p) for p in start] if isinstance(start, list) else None
    shared = row(start) if first is None else None
    state = {}

    def read(module, args, kwargs):
        last = kwargs["inputs_embeds"][:, -1]
        match = (last[:, None] == wte[None]).all(-1)
        state["tokens"] = [int(m.nonzero()[0]) if m.any() else None for m in match]

    def write(module, args, output):
        tokens = state["tokens"]
        new = torch.stack([rows[t] if t is not None else shared if first is None else first[b]
                           for b, t in enumerate(tokens)])
        return new[:, None].expand_as(output).clone()

    return [model.decoder.register_forward_pre_hook(read, with_kwargs=True),
            model.decoder.lm_head.register_forward_hook(write)]


A, B, C, D = 3, 4, 5, 6


def beam_on_chain(start, table, max_new_tokens, length_penalty):
    """Beam search (2 beams, 2 candidates) of one sample on the Markov chain; only A-D and EOS may be generated."""
    model = make_model()
    handles = markov_decoder(model, [start], table)
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    others = [t for t in range(64) if t not in (A, B, C, D, EOS)]
    try:
        return model.generate_candidates(instruction[1:], instruction_mask[1:], visual[1:], visual_mask[1:],
                                         num_candidates=2, num_beams=2, max_new_tokens=max_new_tokens,
                                         length_penalty=length_penalty, suppress_token_ids=others)
    finally:
        for handle in handles:
            handle.remove()


def captions(candidates):
    return [row[:length] for row, length in zip(candidates.token_ids[0].tolist(), candidates.lengths[0].tolist())]


def test_beam_search_keeps_an_alive_beam_for_every_finished_one():
    """Step 1 ranks [X E] .30 (finished), [Y Z] .20, [X Y] .18: both of the latter stay alive, and [X Y E] (.027)
    beats [Y Z E] (.02) at the forced last step. Length penalty 0: raw probabilities."""
    X, Y, Z = A, B, C
    table = {X: {EOS: 0.5, Y: 0.3, Z: 0.2}, Y: {Z: 0.5, Y: 0.35, EOS: 0.15}, Z: {EOS: 0.1, Z: 0.9}}
    out = beam_on_chain({X: 0.6, Y: 0.4}, table, max_new_tokens=3, length_penalty=0.0)
    assert captions(out) == [[X, EOS], [X, Y, EOS]]
    torch.testing.assert_close(out.logprobs[0], torch.tensor([0.30, 0.027]).log())


def test_beam_search_drops_an_eos_ranked_below_the_beam_width():
    """Step 1 ranks [A E] .30, [A A] .18, [B E] .16, [B A] .14: [B E] is not a finished hypothesis (as in HF), so
    the second candidate is [A A E] (.09), not [B E]."""
    table = {A: {EOS: 0.5, A: 0.3, B: 0.2}, B: {EOS: 0.4, A: 0.35, B: 0.25}}
    out = beam_on_chain({A: 0.6, B: 0.4}, table, max_new_tokens=3, length_penalty=0.0)
    assert captions(out) == [[A, EOS], [A, A, EOS]]
    torch.testing.assert_close(out.logprobs[0], torch.tensor([0.30, 0.09]).log())


def test_beam_search_continues_while_an_alive_beam_can_beat_the_worst_kept_one():
    """Length penalty 1. After step 2 the kept ones are [A E] (log .42 / 2) and [B B E] (log .096 / 3); the alive
    [B B B] (log .144 / 3) beats the worse, so decoding goes on and [B B B E] (log .0576 / 4) replaces [B B E].
    Steps 0-2 feed two tokens each; the forced-EOS last step feeds none."""
    table = {A: {EOS: 0.7, A: 0.2, B: 0.1}, B: {B: 0.6, EOS: 0.4}}
    out = beam_on_chain({A: 0.6, B: 0.4}, table, max_new_tokens=4, length_penalty=1.0)
    assert captions(out) == [[A, EOS], [B, B, B, EOS]]
    torch.testing.assert_close(out.logprobs[0], torch.tensor([0.42, 0.0576]).log())
    assert out.decode_tokens.tolist() == [6]


def test_beam_search_stops_once_no_alive_beam_can_beat_the_kept_ones():
    """Step 1 finishes [A E] (.42) and [B E] (.24), both above the alive [A A] (log .18 / 2): done after feeding
    only the two tokens of step 0, although max_new_tokens allows two more steps."""
    table = {A: {EOS: 0.7, A: 0.3}, B: {EOS: 0.6, B: 0.4}}
    out = beam_on_chain({A: 0.6, B: 0.4}, table, max_new_tokens=4, length_penalty=1.0)
    assert captions(out) == [[A, EOS], [B, EOS]]
    assert out.decode_tokens.tolist() == [2]


def sample_on_chain(start, table, top_p, seed, batch=1, repeat=1, **settings):
    """Sampling on the Markov chain for the last `batch` samples of make_inputs, each repeated `repeat` times."""
    model = make_model()
    handles = markov_decoder(model, start, table)
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    others = [t for t in range(64) if t not in (A, B, C, D, EOS)]
    inputs = [x[2 - batch:].repeat_interleave(repeat, 0) for x in (instruction, instruction_mask, visual, visual_mask)]
    settings = {"num_candidates": 2, "max_new_tokens": 4, **settings}
    try:
        return model.generate_candidates(*inputs, strategy="sample", top_p=top_p, suppress_token_ids=others,
                                         generator=torch.Generator().manual_seed(seed), **settings)
    finally:
        for handle in handles:
            handle.remove()


def test_sampling_applies_the_nucleus_after_the_first_token():
    """After A or D the chain says B .6, C .4. top_p .5 keeps B alone; top_p .7 keeps B and the token that crosses
    .7 (C), which ten seeded draws then pick at least once."""
    table = {A: {B: 0.6, C: 0.4}, D: {B: 0.6, C: 0.4}, B: {EOS: 1.0}, C: {EOS: 1.0}}
    start = [{A: 0.5, D: 0.5}]
    second = {top_p: [sample_on_chain(start, table, top_p, seed).token_ids[0, :, 1].tolist() for seed in range(5)]
              for top_p in (0.5, 0.7)}
    assert {t for row in second[0.5] for t in row} == {B}
    assert {t for row in second[0.7] for t in row} == {B, C}


def test_sampling_draws_each_samples_first_tokens_from_its_own_distribution():
    table = {t: {EOS: 1.0} for t in (A, B, C, D)}
    out = sample_on_chain([{A: 0.5, B: 0.5}, {C: 0.5, D: 0.5}], table, top_p=1.0, seed=0, batch=2)
    assert sorted(out.token_ids[0, :, 0].tolist()) == [A, B] and sorted(out.token_ids[1, :, 0].tolist()) == [C, D]
    torch.testing.assert_close(out.logprobs, torch.full((2, 2), 0.5).log())


def test_sampling_draws_first_tokens_in_proportion_to_their_probability():
    """Gumbel top-1 of 2000 samples over A .7, B .1, C .1, D .1: A's share is .7 (binomial sd .01)."""
    out = sample_on_chain({A: 0.7, B: 0.1, C: 0.1, D: 0.1}, {t: {EOS: 1.0} for t in (A, B, C, D)}, 1.0, seed=0,
                          repeat=2000, num_candidates=1, max_new_tokens=2)
    share = (out.token_ids[:, 0, 0] == A).float().mean().item()
    assert abs(share - 0.7) < 0.035


def test_a_sampled_caption_that_starts_with_eos_is_empty():
    """min_new_tokens 0: one of the two distinct first tokens is EOS, and that candidate ends there (the chain
    would go on with A after an EOS)."""
    table = {A: {EOS: 1.0}, EOS: {A: 1.0}}
    out = sample_on_chain({EOS: 0.5, A: 0.5}, table, 1.0, seed=0, min_new_tokens=0)
    assert sorted(captions(out)) == [[EOS], [A, EOS]] and sorted(out.lengths[0].tolist()) == [1, 2]


def test_sampling_refuses_fewer_allowed_first_tokens_than_candidates():
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        sample_on_chain({A: 1.0}, {A: {EOS: 1.0}}, 1.0, seed=0)


@pytest.mark.parametrize("strategy", ["beam", "sample"])
def test_the_pad_token_is_never_generated_even_when_likeliest(strategy):
    model = make_model()
    handle = model.decoder.lm_head.register_forward_hook(lambda module, args, out: out + 20.0 * (
        torch.arange(out.shape[-1]) == PAD))
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    out = model.generate_candidates(instruction, instruction_mask, visual, visual_mask, num_candidates=2,
                                    num_beams=2, max_new_tokens=4, strategy=strategy,
                                    generator=torch.Generator().manual_seed(0))
    handle.remove()
    real = torch.arange(out.token_ids.shape[-1]) < out.lengths[..., None]
    assert not (out.token_ids[real] == PAD).any()
