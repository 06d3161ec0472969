"""The synthetic benchmark: determinism, disjoint splits, closed vocabulary, batches."""

import pytest
import torch

from datamodules.synthetic import SyntheticVQADataModule
from datamodules.synthetic_vqa import (
    ANSWER_VOCABULARY,
    FAMILIES,
    NUMBER_WORDS,
    SyntheticVQAConfig,
    generate_samples,
    render,
    vocabulary,
)
from lvlm_prune.modeling.tokenizer import build_processor, build_word_tokenizer


def solve(scene, question: str) -> tuple[str, set[tuple[int, int]]]:
    """The answer and the cells of the objects it depends on, worked out from the question's words alone (written
    apart from the generator, so that a wrong answer, direction or evidence list there fails the tests below)."""
    words = question.split()
    objects = {(o.row, o.col): o for o in scene.objects}

    def matching(*values):
        found = [o for o in scene.objects if all(v in (o.color, o.shape, o.size) for v in values)]
        return found

    if question == "describe the image .":
        return scene.description(), set(objects)
    if question.startswith("describe the objects that matter for :"):
        _, cells = solve(scene, question.split(":", 1)[1].strip())
        return scene.description([objects[c] for c in cells]), cells
    if words[:3] == ["what", "is", "the"] and words[4:6] == ["of", "the"]:
        asked = words[3]
        if words[6:9] == ["object", "at", "row"]:  # ... of the object at row R column C ?
            cell = (int(words[9]) - 1, int(words[11]) - 1)
            return getattr(objects[cell], asked), {cell}
        if words[6] == "object" and words[7] == "directly":  # ... of the object directly <d> the <color> <shape> ?
            offset = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}[words[8]]
            (reference,) = matching(*words[-3:-1])
            cell = (reference.row + offset[0], reference.col + offset[1])
            return getattr(objects[cell], asked), {(reference.row, reference.col), cell}
        (target,) = matching(*[w for w in words[6:-1] if w != "object"])  # ... of the <reference> ?
        return getattr(target, asked), {(target.row, target.col)}
    if words[:3] == ["is", "there", "a"]:
        found = matching(words[3], words[4])
        return ("yes" if found else "no"), {(o.row, o.col) for o in found}
    if words[:2] == ["how", "many"]:
        found = matching(words[2])
        return NUMBER_WORDS[len(found)], {(o.row, o.col) for o in found}
    if words[:2] == ["do", "the"]:  # do the <c1> object and the <c2> object have the same <attr> ?
        (a,), (b,) = matching(words[2]), matching(words[6])
        same = getattr(a, words[-2]) == getattr(b, words[-2])
        return ("yes" if same else "no"), {(a.row, a.col), (b.row, b.col)}
    raise AssertionError(f"unparsed question {question!r}")


def test_every_answer_and_its_evidence_follow_from_the_scene():
    for split, config in (("test", SyntheticVQAConfig()), ("train", SyntheticVQAConfig(train_min_objects=1))):
        for sample in generate_samples(config, split, 600):
            answer, cells = solve(sample.scene, sample.question)
            assert answer == sample.answer, sample.question
            assert cells == {(o.row, o.col) for o in sample.relevant}, sample.question
            assert not cells & set(sample.scene.distractors)


def test_generation_is_deterministic():
    config = SyntheticVQAConfig(seed=3)
    a = generate_samples(config, "train", 50)
    b = generate_samples(config, "train", 50)
    assert [(s.question, s.answer, s.scene.key()) for s in a] == [(s.question, s.answer, s.scene.key()) for s in b]
    assert list(render(a[0].scene).getdata()) == list(render(b[0].scene).getdata())
    other = generate_samples(SyntheticVQAConfig(seed=4), "train", 50)
    assert [s.scene.key() for s in a] != [s.scene.key() for s in other]


def test_answers_are_closed_and_every_family_appears():
    samples = generate_samples(SyntheticVQAConfig(), "test", 120)
    assert {s.family for s in samples} == set(FAMILIES)
    assert {s.answer for s in samples} <= set(ANSWER_VOCABULARY)
    assert all(8 <= len(s.scene.objects) <= 12 for s in samples)


def test_training_curriculum_only_touches_the_training_split():
    config = SyntheticVQAConfig(train_min_objects=1)
    assert min(len(s.scene.objects) for s in generate_samples(config, "train", 200)) < 8
    assert min(len(s.scene.objects) for s in generate_samples(config, "test", 100)) >= 8


def test_every_word_is_in_the_tokenizer():
    data = SyntheticVQADataModule(num_train=64, num_val=8, num_test=8, context_fraction=0.5, describe_fraction=0.5,
                                  turns_per_image=3)
    tokenizer = data.processor.tokenizer
    batch = next(iter(data.train_dataloader()))
    assert (batch["input_ids"] != tokenizer.unk_token_id).all()
    assert set(vocabulary(data.config)) <= set(tokenizer.get_vocab())


def test_batch_layouts():
    data = SyntheticVQADataModule(num_train=16, num_val=8, num_test=8, batch_size=4, eval_batch_size=4)
    batch = next(iter(data.val_dataloader()))
    tokenizer = data.processor.tokenizer
    n_visual = data.config.grid**2
    assert ((batch["prompt_input_ids"] == data.image_token_id).sum(1) == n_visual).all()
    assert (batch["prompt_attention_mask"][:, -1] == 1).all(), "generation prompts are left-padded"
    for i in range(4):
        answer = tokenizer.decode(batch["labels"][i][batch["labels"][i] >= 0], skip_special_tokens=True)
        assert answer == batch["answers"][i]
        prompt = tokenizer.decode(batch["prompt_input_ids"][i], skip_special_tokens=True)
        assert prompt.endswith("ASSISTANT :")
        # the prompt is BOS, the image and the question in the template, nothing else (and no answer)
        real = batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()].tolist()
        assert real[0] == tokenizer.bos_token_id and real.count(data.image_token_id) == n_visual
        words = [t for t in real[1:] if t != data.image_token_id]
        assert words == tokenizer(f"USER: {batch['questions'][i]} ASSISTANT:", add_special_tokens=False)["input_ids"]


def test_text_only_evaluation_hides_every_visual_token():
    data = SyntheticVQADataModule(num_test=8, eval_batch_size=8, eval_context="relevant", eval_hidden_visual_fraction=1.0)
    batch = next(iter(data.test_dataloader()))
    visual = batch["prompt_input_ids"] == data.image_token_id
    assert (batch["prompt_attention_mask"][visual] == 0).all()
    assert all(c.startswith("additional information :") for c in batch["contexts"])
    # positions are those of the unhidden prompt: hiding does not renumber
    assert torch.equal(batch["prompt_position_ids"][:, -1], (batch["prompt_input_ids"] != 0).sum(1) - 1)


def test_token_drop_hides_only_tokens_no_answer_needs():
    data = SyntheticVQADataModule(num_train=96, batch_size=32, token_drop_fraction=1.0, turns_per_image=3,
                                  describe_fraction=0.5, train_min_objects=1)
    samples = {s.question_id: s for s in data.samples("train")}
    dropped = several_turns = 0
    for batch in data.train_dataloader():
        visual = batch["input_ids"] == data.image_token_id
        for i, question_id in enumerate(batch["question_ids"]):
            conversation = data._train_conversation(samples[question_id])
            visible = batch["attention_mask"][i][visual[i]] > 0  # (64,) in the image's token order
            questions = [conversation["question"]] + [q for q, _ in conversation["extra_turns"]]
            scene = samples[question_id].scene
            needed = {r * data.config.grid + c for q in questions for r, c in solve(scene, q)[1]}
            assert needed <= set(conversation["protected_visual"])
            several_turns += len(questions) > 1
            assert visible[list(conversation["protected_visual"])].all()
            hidden = int((~visible).sum())
            others = visible.numel() - len(conversation["protected_visual"])
            assert round(0.5 * others) <= hidden <= others
            dropped += hidden > 0
    assert dropped == 96 and several_turns > 48
    # the generation prompts hide the same tokens as the teacher-forced layout
    prompt_visual = batch["prompt_input_ids"] == data.image_token_id
    assert torch.equal(batch["prompt_attention_mask"][prompt_visual], batch["attention_mask"][visual])


def test_token_drop_is_off_by_default_and_leaves_conversations_unchanged():
    settings = dict(num_train=64, turns_per_image=3, describe_fraction=0.5, context_fraction=0.2)
    plain = SyntheticVQADataModule(**settings)
    assert all(plain._train_conversation(s)["protected_visual"] == () for s in plain.samples("train"))
    dropping = SyntheticVQADataModule(**settings, token_drop_fraction=0.5)
    for sample in plain.samples("train"):
        a, b = plain._train_conversation(sample), dropping._train_conversation(sample)
        assert (a["question"], a["extra_turns"], a["context"]) == (b["question"], b["extra_turns"], b["context"])


def test_a_later_training_stage_draws_fresh_training_scenes_and_the_same_eval_splits():
    first = SyntheticVQADataModule(num_train=40, num_val=8, num_test=8)
    later = SyntheticVQADataModule(num_train=20, num_val=8, num_test=8, train_skip=30)
    assert [s.question_id for s in later.samples("train")] == [f"train-{i:06d}" for i in range(30, 50)]
    overlap = SyntheticVQADataModule(num_train=50).samples("train")[30:40]
    assert [s.question for s in later.samples("train")[:10]] == [s.question for s in overlap]
    for split in ("val", "test"):
        assert [s.question_id + s.question for s in later.samples(split)] == [
            s.question_id + s.question for s in first.samples(split)]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown question families"):
        SyntheticVQAConfig(families=("colour",))
    with pytest.raises(ValueError, match="eval_context"):
        SyntheticVQADataModule(eval_context="all")
    with pytest.raises(ValueError, match="context_fraction"):
        SyntheticVQADataModule(context_fraction=1.5)
    with pytest.raises(ValueError, match="token_drop_fraction"):
        SyntheticVQADataModule(token_drop_fraction=-0.1)
    with pytest.raises(ValueError, match="eval_visual_tokens='background'"):
        SyntheticVQADataModule(eval_visual_tokens="background")
    with pytest.raises(ValueError, match="leave data.eval_hidden_visual_fraction at 0"):
        SyntheticVQADataModule(eval_visual_tokens="objects", eval_hidden_visual_fraction=0.5)
    with pytest.raises(ValueError, match="train_skip"):
        SyntheticVQADataModule(train_skip=-1)
    for name in ("batch_size", "eval_batch_size", "num_train", "num_val", "num_test"):
        with pytest.raises(ValueError, match=rf"data.{name}=0 must be at least 1"):
            SyntheticVQADataModule(**{name: 0})
    with pytest.raises(ValueError, match="empty question"):
        from lvlm_prune.modeling.prompt import TINY_DEFAULT

        TINY_DEFAULT.prompt("   ")
    with pytest.raises(ValueError, match=r"min_objects=9, max_objects=8: need 1 <= min_objects <= max_objects"):
        SyntheticVQAConfig(min_objects=9, max_objects=8)
    with pytest.raises(ValueError, match=r"max_objects=13 objects and up to 4 distractors do not fit a 4x4 grid"):
        SyntheticVQAConfig(grid=4, min_objects=1, max_objects=13)
    with pytest.raises(ValueError, match="data.template='vicuna_v1': the tokenizer reads 19 of its words as <unk>"):
        SyntheticVQADataModule(template="vicuna_v1")


@pytest.mark.parametrize("cell_size, message", [(2, "too small to draw the shapes"),
                                                (7, "draws a small circle and a small cross alike")])
def test_cell_sizes_that_draw_two_shapes_alike_are_refused(cell_size, message):
    with pytest.raises(ValueError, match=rf"cell_size={cell_size} pixels (is )?{message}"):
        SyntheticVQAConfig(cell_size=cell_size)
    SyntheticVQAConfig(cell_size=6)


def test_a_saved_processor_must_fit_the_grid_and_its_words(tmp_path):
    data = SyntheticVQADataModule(num_train=8)
    data.processor.save_pretrained(tmp_path)
    SyntheticVQADataModule(num_train=8, processor_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"processor_path=.*turns the 48-pixel images of data.grid=6 x data.cell_size=8 into \(64, 64\)"):
        SyntheticVQADataModule(num_train=8, grid=6, processor_path=str(tmp_path))
    older = [w for w in vocabulary(data.config) if w != "directly"]  # a base from before relation questions said it
    build_processor(build_word_tokenizer(older), 64, patch_size=8).save_pretrained(tmp_path / "older")
    with pytest.raises(ValueError, match=r"its tokenizer lacks the words \['directly'\]"):
        SyntheticVQADataModule(num_train=8, processor_path=str(tmp_path / "older"))


def test_training_batches_group_examples_of_similar_length():
    settings = dict(num_train=256, batch_size=16, turns_per_image=3, describe_fraction=0.5, context_fraction=0.2,
                    train_min_objects=1)
    grouped = SyntheticVQADataModule(**settings, group_by_length=True)
    shuffled = SyntheticVQADataModule(**settings)
    lengths = grouped.train_text_lengths()
    first = [batch["question_ids"] for batch in grouped.train_dataloader()]
    again = SyntheticVQADataModule(**settings, group_by_length=True)
    assert first == [batch["question_ids"] for batch in again.train_dataloader()]
    assert sorted(q for ids in first for q in ids) == sorted(s.question_id for s in grouped.samples("train"))

    index = {s.question_id: i for i, s in enumerate(grouped.samples("train"))}

    def spread(loader) -> float:  # mean (longest - shortest) text length within a batch
        spans = [max(lengths[index[q]] for q in b["question_ids"]) - min(lengths[index[q]] for q in b["question_ids"])
                 for b in loader]
        return sum(spans) / len(spans)

    assert spread(grouped.train_dataloader()) < 0.5 * spread(shuffled.train_dataloader())
    # the length follows the text the collator tokenizes (the word-level tokenizer: one token per word)
    batch = next(iter(shuffled.train_dataloader()))
    text_tokens = (batch["input_ids"] != grouped.processor.tokenizer.pad_token_id).sum(1).float()
    counted = torch.tensor([float(lengths[index[q]]) for q in batch["question_ids"]])
    assert torch.corrcoef(torch.stack([text_tokens, counted]))[0, 1] > 0.95
    # with text-only examples among them, the image's tokens count too (a text-only example is the shorter one)
    mixed = SyntheticVQADataModule(**dict(settings, batch_size=64), text_only_fraction=0.3)
    mixed_lengths = dict(zip((s.question_id for s in mixed.samples("train")), mixed.train_text_lengths()))
    batch = next(iter(mixed.train_dataloader()))
    assert batch["pixel_values"].shape[0] < 64
    tokens = (batch["input_ids"] != mixed.processor.tokenizer.pad_token_id).sum(1).float()
    counted = torch.tensor([float(mixed_lengths[q]) for q in batch["question_ids"]])
    assert torch.corrcoef(torch.stack([tokens, counted]))[0, 1] > 0.95


@pytest.mark.parametrize("shown", ["objects", "relevant"])
def test_evaluation_can_show_only_the_object_tokens(shown):
    data = SyntheticVQADataModule(num_test=16, eval_batch_size=16, eval_visual_tokens=shown)
    batch = next(iter(data.test_dataloader()))
    samples = {s.question_id: s for s in data.samples("test")}
    visual = batch["prompt_input_ids"] == data.image_token_id
    for i, question_id in enumerate(batch["question_ids"]):
        sample = samples[question_id]
        objects = sample.scene.objects if shown == "objects" else sample.relevant
        visible = (batch["prompt_attention_mask"][i][visual[i]] > 0).nonzero().flatten().tolist()
        assert visible == sorted(o.row * data.config.grid + o.col for o in objects)


def test_token_drop_needs_one_visual_token_per_cell(tmp_path):
    tokenizer = SyntheticVQADataModule(num_train=8).processor.tokenizer
    build_processor(tokenizer, 128, patch_size=8).save_pretrained(tmp_path)  # 128-pixel images, 8-pixel patches
    with pytest.raises(ValueError, match="token_drop_fraction=0.3 needs one visual token per grid cell"):
        SyntheticVQADataModule(processor_path=str(tmp_path), cell_size=16, token_drop_fraction=0.3)


def test_protected_tokens_outside_the_image_are_named():
    data = SyntheticVQADataModule(num_train=8)
    sample = data.samples("train")[0]
    example = data._train_example(sample, 0)
    example.hidden_visual_fraction, example.protected_visual = 0.5, (3, 64)
    with pytest.raises(ValueError, match=rf"sample {sample.question_id}: protected visual tokens \[64\]"):
        data.collator([example])


def test_token_drop_hides_the_nearest_count_per_question_and_keeps_the_positions():
    data = SyntheticVQADataModule(num_train=8)
    samples = data.samples("train")[:3]
    examples = [data._train_example(sample, 0) for sample in samples]
    for example in examples:
        example.hidden_visual_fraction, example.protected_visual = 0.4, (0, 9)  # 0.4 x 62 = 24.8 -> 25 hidden

    def hidden(batch, row):
        visual = batch["input_ids"][row] == data.image_token_id
        return (batch["attention_mask"][row][visual] == 0).nonzero().flatten().tolist()

    batch = data.collator(examples)
    alone = data.collator(examples[2:])  # another batch, another row: the same tokens hidden
    assert hidden(batch, 2) == hidden(alone, 0)
    for row in range(3):
        assert len(hidden(batch, row)) == 25 and not {0, 9} & set(hidden(batch, row))
        # hidden tokens keep their place: positions count every real token, as pruning keeps RoPE positions
        real = int((batch["input_ids"][row] != data.processor.tokenizer.pad_token_id).sum())
        assert batch["position_ids"][row, :real].tolist() == list(range(real))
    assert hidden(batch, 0) != hidden(batch, 1)  # drawn per question id


def test_a_batch_larger_than_the_training_set_is_an_error():
    data = SyntheticVQADataModule(num_train=4, num_val=2, num_test=2, batch_size=8, eval_batch_size=8)
    with pytest.raises(ValueError, match=r"data.batch_size=8 is more than data.num_train=4 training samples"):
        data.train_dataloader()
    assert len(data.val_dataloader()) == 1  # evaluation keeps its short last batch


def test_a_scene_with_fewer_distinct_questions_than_turns_keeps_the_ones_it_has():
    """One object and attribute-by-reference questions only: two distinct questions exist (it used to loop forever
    looking for a third)."""
    dm = SyntheticVQADataModule(num_train=64, num_val=8, num_test=8, families=("query_ref",), turns_per_image=3,
                                min_objects=1, max_objects=1)
    conversations = [dm._train_conversation(sample) for sample in dm.samples("train")]
    questions = [[c["question"], *(q for q, _ in c["extra_turns"])] for c in conversations]
    assert all(len(set(q)) == len(q) == 2 for q in questions)


def test_an_example_with_a_context_asks_its_own_question_alone():
    """The description turn is drawn before the context: when it came first, the example used to keep only it (the
    whole scene to describe with the image hidden and a context of a few objects) and drop the question."""
    dm = SyntheticVQADataModule(num_train=200, num_val=8, num_test=8, context_fraction=1.0, describe_fraction=1.0,
                                turns_per_image=3, train_min_objects=1)
    for sample in dm.samples("train"):
        conversation = dm._train_conversation(sample)
        assert (conversation["question"], conversation["answer"]) == (sample.question, sample.answer)
        assert conversation["extra_turns"] == () and conversation["category"] == sample.family
        assert conversation["context"].startswith("additional information :")


def test_relation_questions_name_the_neighbouring_cell():
    samples = [s for s in generate_samples(SyntheticVQAConfig(families=("relate",)), "test", 40)]
    for sample in samples:
        reference, target = sample.relevant
        assert " directly " in sample.question
        assert abs(reference.row - target.row) + abs(reference.col - target.col) == 1


def test_families_no_scene_can_ask_are_named_instead_of_looping():
    with pytest.raises(ValueError, match="families is empty"):
        SyntheticVQAConfig(families=())
    config = SyntheticVQAConfig(families=("compare",), min_objects=1, max_objects=1)  # needs two objects
    with pytest.raises(ValueError, match=r"no train sample of family 'compare' in 20000 scene draws \(of any split\) of 1-1 objects"):
        generate_samples(config, "train", 1)
