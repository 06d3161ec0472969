import pytest
import torch

from lvlm_prune.accm import CaptionModel, PrefixMapper, pack_padding
from lvlm_prune.modeling.compat import CACHE_ARGUMENT

VOCAB, PAD, BOS, EOS, VISUAL_DIM = 64, 0, 1, 2, 16


def make_model(dropout=0.0, attn_implementation="sdpa", seed=0, max_length=48, prefix_mode="queries"):
    torch.manual_seed(seed)
    return CaptionModel(
        vocab_size=VOCAB, visual_dim=VISUAL_DIM, embed_dim=32, num_layers=2, num_heads=2,
        prefix_length=4, mapper_layers=1, max_length=max_length, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=PAD, dropout=dropout, attn_implementation=attn_implementation,
        prefix_mode=prefix_mode,
    ).eval()


def make_inputs(seed=0):
    """Sample 0: 3 instruction tokens (left-padded), 4 of 6 discarded tokens; sample 1: 5 and 6."""
    g = torch.Generator().manual_seed(seed)
    instruction = torch.randint(3, VOCAB, (2, 5), generator=g)
    instruction[0, :2] = PAD
    instruction_mask = (instruction != PAD).long()
    visual = torch.randn(2, 6, VISUAL_DIM, generator=g)
    visual_mask = torch.ones(2, 6, dtype=torch.bool)
    visual_mask[0, 4:] = False
    caption = torch.tensor([[5, 9, EOS, PAD], [7, 11, 13, EOS]])
    return instruction, instruction_mask, visual, visual_mask, caption, caption != PAD


def test_pack_padding_moves_real_tokens_in_order():
    ids = torch.tensor([[0, 5, 6, 0], [7, 8, 9, 10]])
    mask = (ids != 0).long()
    left_ids, left_mask = pack_padding(ids, mask, "left")
    right_ids, right_mask = pack_padding(ids, mask, "right")
    assert left_ids[0].tolist() == [0, 0, 5, 6] and left_mask[0].tolist() == [0, 0, 1, 1]
    assert right_ids[0].tolist() == [5, 6, 0, 0] and right_mask[0].tolist() == [1, 1, 0, 0]
    assert torch.equal(left_ids[1], ids[1]) and torch.equal(right_ids[1], ids[1])
    embeds = torch.arange(16.0).view(2, 4, 2)  # per-position vectors move with their positions
    left_embeds, _ = pack_padding(embeds, mask, "left")
    assert left_embeds[0].tolist() == [[0.0, 1.0], [6.0, 7.0], [2.0, 3.0], [4.0, 5.0]]


@pytest.mark.parametrize("mode", ["queries", "tokens"])
def test_prefix_mapper_ignores_padding_and_survives_all_masked_rows(mode):
    """'queries': 3 prefix embeddings per sample; 'tokens': one per discarded token (compared at real ones)."""
    torch.manual_seed(0)
    mapper = PrefixMapper(visual_dim=8, embed_dim=16, prefix_length=3, num_layers=1, num_heads=2, mode=mode).eval()
    visual = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = mapper(visual, mask)
    assert out.shape == (3, 3 if mode == "queries" else 5, 16) and torch.isfinite(out).all()
    real = slice(None) if mode == "queries" else slice(0, 3)
    changed = visual.clone()
    changed[0, 3:] = 100.0
    changed[2] = -50.0
    out_changed = mapper(changed, mask)
    torch.testing.assert_close(out_changed[0, real], out[0, real])
    if mode == "queries":
        torch.testing.assert_close(out_changed[2], out[2])
    alone = mapper(visual[:1, :3], mask[:1, :3])
    torch.testing.assert_close(alone[0, real], out[0, real], atol=1e-5, rtol=1e-5)
    empty = mapper(torch.randn(2, 0, 8))
    assert empty.shape == (2, 3 if mode == "queries" else 0, 16) and torch.isfinite(empty).all()
    with pytest.raises(ValueError, match="mode='pooled'"):
        PrefixMapper(visual_dim=8, embed_dim=16, mode="pooled")


def test_token_prefix_reads_each_discarded_token():
    """The caption model sees the image: another image's discarded tokens give other caption log-probabilities,
    and the prefix holds one position per real discarded token (padding masked, counted nowhere)."""
    model = make_model(prefix_mode="tokens")
    instruction, instruction_mask, visual, visual_mask, caption, caption_mask = make_inputs()
    loss = model(instruction, instruction_mask, visual, visual_mask, caption, caption_mask)
    swapped = model(instruction, instruction_mask, visual.flip(0), visual_mask, caption, caption_mask)
    assert not torch.allclose(loss, swapped, atol=1e-4)
    prefix, prefix_mask = model.embed_prefix(instruction, instruction_mask, visual, visual_mask)
    assert prefix.shape[1] == instruction.shape[1] + visual.shape[1]
    assert prefix_mask.sum(1).tolist() == (instruction_mask.sum(1) + visual_mask.sum(1)).tolist()
    candidates = model.generate_candidates(
        instruction, instruction_mask, visual, visual_mask, num_candidates=3, num_beams=3, max_new_tokens=6
    )
    assert torch.equal(candidates.prefix_lengths, instruction_mask.sum(1) + visual_mask.sum(1))


@pytest.mark.parametrize("prefix_mode", ["queries", "tokens"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_loss_is_independent_of_padding_side_and_batch(attn_implementation, prefix_mode):
    model = make_model(attn_implementation=attn_implementation, prefix_mode=prefix_mode)
    instruction, instruction_mask, visual, visual_mask, caption, caption_mask = make_inputs()
    loss = model(instruction, instruction_mask, visual, visual_mask, caption, caption_mask)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    # Right-padded instruction and left-padded caption: same sample, same loss.
    right_ids, right_mask = pack_padding(instruction, instruction_mask, "right")
    left_cap, left_cap_mask = pack_padding(caption, caption_mask.long(), "left")
    loss_repadded = model(right_ids, right_mask, visual, visual_mask, left_cap, left_cap_mask)
    torch.testing.assert_close(loss_repadded, loss, atol=1e-5, rtol=1e-5)
    alone = model(instruction[:1, 2:], instruction_mask[:1, 2:], visual[:1, :4], visual_mask[:1, :4],
                  caption[:1, :3], caption_mask[:1, :3])
    torch.testing.assert_close(alone[0], loss[0], atol=1e-5, rtol=1e-5)


def test_loss_counts_only_caption_tokens_and_matches_sequence_logprob():
    model = make_model()
    instruction, instruction_mask, visual, visual_mask, caption, caption_mask = make_inputs()
    loss = model(instruction, instruction_mask, visual, visual_mask, caption, caption_mask)
    logprob = model.sequence_logprob(instruction, instruction_mask, visual, visual_mask, caption, caption_mask)
    torch.testing.assert_close(-logprob / caption_mask.sum(1), loss)
    # A caption of candidates (B, M, T) gives the same numbers as the flat captions.
    stacked = torch.stack([caption, caption.flip(0)], 1)
    stacked_mask = torch.stack([caption_mask, caption_mask.flip(0)], 1)
    per_candidate = model(instruction, instruction_mask, visual, visual_mask, stacked, stacked_mask)
    assert per_candidate.shape == (2, 2)
    torch.testing.assert_close(per_candidate[:, 0], loss)


def test_caption_loss_decreases_when_overfitting_two_samples():
    model = make_model().train()
    instruction, instruction_mask, visual, visual_mask, caption, caption_mask = make_inputs()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(instruction, instruction_mask, visual, visual_mask, caption, caption_mask).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("initializer_range, expected", [(None, 0.02), (32**-0.5, 32**-0.5)])
def test_decoder_initialisation_is_gpt2s_unless_given(initializer_range, expected):
    torch.manual_seed(0)
    given = {} if initializer_range is None else {"initializer_range": initializer_range}
    model = CaptionModel(vocab_size=VOCAB, visual_dim=VISUAL_DIM, embed_dim=32, num_layers=1, num_heads=2,
                         prefix_length=4, mapper_layers=1, **given)
    attention = model.decoder.transformer.h[0].attn.c_attn.weight
    assert model.decoder.config.initializer_range == pytest.approx(expected)
    assert attention.std().item() == pytest.approx(expected, rel=0.05)
    with pytest.raises(ValueError, match="initializer_range"):
        CaptionModel(vocab_size=VOCAB, visual_dim=VISUAL_DIM, embed_dim=32, initializer_range=0.0)


def test_caption_model_rejects_sequences_longer_than_max_length():
    model = make_model(max_length=10)
    instruction, instruction_mask, visual, visual_mask, caption, caption_mask = make_inputs()
    with pytest.raises(ValueError, match="max_length"):
        model(instruction, instruction_mask, visual, visual_mask, caption, caption_mask)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate_candidates(instruction, instruction_mask, visual, visual_mask, max_new_tokens=8)


def _boost_eos(model, amount):
    """Makes EOS likely so that candidates finish at different lengths."""
    def hook(module, args, output):
        output[..., EOS] += amount
        return output
    return model.decoder.lm_head.register_forward_hook(hook)


def _check_candidates(candidates, num_candidates, max_new_tokens):
    ids = candidates.token_ids
    assert ids.shape[:2] == (2, num_candidates) and ids.shape[2] <= max_new_tokens
    for b in range(2):
        rows = []
        for m in range(num_candidates):
            length = int(candidates.lengths[b, m])
            row = ids[b, m].tolist()
            assert row[length - 1] == EOS and EOS not in row[: length - 1]
            assert all(t == PAD for t in row[length:]) and PAD not in row[:length]
            rows.append(tuple(row[:length]))
        assert len(set(rows)) == num_candidates


@pytest.mark.parametrize("num_beams", [3, 4])  # 3 == num_candidates: both ACCM configs' setting
@pytest.mark.parametrize("eos_boost", [0.0, 3.0])
def test_beam_search_returns_distinct_candidates_scored_like_teacher_forcing(eos_boost, num_beams):
    model = make_model()
    handle = _boost_eos(model, eos_boost)
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    candidates = model.generate_candidates(
        instruction, instruction_mask, visual, visual_mask, num_candidates=3, num_beams=num_beams, max_new_tokens=8
    )
    _check_candidates(candidates, 3, 8)
    # Scores accumulated step by step through the KV cache equal a no-cache teacher-forced pass.
    teacher_forced = model.sequence_logprob(
        instruction, instruction_mask, visual, visual_mask, candidates.token_ids, candidates.token_ids != PAD
    )
    torch.testing.assert_close(candidates.logprobs, teacher_forced, atol=1e-4, rtol=1e-4)
    normalised = candidates.logprobs / candidates.lengths
    assert (normalised[:, :-1] >= normalised[:, 1:] - 1e-6).all()
    assert torch.equal(candidates.prefix_lengths, instruction_mask.sum(1) + 4)
    handle.remove()


def _greedy(model, instruction, instruction_mask, visual, visual_mask, max_new_tokens):
    """Greedy captions by full no-cache passes, under generate_candidates' rules (no PAD, no EOS first, EOS forced
    at the last step): (B, T) ids padded after EOS."""
    prefix, prefix_mask = model.embed_prefix(instruction, instruction_mask, visual, visual_mask)
    tokens = torch.zeros(prefix.shape[0], 0, dtype=torch.long)
    for step in range(max_new_tokens):
        embeds = torch.cat([prefix, model.decoder.transformer.wte(tokens)], 1)
        mask = torch.cat([prefix_mask, torch.ones_like(tokens)], 1)
        logits = model.decoder(inputs_embeds=embeds, attention_mask=mask,
                               position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits[:, -1]
        logits[:, PAD] = float("-inf")
        if step == 0:
            logits[:, EOS] = float("-inf")
        next_token = torch.full_like(logits[:, 0], EOS, dtype=torch.long) if step == max_new_tokens - 1 \
            else logits.argmax(-1)
        tokens = torch.cat([tokens, next_token[:, None]], 1)
    ended = (tokens == EOS).long().cumsum(1)
    return tokens.masked_fill((ended - (tokens == EOS).long()) > 0, PAD)  # PAD after the first EOS


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [3, 4])
@pytest.mark.parametrize("eos_boost", [0.0, 3.0])
def test_beam_search_scores_at_least_as_well_as_greedy_decoding(eos_boost, num_beams):
    """The top candidate's length-normalised log-probability (the ranking score), checked by teacher forcing, is at
    least that of the greedy caption."""
    model = make_model()
    handle = _boost_eos(model, eos_boost)
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    candidates = model.generate_candidates(
        instruction, instruction_mask, visual, visual_mask, num_candidates=3, num_beams=num_beams, max_new_tokens=8)
    greedy = _greedy(model, instruction, instruction_mask, visual, visual_mask, 8)
    greedy_mask = greedy != PAD
    greedy_score = model.sequence_logprob(instruction, instruction_mask, visual, visual_mask, greedy, greedy_mask)
    top = model.sequence_logprob(instruction, instruction_mask, visual, visual_mask, candidates.token_ids[:, 0],
                                 candidates.token_ids[:, 0] != PAD)
    handle.remove()
    assert (top / candidates.lengths[:, 0] >= greedy_score / greedy_mask.sum(1) - 1e-5).all()


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [3, 6])
def test_beam_search_of_two_tokens_matches_brute_force(num_beams):
    """On a vocabulary of 8 (PAD, EOS and 6 other tokens) with max_new_tokens=2 every caption is [token, EOS]:
    scored by teacher forcing, beam search returns the best 3 of the captions of the `num_beams` likeliest first
    tokens, ranked; with a beam as wide as the allowed first tokens (6) those are the best 3 of all captions."""
    vocab = 8
    torch.manual_seed(3)
    model = CaptionModel(vocab_size=vocab, visual_dim=VISUAL_DIM, embed_dim=32, num_layers=2, num_heads=2,
                         prefix_length=4, mapper_layers=1, max_length=48, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=PAD, dropout=0.0).eval()
    g = torch.Generator().manual_seed(1)
    instruction = torch.randint(3, vocab, (2, 5), generator=g)
    instruction[0, :2] = PAD
    instruction_mask = (instruction != PAD).long()
    visual = torch.randn(2, 6, VISUAL_DIM, generator=g)
    visual_mask = torch.ones(2, 6, dtype=torch.bool)
    candidates = model.generate_candidates(instruction, instruction_mask, visual, visual_mask, num_candidates=3,
                                           num_beams=num_beams, max_new_tokens=2)
    words = [t for t in range(vocab) if t not in (PAD, EOS)]  # BOS is an ordinary token here
    captions = torch.tensor([[w, EOS] for w in words]).expand(2, -1, -1)
    scores = model.sequence_logprob(instruction, instruction_mask, visual, visual_mask, captions,
                                    torch.ones_like(captions, dtype=torch.bool))  # (2, 6)
    first, _ = model.caption_token_logprobs(instruction, instruction_mask, visual, visual_mask, captions,
                                            torch.ones_like(captions, dtype=torch.bool))
    for b in range(2):
        beam = [words[i] for i in first[b, :, 0].topk(num_beams).indices.tolist()]  # the likeliest first words
        expected = sorted(beam, key=lambda w: -scores[b, words.index(w)].item())[:3]
        assert candidates.token_ids[b].tolist() == [[w, EOS] for w in expected]
        torch.testing.assert_close(candidates.logprobs[b], scores[b, [words.index(w) for w in expected]],
                                   atol=1e-4, rtol=1e-4)
    if num_beams == len(words):  # exhaustive: the three best captions of all
        best = scores.topk(3, dim=1).indices
        assert candidates.token_ids[:, :, 0].tolist() == [[words[i] for i in row] for row in best.tolist()]


def test_beam_search_decodes_one_token_per_step_with_the_cache():
    model = make_model()
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    seen, fed_tokens, step_logits = [], [], []
    hooks = [
        model.decoder.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((kwargs["inputs_embeds"].shape, kwargs.get(CACHE_ARGUMENT))),
            with_kwargs=True,
        ),
        model.decoder.transformer.wte.register_forward_hook(lambda m, args, out: fed_tokens.append(args[0])),
        model.decoder.lm_head.register_forward_hook(lambda m, args, out: step_logits.append(out)),
    ]
    candidates = model.generate_candidates(
        instruction, instruction_mask, visual, visual_mask, num_candidates=2, num_beams=3, max_new_tokens=6
    )
    for hook in hooks:
        hook.remove()
    assert seen[0][0] == (2, 5 + 4, 32) and seen[0][1] is None
    assert all(shape == (2 * 3, 1, 32) and cache is not None for shape, cache in seen[1:])
    assert len(seen) - 1 == 5  # the forced-EOS last step needs no forward
    assert candidates.decode_tokens.tolist() == [15, 15]
    # The first cached decode step gives the logits of a no-cache forward over prefix + token.
    prefix, prefix_mask = model.embed_prefix(instruction, instruction_mask, visual, visual_mask)
    first_tokens = fed_tokens[1]
    assert first_tokens.shape == (6, 1)
    embeds = torch.cat([prefix.repeat_interleave(3, 0), model.decoder.transformer.wte(first_tokens)], 1)
    mask = torch.cat([prefix_mask.repeat_interleave(3, 0), torch.ones(6, 1, dtype=prefix_mask.dtype)], 1)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        no_cache = model.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(step_logits[1][:, -1], no_cache[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_logits[0][:, -1], no_cache[::3, -2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix_mode", ["queries", "tokens"])
def test_generation_of_a_sample_does_not_depend_on_its_batch(prefix_mode):
    model = make_model(prefix_mode=prefix_mode)
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    batched = model.generate_candidates(
        instruction, instruction_mask, visual, visual_mask, num_candidates=3, num_beams=3, max_new_tokens=6
    )
    alone = model.generate_candidates(
        instruction[:1, 2:], instruction_mask[:1, 2:], visual[:1, :4], visual_mask[:1, :4],
        num_candidates=3, num_beams=3, max_new_tokens=6,
    )
    width = alone.token_ids.shape[-1]
    assert torch.equal(batched.token_ids[0, :, :width], alone.token_ids[0])
    torch.testing.assert_close(batched.logprobs[0], alone.logprobs[0], atol=1e-4, rtol=1e-4)


def test_sampling_gives_distinct_reproducible_candidates_and_restores_train_mode():
    model = make_model(dropout=0.1).train()
    handle = _boost_eos(model, 2.5)
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()

    def draw(seed):
        return model.generate_candidates(
            instruction, instruction_mask, visual, visual_mask, num_candidates=3, strategy="sample",
            max_new_tokens=8, temperature=1.0, top_p=0.9, suppress_token_ids=[63],
            generator=torch.Generator().manual_seed(seed),
        )

    first, again = draw(0), draw(0)
    assert model.training
    _check_candidates(first, 3, 8)
    assert first.lengths.unique().numel() > 1
    assert torch.equal(first.token_ids, again.token_ids)
    assert not (first.token_ids == 63).any()
    teacher_forced = model.eval().sequence_logprob(
        instruction, instruction_mask, visual, visual_mask, first.token_ids, first.token_ids != PAD
    )
    torch.testing.assert_close(first.logprobs, teacher_forced, atol=1e-4, rtol=1e-4)
    # every row of a sample runs until its longest candidate ends (finished rows are fed EOS), not only its own length
    assert (first.decode_tokens == 3 * (first.lengths.max(1).values - 1)).all()
    assert (first.decode_tokens > (first.lengths - 1).sum(1)).any()
    handle.remove()


def test_sampling_a_peaked_first_step_draws_no_suppressed_token():
    """One token far ahead at a low temperature: the other tokens' probabilities underflow to zero, and torch's
    multinomial without replacement then drew suppressed ones (-inf) for the second and third candidates."""
    model = make_model()
    handle = model.decoder.lm_head.register_forward_hook(lambda module, args, out: out + 12.0 * (
        torch.arange(out.shape[-1]) == 10))
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    for seed in range(3):
        drawn = model.generate_candidates(instruction, instruction_mask, visual, visual_mask, num_candidates=3,
                                          strategy="sample", temperature=0.1, top_p=0.9, max_new_tokens=6,
                                          suppress_token_ids=[43, 44], generator=torch.Generator().manual_seed(seed))
        first = drawn.token_ids[:, :, 0]
        assert not torch.isin(first, torch.tensor([43, 44, PAD, EOS])).any()
        assert all(len(set(row)) == 3 for row in first.tolist()) and (first == 10).any(1).all()
        assert torch.isfinite(drawn.logprobs).all()
    handle.remove()


@pytest.mark.parametrize("strategy", ["beam", "sample"])
def test_lockstep_decodes_every_step_and_changes_no_candidate(strategy):
    model = make_model()
    handle = _boost_eos(model, 6.0)  # every candidate ends after a token or two
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    calls = []
    counter = model.decoder.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    runs, forwards = {}, {}
    for lockstep in (False, True):
        calls.clear()
        runs[lockstep] = model.generate_candidates(
            instruction, instruction_mask, visual, visual_mask, num_candidates=2, num_beams=3, max_new_tokens=8,
            strategy=strategy, generator=torch.Generator().manual_seed(0), lockstep=lockstep)
        forwards[lockstep] = len(calls)
    counter.remove()
    handle.remove()
    assert forwards[False] < 8, "the candidates should end early for this test to mean anything"
    assert forwards[True] == 8  # the prefix pass + one forward per step but the forced-EOS last
    for field in ("token_ids", "lengths", "logprobs", "decode_tokens"):
        assert torch.equal(getattr(runs[True], field), getattr(runs[False], field)), field


def test_generate_candidates_validates_settings():
    model = make_model()
    instruction, instruction_mask, visual, visual_mask, _, _ = make_inputs()
    args = (instruction, instruction_mask, visual, visual_mask)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate_candidates(*args, num_candidates=3, num_beams=2)
    with pytest.raises(ValueError, match="strategy"):
        model.generate_candidates(*args, strategy="greedy")
    with pytest.raises(ValueError, match="temperature"):
        model.generate_candidates(*args, strategy="sample", temperature=0.0)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate_candidates(*args, suppress_token_ids=[EOS])
