"""lvlm_prune.data piece by piece: the collator's length, evidence and hiding edge cases, packing rows (fit, width,
padding, grounding lookups, attention), the answer loss helpers, and the length-grouped sampler's order."""

import warnings

import pytest
import torch
from PIL import Image

from lvlm_prune.data import (IGNORE_INDEX, LengthGroupedSampler, VQACollator, VQAExample, additive_attention_mask,
                             answer_cross_entropy, pack_teacher_forced)
from lvlm_prune.modeling.prompt import TINY_DEFAULT
from lvlm_prune.modeling.tokenizer import build_processor, build_word_tokenizer

WORDS = ["what", "color", "?", "red", "blue", "is", "it", "a", "circle", "no"]


def collator(image_size=16, **kwargs):
    """A word-level collator; 16-pixel images give 4 visual tokens, 32-pixel ones 16."""
    tokenizer = build_word_tokenizer(WORDS)
    processor = build_processor(tokenizer, image_size=image_size, patch_size=8)
    return VQACollator(processor, TINY_DEFAULT, tokenizer.convert_tokens_to_ids("<image>"), **kwargs)


def example(question_id="q", image_size=16, **kwargs):
    return VQAExample(question_id, Image.new("RGB", (image_size, image_size), (200, 0, 0)), "what color ?", "red",
                      **kwargs)


def hidden_visual(batch, image_token_id, row=0):
    visual = batch["input_ids"][row] == image_token_id
    return (batch["attention_mask"][row][visual] == 0).nonzero().flatten().tolist()


# --- VQACollator


def test_a_batch_exactly_max_length_long_is_neither_truncated_nor_warned_about():
    full = collator(max_length=1024)([example()])
    length = full["input_ids"].shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = collator(max_length=length)([example()])
    assert torch.equal(batch["input_ids"], full["input_ids"]) and torch.equal(batch["labels"], full["labels"])


def test_a_max_length_that_cuts_off_only_the_last_visual_token_is_refused():
    make = collator(max_length=1024)
    last_visual = int((make([example()])["input_ids"][0] == make.image_token_id).nonzero().max())
    with pytest.raises(ValueError, match=f"visual tokens reach past data.max_length={last_visual}"):
        collator(max_length=last_visual)([example()])


def test_evidence_for_fewer_answer_turns_than_the_conversation_has_is_refused():
    two_turns = example(extra_turns=(("is it a circle ?", "no"),), evidence=((0,),))
    with pytest.raises(ValueError, match="evidence for 1 answer turns, but the conversation has 2"):
        collator()([two_turns])


def test_evidence_one_past_the_last_visual_token_is_named():
    with pytest.raises(ValueError, match=r"evidence visual tokens \[4\] outside the image's 4 visual tokens"):
        collator()([example(evidence=((4,),))])


def test_an_answer_truncated_away_gets_no_grounding_lookup():
    make = collator(max_length=1024)
    prompt_length = int(make([example()])["prompt_attention_mask"][0].sum())
    with pytest.warns(UserWarning, match="truncated"):
        batch = collator(max_length=prompt_length)([example(evidence=((0,),))])
    assert (batch["labels"] == IGNORE_INDEX).all()  # the answer starts right at the cut
    assert batch["grounding"] == []


def test_examples_with_evidence_get_lookups_in_a_batch_with_examples_without():
    make = collator()
    batch = make([example("a", evidence=((1,),)), example("b")])
    visual = (batch["input_ids"][0] == make.image_token_id).nonzero().flatten().tolist()
    first_answer = int((batch["labels"][0] != IGNORE_INDEX).nonzero().min())
    assert batch["grounding"] == [(0, first_answer - 1, (visual[1],))]


def test_the_collator_seed_changes_which_visual_tokens_are_hidden():
    def hidden(seed):
        make = collator(image_size=32, seed=seed)
        return hidden_visual(make([example(image_size=32, hidden_visual_fraction=0.5)]), make.image_token_id)

    assert hidden(0) == hidden(0) and len(hidden(0)) == 8
    assert hidden(0) != hidden(1)


def test_a_batch_where_only_some_examples_have_answers_gets_the_generation_layout_only():
    batch = collator()([example("a"), VQAExample("b", Image.new("RGB", (16, 16)), "what color ?")])
    assert batch["answers"] == ["red", None] and batch["prompt_input_ids"].shape[0] == 2
    assert "labels" not in batch and "input_ids" not in batch


def test_num_tokens_counts_every_real_position_hidden_visual_tokens_included():
    make = collator(image_size=32, pack_length=None)
    examples = [example("a", image_size=32, hidden_visual_fraction=0.5),
                example("b", image_size=32, extra_turns=(("is it a circle ?", "no"),))]
    batch = make(examples)
    assert hidden_visual(batch, make.image_token_id)  # some visual tokens of 'a' are hidden ...
    lengths = (batch["position_ids"].argmax(1) + 1).tolist()
    assert batch["num_tokens"] == sum(lengths) > int(batch["attention_mask"].sum())  # ... and still counted
    packed = collator(image_size=32, pack_length=256)(examples)
    assert packed["num_tokens"] == sum(lengths)


# --- pack_teacher_forced


def padded_batch(lengths, pad_token_id=0):
    """A right-padded teacher-forced batch as the collator makes it: positions repeat the last one in the padding."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_token_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(10 * (i + 1), 10 * (i + 1) + n)
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"question_ids": list(range(len(lengths))), "input_ids": ids, "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0), "labels": labels,
            "pixel_values": torch.arange(len(lengths), dtype=torch.float).view(-1, 1)}


def test_packing_fills_rows_so_that_exact_fits_share_a_row():
    # longest first: 6 + 4 and 5 + 5 fill two rows of 10 exactly
    packed = pack_teacher_forced(padded_batch([6, 5, 5, 4]), row_length=10, pad_token_id=0)
    assert sorted(sorted(row) for row in packed["packed_rows"]) == [[0, 3], [1, 2]]
    assert packed["input_ids"].shape == (2, 10)


def test_packed_rows_are_only_as_wide_as_their_fullest_row():
    packed = pack_teacher_forced(padded_batch([3, 2]), row_length=16, pad_token_id=0)
    assert packed["input_ids"].shape == (1, 5)


def test_packed_padding_uses_the_given_pad_token():
    packed = pack_teacher_forced(padded_batch([4, 3, 2], pad_token_id=7), row_length=5, pad_token_id=7)
    real = sum(len(row) for row in packed["packed_rows"])
    assert real == 3 and (packed["input_ids"][packed["labels"] == IGNORE_INDEX] == 7).all()


def test_grounding_lookups_of_an_example_packed_after_another_point_at_its_own_tokens():
    examples = [example("a", evidence=((1,),)),
                VQAExample("b", Image.new("RGB", (16, 16)), "what color is it ?", "blue", evidence=((2, 3),))]
    padded = collator()(examples)
    packed = collator(pack_length=200)(examples)
    assert len(packed["packed_rows"]) == 1 and len(packed["grounding"]) == 2
    offsets = []
    for (row, query, evidence), (i, padded_query, padded_evidence) in zip(packed["grounding"], padded["grounding"]):
        # the query and the first answer token it predicts are the same tokens as in the padded layout
        assert torch.equal(packed["input_ids"][row, query : query + 2],
                           padded["input_ids"][i, padded_query : padded_query + 2])
        assert [p - query for p in evidence] == [p - padded_query for p in padded_evidence]
        offsets.append(query - padded_query)
    assert sorted(offsets)[0] == 0 < sorted(offsets)[1]  # one of them really moved


def test_every_position_of_a_packed_row_may_attend_somewhere():
    # an attention row with nothing to attend to gives NaN in some kernels, even at padding
    packed = pack_teacher_forced(padded_batch([6, 3, 2]), row_length=8, pad_token_id=0)
    assert packed["packed_rows"] == [[0, 2], [1]]  # the second row ends in 5 padding positions
    assert packed["attention_mask"].any(-1).all()


# --- loss helpers


def test_additive_mask_has_the_models_dtype_and_blocks_what_the_boolean_mask_forbids():
    allowed = torch.tensor([[True, False], [True, True]]).view(1, 1, 2, 2)
    additive = additive_attention_mask(allowed, torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert additive[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min and (additive[allowed] == 0).all()


def test_answer_loss_is_the_mean_cross_entropy_of_each_answer_token_given_the_previous_position():
    logits = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 5]])  # answer tokens at 2 and 3, predicted from 1 and 2
    expected = torch.stack([torch.nn.functional.cross_entropy(logits[0, 1], torch.tensor(2)),
                            torch.nn.functional.cross_entropy(logits[0, 2], torch.tensor(5))]).mean()
    torch.testing.assert_close(answer_cross_entropy(logits, labels), expected)


def test_answer_loss_on_bfloat16_logits_is_computed_in_float32():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 6, 0, IGNORE_INDEX]])
    loss = answer_cross_entropy(logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, answer_cross_entropy(logits.float(), labels))


def test_a_batch_without_answer_tokens_has_zero_loss_that_still_backpropagates():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = answer_cross_entropy(logits, torch.full((2, 3), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


# --- LengthGroupedSampler


def test_a_group_size_of_zero_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="group_size=0"):
        LengthGroupedSampler([1, 2, 3], group_size=0)


def test_neighbouring_seeds_give_different_orders_in_every_epoch():
    lengths = list(range(64))
    later = LengthGroupedSampler(lengths, group_size=4, seed=3)
    later.set_epoch(1)
    assert list(later) != list(LengthGroupedSampler(lengths, group_size=4, seed=4))


def test_groups_after_the_longest_one_come_in_random_order_not_longest_first():
    # one sorting window: without the shuffle the groups would run from the longest samples to the shortest
    lengths = list(range(64))
    groups = LengthGroupedSampler(lengths, group_size=4, seed=0).groups()
    longest = [max(lengths[i] for i in group) for group in groups[1:]]
    assert longest != sorted(longest, reverse=True)
