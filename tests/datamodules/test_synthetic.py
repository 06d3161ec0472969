"""The synthetic benchmark: determinism, disjoint splits, closed vocabulary, batches."""

import pytest
import torch

from datamodules.synthetic import SyntheticVQADataModule
from datamodules.synthetic_vqa import (
    ANSWER_VOCABULARY,
    FAMILIES,
    SyntheticVQAConfig,
    generate_samples,
    render,
    split_of,
    vocabulary,
)


def test_generation_is_deterministic():
    config = SyntheticVQAConfig(seed=3)
    a = generate_samples(config, "train", 50)
    b = generate_samples(config, "train", 50)
    assert [(s.question, s.answer, s.scene.key()) for s in a] == [(s.question, s.answer, s.scene.key()) for s in b]
    assert list(render(a[0].scene).getdata()) == list(render(b[0].scene).getdata())
    other = generate_samples(SyntheticVQAConfig(seed=4), "train", 50)
    assert [s.scene.key() for s in a] != [s.scene.key() for s in other]


def test_splits_are_disjoint_by_construction():
    config = SyntheticVQAConfig(train_min_objects=1)
    scenes = {split: {s.scene.key() for s in generate_samples(config, split, 300)} for split in ("train", "val", "test")}
    assert not scenes["train"] & scenes["val"] and not scenes["train"] & scenes["test"] and not scenes["val"] & scenes["test"]
    for split, keys in scenes.items():
        for sample in generate_samples(config, split, 20):
            assert split_of(sample.scene) == split


def test_answers_are_closed_and_every_family_appears():
    samples = generate_samples(SyntheticVQAConfig(), "test", 120)
    assert {s.family for s in samples} == set(FAMILIES)
    assert {s.answer for s in samples} <= set(ANSWER_VOCABULARY)
    assert all(4 <= len(s.scene.objects) <= 7 for s in samples)


def test_training_curriculum_only_touches_the_training_split():
    config = SyntheticVQAConfig(train_min_objects=1)
    assert min(len(s.scene.objects) for s in generate_samples(config, "train", 200)) < 4
    assert min(len(s.scene.objects) for s in generate_samples(config, "test", 100)) >= 4


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


def test_text_only_evaluation_hides_every_visual_token():
    data = SyntheticVQADataModule(num_test=8, eval_batch_size=8, eval_context="relevant", eval_hidden_visual_fraction=1.0)
    batch = next(iter(data.test_dataloader()))
    visual = batch["prompt_input_ids"] == data.image_token_id
    assert (batch["prompt_attention_mask"][visual] == 0).all()
    assert all(c.startswith("additional information :") for c in batch["contexts"])
    # positions are those of the unhidden prompt: hiding does not renumber
    assert torch.equal(batch["prompt_position_ids"][:, -1], (batch["prompt_input_ids"] != 0).sum(1) - 1)


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
    with pytest.raises(ValueError, match="train_skip"):
        SyntheticVQADataModule(train_skip=-1)
    with pytest.raises(ValueError, match="empty question"):
        from lvlm_prune.modeling.prompt import TINY_DEFAULT

        TINY_DEFAULT.prompt("   ")


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
