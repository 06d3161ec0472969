import math

import pytest
import torch
from PIL import Image

from lvlm_prune.accm.caption_model import CaptionCandidates
from lvlm_prune.accm.compensation import ACCMCompensation, KeptVisualTokens, answer_logits, splice_context
from lvlm_prune.data import IGNORE_INDEX, VQACollator, VQAExample, answer_generation_mask
from lvlm_prune.engine import PrunedLlava
from lvlm_prune.flops import module_flops
from lvlm_prune.modeling import TinyLlavaSpec, build_tiny_llava
from lvlm_prune.modeling.compat import cache_argument, output_cache
from lvlm_prune.modeling.loading import freeze
from lvlm_prune.modeling.prompt import TINY_DEFAULT
from lvlm_prune.modeling.tokenizer import build_processor, build_word_tokenizer

WORDS = ("what color is the object at 1 2 3 4 ? red blue green square circle describe objects that matter for : "
         "additional information ; yes no").split()
RATIO = 0.875  # keeps 2 of 16 visual tokens


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_word_tokenizer(WORDS)
    processor = build_processor(tokenizer, image_size=32, patch_size=8)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    spec = TinyLlavaSpec(image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=2, vision_heads=2,
                         hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                         max_position_embeddings=256, vision_feature_layer=-2)
    model = freeze(build_tiny_llava(spec, vocab_size=len(tokenizer), image_token_id=image_token_id, seed=0))
    collator = VQACollator(processor, TINY_DEFAULT, image_token_id)
    examples = [
        VQAExample("q0", Image.new("RGB", (32, 32), (230, 40, 40)), "what color is the object at 1 2 ?", "red"),
        VQAExample("q1", Image.new("RGB", (32, 32), (50, 90, 240)), "what color is the object at 3 4 ?", "blue"),
        VQAExample("q2", Image.new("RGB", (32, 32), (40, 200, 60)), "is the object a circle ?", "yes no"),
    ]
    return tokenizer, PrunedLlava(model), collator(examples)


def make_plugin(engine, tokenizer, **overrides):
    torch.manual_seed(0)
    kwargs = dict(target_prune_ratio=RATIO, caption_embed_dim=32, caption_num_layers=1, caption_num_heads=2,
                  caption_prefix_length=2, caption_mapper_layers=1, caption_dropout=0.0, max_caption_tokens=6,
                  max_instruction_tokens=16, selector_hidden=16, selector_heads=2, selector_question_prefix="what",
                  selector_supplement_prefix="additional information :", warmup_fraction=0.5)
    kwargs.update(overrides)
    plugin = ACCMCompensation(**kwargs)
    plugin.attach(engine, tokenizer)
    return plugin


def caption_tokens(plugin, candidates, b, m):
    tokens = candidates.token_ids[b, m, : int(candidates.lengths[b, m])].tolist()
    assert tokens[-1] == plugin.eos_token_id
    return tokens[:-1]


def test_visual_inputs_skip_the_vision_tower_and_give_the_same_logits(setup):
    _, engine, batch = setup
    args = (batch["input_ids"], batch["attention_mask"])
    reference = engine(*args, batch["pixel_values"], labels=batch["labels"])
    features, hidden = engine.visual_features(batch["pixel_values"])
    calls = []
    handle = engine.llava.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    reused = engine(*args, None, labels=batch["labels"], visual_inputs=(features, hidden))
    handle.remove()
    assert not calls
    torch.testing.assert_close(reused.logits, reference.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="visual_inputs"):
        engine(*args, None, visual_inputs=(features[:, :3], hidden))
    with pytest.raises(ValueError, match="pixel_values"):
        engine(*args, None)


def test_constructor_and_attach_reject_bad_settings(setup):
    tokenizer, engine, _ = setup
    for bad in (dict(vision_selection="fastv"), dict(strategy="greedy"), dict(objective="ppo"),
                dict(selector_encoder="clip"), dict(describe_instruction="describe the image"),
                dict(num_beams=2, num_candidates=3), dict(target_prune_ratio=1.0), dict(caption_prefix_mode="mean"),
                dict(caption_position_init_std=-1.0), dict(num_candidates=1),
                dict(sample_temperature=0.0, strategy="sample"), dict(sample_top_p=1.5), dict(gate_scale=0.0)):
        setting, value = next(iter(bad.items()))  # the error names the setting and the value given
        with pytest.raises(ValueError, match=rf"^accm {setting}={value!r}"):
            ACCMCompensation(**bad)
    with pytest.raises(ValueError, match="tokenizer"):
        ACCMCompensation().attach(engine, None)
    plugin = make_plugin(engine, tokenizer, question_suffixes=["at 1 2 ?"])
    with pytest.raises(ValueError, match="variant"):
        plugin.variant_mode("accm_best")
    assert plugin.question_text(" what color is the object at 1 2 ? ") == "what color is the object"
    assert plugin.question_text("is the object a circle ?") == "is the object a circle ?"


def test_pre_llm_selection_keeps_k_tokens_and_caption_reads_the_discarded_ones(setup):
    tokenizer, engine, batch = setup
    for selection_name in ("prumerge", "random", "visionzip"):
        plugin = make_plugin(engine, tokenizer, vision_selection=selection_name)
        selection = plugin.select_visual_tokens(engine, batch, RATIO)
        assert selection.keep.sum(1).tolist() == [2, 2, 2]
        assert selection.discarded.shape[:2] == (3, 14) and selection.discarded_mask.all()
        for b in range(3):
            torch.testing.assert_close(selection.discarded[b], selection.features[b][~selection.keep[b]])
            assert selection.discarded_index[b].tolist() == (~selection.keep[b]).nonzero().squeeze(1).tolist()
        # the caption model reads them with their grid positions (an embedding that starts at zero)
        torch.testing.assert_close(plugin.caption_visual(selection), selection.discarded)
        with torch.no_grad():
            plugin.discarded_positions.weight[5] += 1.0
        shifted = plugin.caption_visual(selection) - selection.discarded
        assert torch.equal(shifted.abs().sum(-1) > 0, selection.discarded_index == 5)
        out = engine(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"],
                     method=plugin.inference_method(RATIO), logits="none")
        assert (out.visual_tokens_per_layer == 2).all()


def test_token_prefix_mode_reads_every_discarded_token_with_its_grid_position(setup):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, caption_prefix_mode="tokens", caption_position_init_std=1.0)
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    # positions start visible (std 1), not at zero
    # (16 visual tokens x the hidden width: the sample std spreads by about 3 %; 15 % is five times that)
    assert plugin.discarded_positions.weight.std().item() == pytest.approx(1.0, rel=0.15)
    smaller = make_plugin(engine, tokenizer, caption_prefix_mode="tokens", caption_position_init_std=0.25)
    assert smaller.discarded_positions.weight.std().item() == pytest.approx(0.25, rel=0.15)
    assert not torch.allclose(plugin.caption_visual(selection), selection.discarded)
    ids, mask = plugin.instructions(batch["questions"], selection.features.device)
    candidates = plugin.caption_candidates(batch, selection)
    assert torch.equal(candidates.prefix_lengths, mask.sum(1) + selection.discarded_mask.sum(1))
    assert plugin.caption_model.max_length == plugin.max_instruction_tokens + 16 + plugin.max_caption_tokens


def test_splice_puts_the_caption_after_the_image_and_masks_it_out_of_the_loss(setup, monkeypatch):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    candidates = plugin.caption_candidates(batch, selection)
    spliced = plugin.spliced_teacher_forced(batch, candidates)
    num = candidates.lengths.shape[1]
    prefix = plugin.context_prefix_ids
    assert prefix == tokenizer("additional information :", add_special_tokens=False)["input_ids"]
    for b in range(3):
        answer = batch["labels"][b][batch["labels"][b] != IGNORE_INDEX].tolist()
        for m in range(num):
            row = b * num + m
            ids = spliced.input_ids[row][spliced.attention_mask[row].bool()].tolist()
            last_image = max(i for i, t in enumerate(ids) if t == plugin.image_token_id)
            insert = prefix + caption_tokens(plugin, candidates, b, m)
            assert ids[last_image + 1: last_image + 1 + len(insert)] == insert
            original = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
            assert ids[: last_image + 1] + ids[last_image + 1 + len(insert):] == original
            labels = spliced.labels[row]
            assert (labels[spliced.inserted[row]] == IGNORE_INDEX).all()
            assert int(spliced.inserted[row].sum()) == len(insert)
            assert labels[labels != IGNORE_INDEX].tolist() == answer
    # training_losses hands exactly these sequences (candidates come out the same: beam search, eval mode)
    seen = []
    forward = engine.forward
    monkeypatch.setattr(engine, "forward", lambda *a, **k: seen.append((a, k)) or forward(*a, **k))
    plugin.training_losses(engine, batch, progress=0.9)
    assert any(a[0].shape == spliced.input_ids.shape and torch.equal(a[0], spliced.input_ids)
               and torch.equal(k["labels"], spliced.labels) for a, k in seen)


def test_splice_context_keeps_hidden_visual_tokens_hidden():
    ids = torch.tensor([[0, 1, 9, 9, 5, 6], [0, 1, 9, 9, 5, 6]])
    mask = torch.tensor([[0, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])  # sample 0 hides its first visual token
    out = splice_context(ids, mask, None, 9, [torch.tensor([3, 4]), torch.tensor([3])], 0, "left")
    assert out.input_ids.tolist() == [[1, 9, 9, 3, 4, 5, 6], [0, 1, 9, 9, 3, 5, 6]]
    assert out.attention_mask.tolist() == [[1, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]]
    assert out.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4, 5]]
    assert out.inserted.nonzero().tolist() == [[0, 3], [0, 4], [1, 4]]


@pytest.fixture
def unfrozen_base(setup):
    """The fixture's base with requires_grad on for one test: a gradient that reached it would then be recorded
    (with the freeze on, `grad is None` holds whatever the plug-in does)."""
    _, engine, _ = setup
    engine.model.requires_grad_(True)
    try:
        yield engine.model
    finally:
        engine.model.requires_grad_(False)
        engine.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("objective", ["kl_ce", "dpo"])
def test_losses_are_finite_and_only_plugin_parameters_get_gradients(setup, objective, unfrozen_base):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, objective=objective)
    base_ids = {id(p) for p in engine.model.parameters()}
    assert not base_ids & {id(p) for p in plugin.parameters()}
    # every base pass of ACCM (selection, warm-start descriptions, KL ranking) runs without a graph, so even a base
    # left trainable gets no gradient
    assert all(p.requires_grad for p in engine.model.parameters())
    for progress, expected in ((0.0, {"caption_warmup"}),
                               (0.9, {"selector", "kl_best", "kl_mean", "caption" if objective == "kl_ce" else "dpo"})):
        plugin.zero_grad(set_to_none=True)
        losses = plugin.training_losses(engine, batch, progress)
        assert expected <= set(losses) and all(torch.isfinite(v).all() for v in losses.values())
        losses["loss"].backward()
        assert all(p.grad is None for p in engine.model.parameters())
        assert any(p.grad is not None for p in plugin.caption_model.parameters())
        assert plugin.discarded_positions.weight.grad is not None
        selector_grads = [p.grad is not None for p in plugin.selector.parameters()]
        assert all(selector_grads) if progress > 0.5 else not any(selector_grads)
    if objective == "dpo":
        assert bool(plugin.reference_ready)
        for frozen in (plugin.reference_caption_model, plugin.reference_discarded_positions):
            assert not any(p.requires_grad or p.grad is not None for p in frozen.parameters())
        # at the stage-2 start the policy equals its reference: DPO gives log 2, also with dropout (off for both)
        for dropout in (0.0, 0.3):
            fresh = make_plugin(engine, tokenizer, objective="dpo", warmup_fraction=0.0, caption_dropout=dropout)
            fresh.train()
            losses = fresh.training_losses(engine, batch, 0.0)
            assert losses["kl_margin"].item() > 0 and fresh.caption_model.training
            assert math.isclose(losses["dpo"].item(), math.log(2), rel_tol=1e-5)
            losses["loss"].backward()
            assert any(p.grad is not None for p in fresh.caption_model.parameters())


def test_a_deepspeed_checkpoint_without_the_copied_dpo_reference_is_refused(setup):
    # the DeepSpeed presets leave frozen weights out of checkpoints: before stage 2 the reference is not copied yet and
    # its absence is harmless; after, a resumed run would silently train against another reference
    from torch import nn

    from lightning_modules.strategies import check_frozen_weights_loaded

    tokenizer, engine, _ = setup
    plugin = make_plugin(engine, tokenizer, objective="dpo")
    module = nn.Module()
    module.compensation = plugin
    frozen = sorted(f"compensation.{n}" for n, p in plugin.named_parameters() if not p.requires_grad)
    assert frozen and all(".reference_" in n for n in frozen)
    assert plugin.frozen_weights_needed() == []
    check_frozen_weights_loaded(module, frozen, "ckpt")  # not copied yet: nothing lost
    plugin.reference_ready.fill_(True)
    assert sorted(f"compensation.{n}" for n in plugin.frozen_weights_needed()) == frozen
    check_frozen_weights_loaded(module, [], "ckpt")
    with pytest.raises(RuntimeError, match=r"'ckpt' lacks frozen plug-in weights the run needs .*DPO reference is "
                                           r"lost once stage 2 has started"):
        check_frozen_weights_loaded(module, frozen[:1], "ckpt")
    assert make_plugin(engine, tokenizer).frozen_weights_needed() == []  # kl_ce keeps no frozen copy


def test_exported_weights_leave_the_dpo_reference_out_and_load_without_it(setup, tmp_path):
    from safetensors.torch import load_file

    from lightning_modules.compensation import export_plugin_weights, load_plugin_weights

    tokenizer, engine, _ = setup
    plugin = make_plugin(engine, tokenizer, objective="dpo")
    plugin.reference_ready.fill_(True)
    path = export_plugin_weights(plugin, tmp_path / "plugin.safetensors", {})
    saved = load_file(str(path))
    assert saved and not any(key.startswith("reference_") for key in saved)  # a training-time snapshot
    assert set(saved) == {k for k in plugin.state_dict() if not k.startswith("reference_")}
    for objective in ("dpo", "kl_ce"):  # inference builds either; neither asks for the reference
        loaded = make_plugin(engine, tokenizer, objective=objective)
        load_plugin_weights(loaded, path)
        torch.testing.assert_close(loaded.caption_model.state_dict(), plugin.caption_model.state_dict())


def test_a_batch_without_answer_tokens_trains_to_a_zero_stage_2_loss(setup):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    batch = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
    losses = plugin.training_losses(engine, batch, 0.9)  # stage 2: KL ranking over no answer position
    assert losses["loss"].item() == 0.0 and losses["kl_best"].item() == 0.0
    losses["loss"].backward()


def test_warm_start_uses_the_frozen_lvlm_description_and_caches_it(setup, monkeypatch):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    ids, mask = plugin.describe_prompts(batch, [0, 2])
    for row, b in enumerate((0, 2)):
        real = ids[row][mask[row].bool()].tolist()
        assert real.count(plugin.image_token_id) == 16
        describe = tokenizer("describe the objects that matter for : " + batch["questions"][b],
                             add_special_tokens=False)["input_ids"]
        text = real[real.index(plugin.image_token_id) + 16:]
        assert text[: len(describe)] == describe and tokenizer.decode(text[len(describe):]) == "ASSISTANT :"
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    targets, target_mask = plugin.warm_start_captions(engine, batch, selection)
    prompts, prompt_mask = plugin.describe_prompts(batch, [0, 1, 2])
    generated, _ = engine.generate(prompts, prompt_mask, batch["pixel_values"], max_new_tokens=6,
                                   eos_token_id=plugin.eos_token_id, pad_token_id=plugin.pad_token_id)
    for b in range(3):
        row = generated[b].tolist()
        row = row[: row.index(plugin.eos_token_id)] if plugin.eos_token_id in row else row
        # words up to EOS (pad / image / BOS dropped: they cannot be spliced), at most 5, then EOS
        words = [t for t in row if t not in (plugin.pad_token_id, plugin.image_token_id, tokenizer.bos_token_id)]
        assert targets[b][target_mask[b].bool()].tolist() == words[:5] + [plugin.eos_token_id]
    calls = []
    monkeypatch.setattr(engine, "generate", lambda *a, **k: calls.append(1))
    again, _ = plugin.warm_start_captions(engine, batch, selection)
    assert not calls and torch.equal(again, targets)


def test_a_short_fit_lowers_the_losses(setup, monkeypatch):
    tokenizer, engine, batch = setup
    for progress in (0.0, 0.9):
        plugin = make_plugin(engine, tokenizer)
        if progress > 0.5:
            # fixed candidates (so fixed KL pseudo-labels): the loss must fall as caption model and selector fit them
            fixed = plugin.caption_candidates(batch, plugin.select_visual_tokens(engine, batch, RATIO))
            monkeypatch.setattr(plugin, "caption_candidates", lambda *args: fixed)
        optimizer = torch.optim.Adam([p for p in plugin.parameters() if p.requires_grad], lr=5e-3)
        history = []
        for _ in range(10):
            losses = plugin.training_losses(engine, batch, progress)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
            history.append(losses["loss"].item())
        assert history[-1] < 0.7 * history[0], (progress, history)


def test_generate_splices_the_selected_caption_and_counts_its_tokens(setup):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    args = (engine, batch, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id)
    alone = plugin.generate(*args, variant="accm_prune_only")
    result = plugin.generate(*args)
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    candidates = plugin.caption_candidates(batch, selection)
    pick = plugin.selector_scores(batch, candidates)[0].argmax(-1)
    spliced = [len(plugin.context_prefix_ids) + len(caption_tokens(plugin, candidates, b, int(pick[b])))
               for b in range(3)]
    assert (result.text_tokens - alone.text_tokens).tolist() == spliced
    assert (result.visual_tokens_per_layer == 2).all() and (alone.visual_tokens_per_layer == 2).all()
    assert set(result.plugin_flops) == {"caption_model", "selector"} and not alone.plugin_flops
    assert all(v.shape == (3,) and (v > 0).all() for v in result.plugin_flops.values())
    # the answer is the engine's greedy answer to the spliced prompt with the kept tokens
    prompt = splice_context(batch["prompt_input_ids"], batch["prompt_attention_mask"], None, plugin.image_token_id,
                            plugin.caption_inserts(candidates, pick), tokenizer.pad_token_id, "left")
    expected, _ = engine.generate(prompt.input_ids, prompt.attention_mask, batch["pixel_values"], prompt.position_ids,
                                  method=KeptVisualTokens(selection.keep), max_new_tokens=4,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(result.tokens, expected)


def test_oracle_and_random_variants(setup):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    assert plugin.variants() == ["accm", "accm_oracle", "accm_random", "accm_prune_only", "accm_top_beam",
                                 "accm_confidence", "accm_confidence_gate"]
    args = (engine, batch, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id)
    alone = plugin.generate(*args, variant="accm_prune_only")
    for variant in ("accm_oracle", "accm_random"):
        result = plugin.generate(*args, variant=variant)
        assert result.tokens.shape[0] == 3 and set(result.plugin_flops) == {"caption_model"}
    # the random variant splices the candidate `random_pick` names for each sample, and counts its tokens
    picks, caption_inserts = [], plugin.caption_inserts
    plugin.caption_inserts = lambda candidates, pick=None: picks.append(pick) or caption_inserts(candidates, pick)
    try:
        result = plugin.generate(*args, variant="accm_random")
    finally:
        del plugin.caption_inserts
    candidates = plugin.caption_candidates(batch, plugin.select_visual_tokens(engine, batch, RATIO))
    expected_pick = plugin.random_pick(batch, candidates.lengths.shape[1])
    assert len(picks) == 1 and torch.equal(picks[0], expected_pick)
    spliced = [len(plugin.context_prefix_ids) + len(caption_tokens(plugin, candidates, b, int(expected_pick[b])))
               for b in range(3)]
    assert (result.text_tokens - alone.text_tokens).tolist() == spliced
    sampled = make_plugin(engine, tokenizer, strategy="sample", sample_top_p=1.0)
    first = sampled.generate(*args)
    assert first.tokens.shape[0] == 3 and (first.plugin_flops["caption_model"] > 0).all()
    # sampling is seeded by the batch, not by what was drawn before: a resumed run or another sweep order draws
    # the same candidates
    selection = sampled.select_visual_tokens(engine, batch, RATIO)
    drawn = [sampled.caption_candidates(batch, selection).token_ids for _ in range(2)]
    assert torch.equal(drawn[0], drawn[1])
    # ... by the batch's questions and the plug-in's seed: other questions, or another seed, draw otherwise
    reseeded = make_plugin(engine, tokenizer, strategy="sample", sample_top_p=1.0, seed=1)
    assert not torch.equal(reseeded.caption_candidates(batch, selection).token_ids, drawn[0])
    other_questions = {**batch, "question_ids": [f"{q}/other" for q in batch["question_ids"]]}
    assert not torch.equal(sampled.caption_candidates(other_questions, selection).token_ids, drawn[0])
    picks = plugin.random_pick(batch, 3)
    reordered = {k: (v[::-1] if isinstance(v, list) else v) for k, v in batch.items()}
    assert plugin.random_pick(reordered, 3).tolist() == picks.tolist()[::-1]
    no_answers = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    with pytest.raises(ValueError, match="teacher-forced"):
        plugin.generate(engine, no_answers, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        variant="accm_oracle")
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    candidates = plugin.caption_candidates(batch, selection)
    kl = plugin.candidate_kl(engine, batch, selection, candidates, RATIO)["kl"]
    assert kl.shape == (3, 3) and (kl >= 0).all()


def test_the_kl_reference_is_the_frozen_base_on_every_visual_token(setup, monkeypatch):
    from lvlm_prune.accm import compensation

    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    candidates = plugin.caption_candidates(batch, selection)
    references = []
    answer_kl = compensation.answer_kl
    monkeypatch.setattr(compensation, "answer_kl",
                        lambda reference, *rest: references.append(reference) or answer_kl(reference, *rest))
    kl = plugin.candidate_kl(engine, batch, selection, candidates, RATIO)
    with torch.no_grad():
        full = engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"]).logits
    positions = answer_generation_mask(batch["labels"])
    assert len(references) == 2  # the pruned prompt alone, then the candidates, against the same reference
    for reference in references:
        for b in range(3):
            answers = int(positions[b].sum())
            torch.testing.assert_close(reference[b, :answers], full[b][positions[b]], atol=1e-5, rtol=1e-5)
    assert (kl["kl_no_caption"] > 0).all()


def test_the_oracle_picks_the_candidate_of_lowest_kl(setup, monkeypatch):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    results, picks = [], []
    candidate_kl, caption_inserts = plugin.candidate_kl, plugin.caption_inserts
    monkeypatch.setattr(plugin, "candidate_kl", lambda *args: results.append(candidate_kl(*args)) or results[-1])
    monkeypatch.setattr(plugin, "caption_inserts",
                        lambda candidates, pick=None: picks.append(pick) or caption_inserts(candidates, pick))
    plugin.generate(engine, batch, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id, variant="accm_oracle")
    (result,), (pick,) = results, [pick for pick in picks if pick is not None]  # None: every candidate, for the KL
    kl = result["kl"]
    assert (kl.argmin(-1) != kl.argmax(-1)).all()  # distinct candidates: the lowest and the highest KL differ
    assert torch.equal(pick, kl.argmin(-1))


def test_caption_flops_match_the_flop_counter(setup):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    decoder = plugin.caption_model.decoder.eval()
    prefix_length, steps = 9, 4
    embed = decoder.config.n_embd
    mapper = module_flops(plugin.caption_model.mapper.train(), selection.discarded[:1])
    prefill = module_flops(decoder, inputs_embeds=torch.randn(1, prefix_length, embed), logits_to_keep=1)
    cache = output_cache(decoder(inputs_embeds=torch.randn(plugin.num_beams, prefix_length, embed), use_cache=True))
    decode = 0
    for _ in range(steps):
        decode += module_flops(decoder, inputs_embeds=torch.randn(plugin.num_beams, 1, embed), use_cache=True,
                               **cache_argument(cache))
    candidates = CaptionCandidates(
        token_ids=torch.zeros(3, 3, 2, dtype=torch.long), lengths=torch.ones(3, 3, dtype=torch.long),
        logprobs=torch.zeros(3, 3), prefix_lengths=torch.full((3,), prefix_length),
        decode_tokens=torch.tensor([0, plugin.num_beams * steps, 0]))
    flops = plugin.caption_flops(candidates, selection)
    assert flops[0].item() == pytest.approx(mapper + prefill, rel=1e-6)
    assert flops[1].item() == pytest.approx(mapper + prefill + decode, rel=1e-6)
    assert plugin.selector_flops(torch.tensor([[7, 8, 9]]))[0].item() == pytest.approx(
        module_flops(plugin.selector.train(), torch.randn(1, 3, 32)), rel=1e-6)


def test_answer_logits_are_the_engine_logits_at_the_answer_positions(setup):
    _, engine, batch = setup
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    full = engine(*args, labels=batch["labels"]).logits
    logits, valid = answer_logits(engine, engine(*args, labels=batch["labels"], logits="none"))
    positions = answer_generation_mask(batch["labels"])
    for b in range(3):
        torch.testing.assert_close(logits[b][valid[b]], full[b][positions[b]], atol=1e-5, rtol=1e-5)


def test_compensation_module_routes_variants_and_exports_tied_weights(tiny_base_dir, tmp_path):
    from datamodules.synthetic import SyntheticVQADataModule
    from lightning_modules.compensation import CompensationModule, export_plugin_weights, load_plugin_weights

    data = SyntheticVQADataModule(grid=4, cell_size=8, min_objects=4, max_objects=5, num_test=4, eval_batch_size=4,
                                  processor_path=str(tiny_base_dir))
    tokenizer = data.processor.tokenizer
    plugin = ACCMCompensation(target_prune_ratio=RATIO, caption_embed_dim=32, caption_num_layers=1, caption_num_heads=2,
                              caption_prefix_length=2, caption_mapper_layers=1, max_caption_tokens=6,
                              selector_hidden=16, selector_heads=2, selector_question_prefix="",
                              selector_supplement_prefix="additional information :")
    module = CompensationModule(str(tiny_base_dir), plugin, processor=data.processor).eval()
    assert module.plugin_method_names() == plugin.variants()
    batch = next(iter(data.test_dataloader()))
    for name in plugin.variants():
        assert module.make_method(name, RATIO).keep == 2  # the pre-LLM selection alone
        result = module.generate_with(batch, name, RATIO)
        assert result.tokens.shape[0] == 4 and (result.visual_tokens_per_layer == 2).all()
        assert ("caption_model" in result.plugin_flops) == (name != "accm_prune_only")
    assert module.generate_with(batch, "random", RATIO).plugin_flops == {}
    path = export_plugin_weights(plugin, tmp_path / "plugin.safetensors", {})
    restored = ACCMCompensation(**plugin.export_config())
    restored.attach(module.engine, tokenizer)
    load_plugin_weights(restored, path)
    for key, value in plugin.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value)


def test_a_multi_turn_sample_ranks_the_captions_on_its_first_answer_only(setup, monkeypatch):
    from lvlm_prune.data import first_answer_only

    tokenizer, engine, _ = setup
    image = Image.new("RGB", (32, 32), (230, 40, 40))
    collator = VQACollator(build_processor(tokenizer, image_size=32, patch_size=8), TINY_DEFAULT,
                           tokenizer.convert_tokens_to_ids("<image>"))
    batch = collator([VQAExample("q0", image, "what color is the object at 1 2 ?", "red",
                                 extra_turns=(("is the object a circle ?", "no"),)),
                      VQAExample("q1", image, "is the object a circle ?", "no")])
    first = first_answer_only(batch["labels"])
    words = [tokenizer.decode([t for t in row.tolist() if t != IGNORE_INDEX]).split() for row in first]
    assert words == [["red", "</s>"], ["no", "</s>"]]
    assert torch.equal(first[1], batch["labels"][1])  # a single-turn sample is unchanged
    plugin = make_plugin(engine, tokenizer, warmup_fraction=0.0)
    ranked = []
    candidate_kl = plugin.candidate_kl
    monkeypatch.setattr(plugin, "candidate_kl", lambda engine, batch, *rest: ranked.append(batch["labels"])
                        or candidate_kl(engine, batch, *rest))
    plugin.training_losses(engine, batch, progress=1.0)
    assert torch.equal(ranked[0], first)


def test_the_grid_position_embedding_is_added_in_the_plugins_precision(setup):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, caption_position_init_std=0.003)
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    features = selection.discarded.to(torch.bfloat16)  # a bf16 base's features
    seen = plugin.caption_visual(type(selection)(**{**vars(selection), "discarded": features}))
    position = plugin.discarded_positions(selection.discarded_index)
    assert seen.dtype == torch.float32
    torch.testing.assert_close(seen, features.float() + position)
    assert not torch.equal(seen, features.float())  # rounded to bf16, most of these 0.003s would vanish
    # and the mapper's input projection reads it in fp32 also under bf16 autocast (bf16-mixed precision)
    projected = []
    proj = plugin.caption_model.mapper.visual_proj
    hook = proj.register_forward_hook(lambda m, args, out: projected.append(out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plugin.caption_model.mapper(seen, selection.discarded_mask)
    hook.remove()
    assert projected[0].dtype == torch.float32  # autocast would have run it on a bf16 cast of `seen`
    torch.testing.assert_close(projected[0], proj(seen))
