"""Unit checks of the ACCM compensation plug-in that the other ACCM tests leave open: settings validation, the
pre-LLM selection's wiring, caption and selector inputs, the training terms and the FLOP counts, with small
values computed by hand."""

from __future__ import annotations

import pytest
import torch

from lvlm_prune.accm import compensation
from lvlm_prune.accm.caption_model import CaptionCandidates
from lvlm_prune.accm.compensation import ACCMCompensation, KeptVisualTokens, PruMergePlusPruning
from lvlm_prune.flops import llm_prefill_flops

from test_accm_compensation import RATIO, make_plugin, setup  # noqa: F401  (setup is a fixture)
from test_accm_pretrained import make_plugin as make_pretrained_plugin
from test_accm_pretrained import save_tiny_gpt2


def test_prumerge_refuses_a_text_fraction_outside_zero_one():
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^prumerge: text_fraction={bad} must be in \[0, 1\]$"):
            PruMergePlusPruning(0.5, text_fraction=bad)
    assert [PruMergePlusPruning(0.5, text_fraction=edge).text_fraction for edge in (0.0, 1.0)] == [0.0, 1.0]


@pytest.mark.parametrize("bad", [dict(max_caption_tokens=1), dict(max_instruction_tokens=0),
                                 dict(warmup_fraction=1.5), dict(dpo_beta=0.0), dict(target_prune_ratio=-0.1),
                                 dict(describe_instruction="{question} {image}")])
def test_the_constructor_refuses_more_bad_settings(bad):
    setting, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=rf"^accm {setting}={value!r}"):
        ACCMCompensation(**bad)


def test_clip_text_needs_a_path_and_zero_position_std_is_allowed():
    with pytest.raises(ValueError, match="selector_encoder_path"):
        ACCMCompensation(selector_encoder="clip_text")
    assert ACCMCompensation(caption_position_init_std=0.0).caption_position_init_std == 0.0


def test_inference_refuses_a_ratio_outside_zero_one(setup):
    tokenizer, engine, _ = setup
    plugin = make_plugin(engine, tokenizer)
    for ratio in (1.0, -0.5):
        with pytest.raises(ValueError, match="prune_ratio"):
            plugin.inference_method(ratio)


def test_kept_visual_tokens_plan_the_mean_count_and_refuse_another_shape(setup):
    tokenizer, engine, batch = setup
    keep = torch.zeros(3, 16, dtype=torch.bool)
    keep[0, :2], keep[1, :4], keep[2, :6] = True, True, True
    method = engine.bind(KeptVisualTokens(keep, 0.75))
    assert method.planned_visual_tokens() == [4.0] * engine.info.num_layers
    with pytest.raises(ValueError, match="does not fit"):
        engine(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"],
               method=KeptVisualTokens(keep[:, :8]), logits="none")


def test_pad_rows_keeps_one_column_for_empty_rows():
    ids, mask = ACCMCompensation._pad_rows([[], [4, 5]], 0, torch.device("cpu"))
    assert ids.tolist() == [[0, 0], [4, 5]] and mask.tolist() == [[0, 0], [1, 1]]
    ids, mask = ACCMCompensation._pad_rows([[], []], 7, torch.device("cpu"))
    assert ids.tolist() == [[7], [7]] and mask.tolist() == [[0], [0]]


def hand_candidates(eos):
    """Sample 0: [5 6 EOS] and [7 EOS]; sample 1: [8 EOS] and [9 10] (cut at max length, no EOS)."""
    token_ids = torch.tensor([[[5, 6, eos], [7, eos, 0]], [[8, eos, 0], [9, 10, 0]]])
    lengths = torch.tensor([[3, 2], [2, 2]])
    zeros = torch.zeros(2, 2)
    return CaptionCandidates(token_ids, lengths, zeros, torch.zeros(2, dtype=torch.long),
                             torch.zeros(2, dtype=torch.long))


def test_candidate_tokens_drop_only_a_final_eos_and_inserts_follow_the_pick(setup):
    tokenizer, engine, _ = setup
    plugin = make_plugin(engine, tokenizer)
    candidates = hand_candidates(plugin.eos_token_id)
    assert plugin.candidate_tokens(candidates, 0, 0) == [5, 6]
    assert plugin.candidate_tokens(candidates, 1, 1) == [9, 10]
    prefix = plugin.context_prefix_ids
    inserts = plugin.caption_inserts(candidates, torch.tensor([1, 0]))
    assert [row.tolist() for row in inserts] == [prefix + [7], prefix + [8]]
    every = plugin.caption_inserts(candidates)
    assert [row.tolist() for row in every] == [prefix + [5, 6], prefix + [7], prefix + [8], prefix + [9, 10]]


def test_instructions_are_cut_to_max_instruction_tokens_and_suffixes_only_at_the_end(setup):
    tokenizer, engine, _ = setup
    plugin = make_plugin(engine, tokenizer, max_instruction_tokens=3, question_suffixes=["at 1 2 ?"])
    ids, mask = plugin.instructions(["what color is the object at 1 2 ?", "is it red ?"], torch.device("cpu"))
    assert ids.shape == (2, 3) and mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert plugin.question_text("at 1 2 ? what color") == "at 1 2 ? what color"


def test_warm_start_targets_stop_at_eos_drop_special_tokens_and_end_with_eos(setup):
    tokenizer, engine, _ = setup
    plugin = make_plugin(engine, tokenizer, max_caption_tokens=4)
    red, blue, green = tokenizer.convert_tokens_to_ids(["red", "blue", "green"])
    eos, image = plugin.eos_token_id, plugin.image_token_id
    assert plugin._caption_from_generation([red, image, blue, plugin.pad_token_id, eos, green]) == [red, blue, eos]
    assert plugin._caption_from_generation([red, blue, green, red, blue]) == [red, blue, green, eos]
    assert plugin._caption_from_generation([eos, red]) == [eos]


def test_random_pick_depends_on_the_seed_and_question_id_not_the_batch(setup):
    tokenizer, engine, _ = setup
    ids = [f"q{i}" for i in range(40)]
    picks = {seed: make_plugin(engine, tokenizer, seed=seed).random_pick({"question_ids": ids, "questions": ids}, 3)
             for seed in (0, 1)}
    assert not torch.equal(picks[0], picks[1]) and set(picks[0].tolist()) == {0, 1, 2}
    plugin = make_plugin(engine, tokenizer, seed=0)
    reversed_ids = ids[::-1]
    again = plugin.random_pick({"question_ids": reversed_ids, "questions": reversed_ids}, 3)
    assert torch.equal(again.flip(0), picks[0])


def test_the_dpo_reference_is_not_frozen_state_before_it_is_copied(setup):
    tokenizer, engine, _ = setup
    plugin = make_plugin(engine, tokenizer, objective="dpo")
    assert plugin.frozen_weights_needed() == []
    plugin.reference_ready.fill_(True)
    names = plugin.frozen_weights_needed()
    assert names and all(n.startswith(("reference_caption_model.", "reference_discarded_positions.")) for n in names)


def test_prumerge_reads_the_cls_attention_after_the_read_layer_with_the_question_and_the_grid(setup, monkeypatch):
    """vision_feature_layer -2 of a 2-layer tower: the [CLS] attention is the last layer's (single head) on the
    first layer's output; the text-guided share gets relevance scores and the 4 x 4 grid."""
    tokenizer, engine, batch = setup
    seen = {}

    def cls_spy(layer, layer_input, num, single_head=False):
        seen.update(layer=layer, layer_input=layer_input, single_head=single_head)
        return cls_attention(layer, layer_input, num, single_head=single_head)

    def select_spy(cls, relevance, keep, **kwargs):
        seen.update(relevance=relevance, **kwargs)
        return prumerge_select(cls, relevance, keep, **kwargs)

    cls_attention, prumerge_select = compensation.cls_attention_to_visual_tokens, compensation.prumerge_plus_select
    monkeypatch.setattr(compensation, "cls_attention_to_visual_tokens", cls_spy)
    monkeypatch.setattr(compensation, "prumerge_plus_select", select_spy)
    selection = make_plugin(engine, tokenizer).select_visual_tokens(engine, batch, RATIO)
    assert seen["layer"] is engine.model.model.vision_tower.encoder.layers[1] and seen["single_head"]
    torch.testing.assert_close(seen["layer_input"], selection.vision_hidden[1])
    assert seen["relevance"] is not None and seen["relevance"].shape == (3, 16)
    assert seen["grid_side"] == 4 and seen["text_fraction"] == pytest.approx(2 / 3)


def test_special_ids_of_the_lvlm_tokenizer(setup):
    """A language-model selector encoder reads BOS first; BOS and the image token are never caption words."""
    tokenizer, engine, _ = setup
    what = tokenizer("what", add_special_tokens=False)["input_ids"]
    assert make_plugin(engine, tokenizer).question_prefix_ids == what
    plugin = make_plugin(engine, tokenizer, selector_encoder="language_model")
    assert plugin.question_prefix_ids == [tokenizer.bos_token_id] + what
    assert plugin.suppressed_token_ids == sorted({tokenizer.bos_token_id, plugin.image_token_id})
    assert plugin.pad_token_id == tokenizer.pad_token_id != plugin.eos_token_id


def test_selector_text_parts_join_prefix_and_text_with_one_space(setup):
    tokenizer, engine, _ = setup
    plugin = make_plugin(engine, tokenizer)
    assert plugin.selector_text_parts(" is it red ? ", " red square ") == (
        "what is it red ?", "additional information : red square")


def test_sampling_generators_follow_the_question_ids(setup):
    tokenizer, engine, _ = setup
    plugin = make_plugin(engine, tokenizer, strategy="sample")
    assert make_plugin(engine, tokenizer)._sampling_generator({"questions": ["a"]}, torch.device("cpu")) is None

    def draw(batch):
        return torch.rand(4, generator=plugin._sampling_generator(batch, torch.device("cpu")))

    same_text = [{"question_ids": [q], "questions": ["is it red ?"]} for q in ("q0", "q1")]
    assert not torch.equal(draw(same_text[0]), draw(same_text[1]))
    assert torch.equal(draw(same_text[0]), draw(dict(same_text[0])))


def test_stage_two_starts_at_the_warmup_fraction(setup, monkeypatch):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, warmup_fraction=0.5)
    monkeypatch.setattr(plugin, "warm_start_captions", lambda *a: pytest.fail("stage 1 at progress 0.5"))
    assert plugin.training_losses(engine, batch, 0.5)["stage"].item() == 2.0


def mapper_flops_by_hand(discarded):
    """The prefix mapper (1 layer, width 32, 2 queries, MLP 128) over `discarded` tokens: projection, q/k/v,
    scores and values, output projection, MLP (2 FLOPs per multiply-add)."""
    t = discarded + 2
    return 2 * discarded * 32 * 32 + 2 * t * 32 * 96 + 2 * 2 * t * t * 32 + 2 * t * 32 * 32 + 2 * 2 * t * 32 * 128


def test_plugin_flops_do_not_depend_on_train_or_eval_mode(setup):
    tokenizer, engine, batch = setup
    flops = {}
    for training in (True, False):
        plugin = make_plugin(engine, tokenizer).train(training)
        for discarded in (14, 10):
            assert plugin._mapper_flops(discarded, torch.device("cpu")) == mapper_flops_by_hand(discarded)
        flops[training] = plugin.selector_flops(torch.tensor([[5, 6, 7]]))
        assert plugin.training == training
    torch.testing.assert_close(flops[True], flops[False])


def test_a_language_model_selector_encoder_costs_its_exact_prefill(setup):
    tokenizer, engine, _ = setup
    lengths = torch.tensor([[5, 9], [7, 7]])
    cheap = make_plugin(engine, tokenizer).selector_flops(lengths)
    plugin = make_plugin(engine, tokenizer, selector_encoder="language_model")
    zeros = [0.0] * plugin.llm_shape.num_layers
    prefill = torch.tensor([[llm_prefill_flops(plugin.llm_shape, float(n), zeros, "exact") for n in row]
                            for row in lengths.tolist()], dtype=torch.float64).sum(1)
    torch.testing.assert_close(plugin.selector_flops(lengths).double(), cheap.double() + prefill)


def test_the_dpo_reference_reads_its_own_frozen_copy_of_the_grid_positions(setup):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, objective="dpo")
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    before = plugin.caption_visual(selection, reference=True)
    with torch.no_grad():
        plugin.discarded_positions.weight += 1.0  # a training step moves the trained table only
    torch.testing.assert_close(plugin.caption_visual(selection, reference=True), before)
    torch.testing.assert_close(plugin.caption_visual(selection), before + 1.0)


def test_accm_shows_visual_tokens_the_dataset_hid(setup):
    """An augmentation may hide image tokens (mask 0): the teacher-forced sequences ACCM scores show them all."""
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    image = batch["input_ids"] == plugin.image_token_id
    hidden = batch["attention_mask"].clone()
    hidden[image.cumsum(1) == 3] = 0  # the third image token of every sample
    candidates = hand_candidates(plugin.eos_token_id)
    two = {**batch, "input_ids": batch["input_ids"][:2], "attention_mask": hidden[:2], "labels": batch["labels"][:2]}
    spliced = plugin.spliced_teacher_forced(two, candidates)
    shown = spliced.attention_mask[spliced.input_ids == plugin.image_token_id]
    assert shown.numel() == 4 * 16 and (shown == 1).all()


def test_the_selector_reads_the_question_without_its_suffix_and_the_caption_without_eos(setup):
    tokenizer, engine, _ = setup
    plugin = make_plugin(engine, tokenizer, question_suffixes=["at 1 2 ?"])
    seen = []
    encoder = plugin.text_encoder
    plugin.text_encoder = lambda ids, mask: seen.extend(r[m.bool()].tolist() for r, m in zip(ids, mask)) or encoder(
        ids, mask)
    candidates = hand_candidates(plugin.eos_token_id)
    batch = {"questions": ["what color is the object at 1 2 ?", "is it red ?"]}
    scores, lengths = plugin.selector_scores(batch, candidates)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    heads = [ids("what what color is the object additional information :"), ids("what is it red ? additional "
                                                                              "information :")]
    captions = [[5, 6], [7], [8], [9, 10]]
    assert seen == [heads[i // 2] + caption for i, caption in enumerate(captions)]
    assert scores.shape == (2, 2) and lengths.tolist() == [[len(heads[0]) + 2, len(heads[0]) + 1],
                                                           [len(heads[1]) + 1, len(heads[1]) + 2]]


def test_candidate_kl_shows_the_visual_tokens_the_dataset_hid(setup, monkeypatch):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    image = batch["input_ids"] == plugin.image_token_id
    hidden = batch["attention_mask"].clone()
    hidden[image.cumsum(1) == 3] = 0
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    masks = []
    forward = engine.forward
    monkeypatch.setattr(engine, "forward", lambda ids, mask, *a, **k: masks.append(mask[ids == plugin.image_token_id])
                        or forward(ids, mask, *a, **k))
    candidates = plugin.caption_candidates(batch, selection)
    plugin.candidate_kl(engine, {**batch, "attention_mask": hidden}, selection, candidates, RATIO)
    assert len(masks) == 3 and all((m == 1).all() for m in masks)


def test_describe_prompts_are_left_padded(setup):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    ids, mask = plugin.describe_prompts(batch, [0, 2])
    lengths = mask.sum(1).tolist()
    assert lengths[0] != lengths[1] and (mask[:, 1:] >= mask[:, :-1]).all()  # real tokens last
    assert (ids[mask == 0] == plugin.pad_token_id).all()


def test_the_warm_start_loss_is_the_mean_over_real_target_tokens(setup, monkeypatch):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, caption_weight=0.5)
    eos = plugin.eos_token_id
    targets = torch.tensor([[9, 10, eos], [11, eos, 0], [eos, 0, 0]])
    mask = (torch.arange(3) < torch.tensor([[3], [2], [1]])).long()
    monkeypatch.setattr(plugin, "warm_start_captions", lambda *a: (targets, mask))
    losses = plugin.training_losses(engine, batch, 0.0)
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    ids, ids_mask = plugin.instructions(batch["questions"], selection.features.device)
    nll = plugin.caption_model(ids, ids_mask, plugin.caption_visual(selection), selection.discarded_mask, targets, mask)
    expected = (nll * torch.tensor([3.0, 2.0, 1.0])).sum() / 6
    torch.testing.assert_close(losses["caption_warmup"], expected)
    torch.testing.assert_close(losses["loss"], 0.5 * expected)


def test_stage_two_weights_its_terms_and_logs_the_ranking(setup, monkeypatch):
    """KLs by hand: best candidates [1, 2, 0]; the selector's argmax [1, 0, 0] is right for 2 of 3 samples."""
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, caption_weight=0.5, selector_weight=2.0)
    kl = torch.tensor([[0.3, 0.1, 0.2], [0.5, 0.4, 0.1], [0.2, 0.3, 0.4]])
    scores = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 1.0], [3.0, 1.0, 2.0]], requires_grad=True)
    monkeypatch.setattr(plugin, "candidate_kl", lambda *a: {"kl": kl, "kl_no_caption": torch.tensor([1.0, 2, 3])})
    monkeypatch.setattr(plugin, "selector_scores", lambda *a: (scores, None))
    losses = plugin.training_losses(engine, batch, 0.9)
    torch.testing.assert_close(losses["loss"], 0.5 * losses["caption"] + 2.0 * losses["selector"])
    assert losses["selector_accuracy"].item() == pytest.approx(2 / 3)
    assert losses["kl_best"].item() == pytest.approx(0.4 / 3)
    assert losses["kl_mean"].item() == pytest.approx(kl.mean().item())
    assert losses["kl_margin"].item() == pytest.approx((0.1 + (1 / 3 - 0.1) + 0.1) / 3)
    assert losses["kl_no_caption"].item() == 2.0


def test_sampling_and_beam_search_cost_the_same_per_fed_row(setup):
    """Two beams or two sampled candidates fed for the same steps cost the same (rows = beams, or candidates)."""
    tokenizer, engine, batch = setup
    selection = make_plugin(engine, tokenizer).select_visual_tokens(engine, batch, RATIO)
    candidates = hand_candidates(2)
    candidates.prefix_lengths, candidates.decode_tokens = torch.tensor([12, 9, 10]), torch.tensor([6, 4, 2])
    candidates.token_ids, candidates.lengths = candidates.token_ids[[0, 1, 1]], candidates.lengths[[0, 1, 1]]
    beam = make_plugin(engine, tokenizer, num_candidates=2, num_beams=2).caption_flops(candidates, selection)
    sample = make_plugin(engine, tokenizer, num_candidates=2, num_beams=3, strategy="sample")
    torch.testing.assert_close(sample.caption_flops(candidates, selection), beam)


def test_the_dpo_reference_is_copied_from_the_warm_started_plugin_at_the_stage_two_start(setup):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, objective="dpo")
    with torch.no_grad():  # what stage 1 trained
        plugin.discarded_positions.weight += 0.5
        plugin.caption_model.mapper.queries += 0.5
    losses = plugin.training_losses(engine, batch, 0.9)
    assert torch.isfinite(losses["dpo"]) and bool(plugin.reference_ready)
    assert torch.equal(plugin.reference_discarded_positions.weight, plugin.discarded_positions.weight)
    assert torch.equal(plugin.reference_caption_model.mapper.queries, plugin.caption_model.mapper.queries)


def test_decoder_rows_without_a_token_are_never_generated(setup, tmp_path):
    """A pretrained decoder with 2 embedding rows more than its tokenizer has tokens: those ids are suppressed, as
    are its special tokens other than EOS."""
    tokenizer, engine, _ = setup
    path = save_tiny_gpt2(tmp_path / "gpt2", missing_rows=-2)
    plugin = make_pretrained_plugin(engine, tokenizer, caption_decoder_path=path)
    size = len(plugin.caption_tokenizer)
    assert plugin.caption_model.vocab_size == size + 2
    special = set(plugin.caption_tokenizer.all_special_ids) - {plugin.caption_eos_token_id}
    assert set(plugin.caption_suppressed_token_ids) == special | {size, size + 1}


def test_the_dpo_term_weights_each_sample_by_its_kl_margin(setup, monkeypatch):
    """Chosen = lowest KL, rejected = highest; sample weights = KL margins, mean - min (0.1, 0, 1/6): the middle
    sample, whose candidates are all equally good, does not count."""
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, objective="dpo", dpo_beta=0.5)
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    candidates = plugin.caption_candidates(batch, selection)
    kl = torch.tensor([[0.3, 0.1, 0.2], [0.4, 0.4, 0.4], [0.1, 0.5, 0.2]])
    monkeypatch.setattr(plugin, "caption_candidates", lambda *a: candidates)
    monkeypatch.setattr(plugin, "candidate_kl", lambda *a: {"kl": kl, "kl_no_caption": torch.zeros(3)})
    plugin.training_losses(engine, batch, 0.9)  # copies the reference
    with torch.no_grad():
        plugin.caption_model.mapper.queries += 0.3
        plugin.caption_model.decoder.lm_head.weight[:, :4] += 0.2
    losses = plugin.training_losses(engine, batch, 0.9)
    ids, mask = plugin.instructions(batch["questions"], selection.features.device)
    caption_mask = torch.arange(candidates.token_ids.shape[2]) < candidates.lengths[..., None]
    with torch.no_grad():
        logp = {name: model.sequence_logprob(ids, mask, plugin.caption_visual(selection, reference=reference),
                                             selection.discarded_mask, candidates.token_ids, caption_mask)
                for name, model, reference in (("policy", plugin.caption_model, False),
                                               ("reference", plugin.reference_caption_model, True))}
    rows = torch.arange(3)
    chosen, rejected = torch.tensor([1, 0, 0]), torch.tensor([0, 0, 1])
    gain = {name: value[rows, chosen] - value[rows, rejected] for name, value in logp.items()}
    per_sample = -torch.nn.functional.logsigmoid(0.5 * (gain["policy"] - gain["reference"]))
    weights = torch.tensor([0.1, 0.0, 1 / 6])
    assert not torch.allclose(per_sample[0], per_sample[2])
    torch.testing.assert_close(losses["dpo"], (weights * per_sample).sum() / weights.sum())


def test_captions_never_contain_the_image_token_or_bos(setup):
    """The caption model is pushed toward the image token and BOS; they are suppressed in generation."""
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer)
    banned = torch.tensor([plugin.image_token_id, tokenizer.bos_token_id])
    vocab = plugin.caption_model.vocab_size
    boost = 30.0 * torch.isin(torch.arange(vocab), banned)
    handle = plugin.caption_model.decoder.lm_head.register_forward_hook(lambda module, args, out: out + boost)
    candidates = plugin.caption_candidates(batch, plugin.select_visual_tokens(engine, batch, RATIO))
    handle.remove()
    assert not torch.isin(candidates.token_ids, banned).any()


def test_lockstep_warm_start_generates_the_full_length_and_still_cuts_at_eos(setup, monkeypatch):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, max_caption_tokens=4)
    plugin.lockstep = True
    red, eos = tokenizer.convert_tokens_to_ids("red"), plugin.eos_token_id
    seen = []

    def generate(ids, mask, pixels, **kwargs):
        seen.append(kwargs["eos_token_id"])
        return torch.tensor([[red, eos, red, red]] * len(ids)), None

    monkeypatch.setattr(engine, "generate", generate)
    targets, mask = plugin.warm_start_captions(engine, batch, plugin.select_visual_tokens(engine, batch, RATIO))
    assert seen == [None] and targets.tolist() == [[red, eos]] * 3 and mask.tolist() == [[1, 1]] * 3
