"""The synthetic benchmark in detail: phrases and descriptions, rendered pixels, scene sizes, split shares, question
families at their edges, settings at their bounds, and what the data module builds from each sample."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

import datamodules.synthetic_vqa as synthetic_vqa
from datamodules.synthetic import SyntheticVQADataModule
from datamodules.synthetic_vqa import (
    COLORS,
    CONTEXT_PREFIX,
    DESCRIBE_PREFIX,
    DESCRIBE_SCENE,
    FAMILIES,
    Scene,
    SceneObject,
    SyntheticVQAConfig,
    generate_samples,
    make_question,
    render,
    split_of,
    vocabulary,
)
from lvlm_prune.modeling.tokenizer import build_processor
from test_synthetic import solve

SMALL = dict(grid=4, cell_size=8, min_objects=2, max_objects=4)
BACKGROUND = (20, 20, 24)


def test_objects_are_phrased_with_one_based_cells_and_described_row_by_row():
    """'red large square at 2 3'; descriptions in row-major order; no object: 'nothing'."""
    objects = [SceneObject("red", "square", "large", 1, 2), SceneObject("blue", "circle", "small", 0, 3),
               SceneObject("green", "cross", "small", 1, 0)]
    scene = Scene(objects, [], 4, 0)
    assert scene.description() == "blue small circle at 1 4 ; green small cross at 2 1 ; red large square at 2 3"
    assert scene.description(objects[:1]) == "red large square at 2 3"
    assert scene.description([]) == "nothing"  # what the text of an answer without objects ('no') says


def test_a_scene_renders_each_object_inside_its_own_cell_and_specks_at_cell_centres():
    """Exact pixels: a large object fills its cell only, a small one keeps a margin, specks are 2x2 grey."""
    scene = Scene([SceneObject("red", "square", "large", 1, 2), SceneObject("blue", "square", "small", 3, 3)],
                  [(0, 3)], 4, 0)
    image = render(scene, cell_size=8)
    assert image.size == (32, 32)
    red = [image.getpixel((x, y)) for x in range(16, 24) for y in range(8, 16)]
    assert set(red) == {COLORS["red"]}  # a large square fills its cell
    for outside in ((15, 8), (24, 8), (16, 7), (16, 16)):  # and not one pixel beyond
        assert image.getpixel(outside) == BACKGROUND
    assert image.getpixel((24, 24)) == BACKGROUND and image.getpixel((25, 25)) == COLORS["blue"]  # small: a margin
    grey = {(x, y) for x in range(32) for y in range(32) if image.getpixel((x, y)) == (110, 110, 110)}
    assert grey == {(27, 3), (28, 3), (27, 4), (28, 4)}  # the speck at row 1, column 4
    assert image.getpixel((0, 0)) == BACKGROUND


def test_scenes_take_every_size_in_range_and_up_to_four_specks_on_free_cells():
    """8..12 objects (both ends drawn), 0..4 specks, never on an object's cell."""
    sizes, specks = set(), set()
    for sample in generate_samples(SyntheticVQAConfig(), "train", 200):
        cells = {(o.row, o.col) for o in sample.scene.objects}
        sizes.add(len(cells))
        specks.add(len(sample.scene.distractors))
        assert not cells & set(sample.scene.distractors)
    assert sizes == set(range(8, 13)) and specks == set(range(5))


def test_about_eight_scenes_in_ten_are_for_training_one_for_validation_one_for_testing():
    """The content hash splits all 1024 one-object 4x4 scenes about 80/10/10."""
    scenes = [Scene([SceneObject(color, shape, size, row, col)], [], 4, 0) for color in COLORS
              for shape in synthetic_vqa.SHAPES for size in synthetic_vqa.SIZES for row in range(4) for col in range(4)]
    splits = [split_of(scene) for scene in scenes]
    shares = {split: splits.count(split) / len(scenes) for split in ("train", "val", "test")}
    assert shares["train"] == pytest.approx(0.8, abs=0.04)
    assert shares["val"] == pytest.approx(0.1, abs=0.03) and shares["test"] == pytest.approx(0.1, abs=0.03)


def test_a_count_of_five_or_more_is_not_asked():
    """Counts have words up to four: a colour with five objects is not asked about."""
    reds = [SceneObject("red", "square", "small", 0, col) for col in range(4)]
    four, five = Scene(reds, [], 5, 0), Scene(reds + [SceneObject("red", "circle", "large", 1, 0)], [], 5, 0)
    answers = {made[1] for seed in range(40) if (made := make_question(four, "count", random.Random(seed)))}
    assert answers == {"four", "zero"}  # red asked, or a colour the scene lacks
    for seed in range(40):
        made = make_question(five, "count", random.Random(seed))
        assert made is None or (made[1] == "zero" and "red" not in made[0])


def test_an_object_named_without_its_shape_is_called_an_object():
    """'the red object' when the colour alone names it, 'the circle' when the shape does."""
    lone = Scene([SceneObject("red", "circle", "small", 0, 0)], [], 4, 0)  # its colour alone names it
    two_reds = Scene([SceneObject("red", "circle", "small", 0, 0), SceneObject("red", "square", "large", 2, 2)],
                     [], 4, 0)  # its shape alone names it
    questions = {make_question(scene, "query_ref", random.Random(seed))[0] for scene in (lone, two_reds)
                 for seed in range(20)}
    assert {q for q in questions if "red object" in q} == {"what is the shape of the red object ?",
                                                          "what is the size of the red object ?"}
    assert {q for q in questions if "red object" not in q} == {
        "what is the color of the circle ?", "what is the size of the circle ?",
        "what is the color of the square ?", "what is the size of the square ?"}


def test_about_three_in_five_existence_answers_are_yes():
    """Half the draws ask about an object of the scene: about 60 % 'yes' on the test split."""
    samples = generate_samples(SyntheticVQAConfig(families=("exist",)), "test", 300)
    assert sum(s.answer == "yes" for s in samples) / len(samples) == pytest.approx(0.6, abs=0.08)


def test_families_are_asked_in_turn():
    """Sample i asks family i mod len(families); ids count from 0."""
    families = ("count", "query_at", "exist")
    samples = generate_samples(SyntheticVQAConfig(families=families, **SMALL), "val", 9)
    assert [s.family for s in samples] == list(families) * 3
    assert [s.question_id for s in samples] == [f"val-{i:06d}" for i in range(9)]


def test_the_draw_limit_counts_failed_draws_since_the_last_sample(monkeypatch):
    """About 1 scene draw in 10 belongs to the test split: 40 samples take hundreds of draws, none 100 in a row."""
    monkeypatch.setattr(synthetic_vqa, "MAX_FAILED_DRAWS", 100)
    assert len(generate_samples(SyntheticVQAConfig(), "test", 40)) == 40


def test_scene_sizes_at_their_bounds():
    """min_objects >= 1; max_objects + 4 specks may fill the grid exactly; train_min_objects <= max_objects."""
    with pytest.raises(ValueError, match=r"min_objects=0, max_objects=4: need 1 <= min_objects <= max_objects"):
        SyntheticVQAConfig(grid=4, min_objects=0, max_objects=4)
    SyntheticVQAConfig(grid=4, min_objects=1, max_objects=12)  # 12 objects and 4 specks fill the 16 cells
    with pytest.raises(ValueError, match=r"train_min_objects=5 must be in \[1, max_objects=4\]"):
        SyntheticVQAConfig(grid=4, min_objects=2, max_objects=4, train_min_objects=5)


def test_every_word_the_benchmark_writes_is_in_its_vocabulary():
    """Row and column numbers up to the grid side and every generated word are in the vocabulary."""
    config = SyntheticVQAConfig(**SMALL, train_min_objects=1)
    words = set(vocabulary(config))
    assert {"1", "2", "3", "4"} <= words and "5" not in words
    for sample in generate_samples(config, "train", 300):
        text = " ".join([sample.question, sample.answer, sample.scene.description(), sample.relevant_description,
                         DESCRIBE_PREFIX, DESCRIBE_SCENE, CONTEXT_PREFIX])
        assert set(text.split()) <= words, sample.question


# --------------------------------------------------------------------------------------------- the data module


def module(**settings) -> SyntheticVQADataModule:
    return SyntheticVQADataModule(**{**SMALL, "num_train": 64, "num_val": 8, "num_test": 8, **settings})


def conversations(data):
    return [(sample, data._train_conversation(sample)) for sample in data.samples("train")]


def test_turns_per_image_below_one_is_refused():
    """turns_per_image=0 is named."""
    with pytest.raises(ValueError, match=r"data.turns_per_image=0 must be at least 1"):
        module(turns_per_image=0)


def test_a_context_describes_the_question_s_objects_or_the_scene_and_hides_at_least_half_the_image():
    """Context: the relevant objects or the whole scene; 50-100 % of the image hidden, sometimes all."""
    kinds, hidden = set(), set()
    for sample, conversation in conversations(module(context_fraction=1.0)):
        text = conversation["context"].removeprefix(f"{CONTEXT_PREFIX} ")
        assert text in (sample.relevant_description, sample.scene.description())
        kinds.add("relevant" if text == sample.relevant_description else "scene")
        assert 0.5 <= conversation["hidden_visual_fraction"] <= 1.0
        hidden.add(conversation["hidden_visual_fraction"] == 1.0)
    assert kinds == {"relevant", "scene"} and hidden == {True, False}


def test_a_description_turn_comes_first_or_after_the_question_and_is_its_own_category():
    """A description turn (scene or relevant objects) goes before or after the question; first, it is 'describe'."""
    first = later = 0
    for sample, conversation in conversations(module(describe_fraction=1.0)):
        turns = [(conversation["question"], conversation["answer"]), *conversation["extra_turns"]]
        assert len(turns) == 2 and sum(q == sample.question for q, _ in turns) == 1
        (question, answer), = [turn for turn in turns if turn[0] != sample.question]
        assert (question, answer) in ((DESCRIBE_SCENE, sample.scene.description()),
                                      (f"{DESCRIBE_PREFIX} {sample.question}", sample.relevant_description))
        described_first = conversation["question"] != sample.question
        assert conversation["category"] == ("describe" if described_first else sample.family)
        first, later = first + described_first, later + (not described_first)
    assert first > 10 and later > 10


def test_each_sample_draws_its_own_view():
    """The view is drawn per question id: a 0.5 fraction describes about half the samples."""
    described = sum(bool(c["extra_turns"]) or c["category"] == "describe"
                    for _, c in conversations(module(describe_fraction=0.5)))
    assert 16 <= described <= 48


def test_text_only_examples_carry_the_scene_as_text_and_no_image_nor_description_turn():
    """Text-only: the scene as context, no image, no description turn, no visual tokens in its length."""
    data = module(text_only_fraction=1.0, describe_fraction=1.0, turns_per_image=2)
    lengths = data.train_text_lengths()
    for (sample, conversation), length in zip(conversations(data), lengths):
        assert conversation["context"] == f"{CONTEXT_PREFIX} {sample.scene.description()}"
        assert conversation["category"] == sample.family and conversation["hidden_visual_fraction"] == 0.0
        assert not any(q.startswith("describe") for q, _ in conversation["extra_turns"])
        words = [conversation["question"], conversation["answer"], conversation["context"],
                 *(part for turn in conversation["extra_turns"] for part in turn)]
        assert length == len(" ".join(words).split())  # no visual tokens
    assert data._train_example(data.samples("train")[0], 0).image is None


def test_grounding_evidence_names_each_answer_s_cells_and_none_for_a_description():
    """Evidence per turn: the cells (row * grid + col) its answer depends on; () for a description."""
    data = module(grounding_evidence=True, describe_fraction=1.0, turns_per_image=2)
    for sample, conversation in conversations(data):
        questions = [conversation["question"], *(q for q, _ in conversation["extra_turns"])]
        assert len(conversation["evidence"]) == len(questions) == 3
        for question, evidence in zip(questions, conversation["evidence"]):
            if question.startswith("describe"):
                assert evidence == ()
            else:
                assert evidence == tuple(sorted(r * 4 + c for r, c in solve(sample.scene, question)[1]))


@pytest.mark.parametrize("mode", ["relevant", "scene"])
def test_an_evaluation_context_describes_what_it_is_set_to(mode):
    """eval_context 'relevant' gives the answer's objects, 'scene' the whole scene."""
    data = module(eval_context=mode)
    for sample in data.samples("test"):
        text = sample.relevant_description if mode == "relevant" else sample.scene.description()
        assert data._eval_example(sample, 0).context == f"{CONTEXT_PREFIX} {text}"


def test_evaluation_loaders_keep_the_split_order_and_predict_reads_the_test_split():
    """val/test/predict batches in id order (predict on test); training batches shuffled."""
    data = module(eval_batch_size=3)
    for loader, split in ((data.val_dataloader(), "val"), (data.test_dataloader(), "test"),
                          (data.predict_dataloader(), "test")):
        assert [q for batch in loader for q in batch["question_ids"]] == [f"{split}-{i:06d}" for i in range(8)]
    torch.manual_seed(0)
    order = [q for batch in data.train_dataloader() for q in batch["question_ids"]]
    assert sorted(order) == [f"train-{i:06d}" for i in range(64)] and order != sorted(order)


def test_training_batches_are_counted_per_process():
    """The batch check and the length groups count the samples and batches of all processes."""
    data = module(num_train=15, batch_size=8)
    data.trainer = SimpleNamespace(world_size=2)  # 8 samples a process, the last one padded
    assert len(data.train_dataloader()) == 1
    data = module(num_train=8, batch_size=8)  # exactly one batch
    assert len(data.train_dataloader()) == 1
    grouped = module(batch_size=4, group_by_length=True)
    grouped.trainer = SimpleNamespace(world_size=2)
    assert grouped.train_dataloader().sampler.group_size == 8  # a group is one step's batches over the processes


@pytest.mark.parametrize("setting", [{"grounding_evidence": True}, {"eval_visual_tokens": "objects"}])
def test_per_cell_settings_need_one_visual_token_per_cell(setting, tmp_path):
    """grounding_evidence and eval_visual_tokens need patch size = cell size, as token_drop does."""
    tokenizer = module().processor.tokenizer
    build_processor(tokenizer, 64, patch_size=8).save_pretrained(tmp_path)  # 64-pixel images, 8-pixel patches
    name = next(iter(setting))
    with pytest.raises(ValueError, match=rf"data.{name}=.* needs one visual token per grid cell"):
        SyntheticVQADataModule(processor_path=str(tmp_path), grid=4, cell_size=16, min_objects=2, max_objects=4,
                               **setting)


def test_the_categories_are_the_configured_families():
    """The model's metric categories are the configured families, in order."""
    assert module(families=("count", "exist")).categories == ["count", "exist"]
    assert module().categories == list(FAMILIES)


def test_a_config_without_text_only_examples_keeps_its_exact_data():
    """The text-only draw is made only when text-only examples are asked for, so the mix of a config without them
    stays what it was (recorded from the generator: C context, D description turn, B description turn with hidden
    tokens, T hidden tokens, - plain)."""
    data = module(num_train=32, describe_fraction=0.5, context_fraction=0.3, token_drop_fraction=0.5)
    kinds = ""
    for _, c in conversations(data):
        described = bool(c["extra_turns"]) or c["category"] == "describe"
        hidden = c["hidden_visual_fraction"] > 0
        kinds += "C" if c["context"] else "B" if described and hidden else "D" if described else "T" if hidden else "-"
    assert kinds == "CCCC-BCBCCDCDCBDCDB-CBC-C-BTTBCD"
