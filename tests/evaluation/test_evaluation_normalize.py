import pytest

from lvlm_prune.evaluation.normalize import (
    gqa_prediction,
    m4c_normalize_answer,
    normalize_answer,
    normalize_vqa_answer,
    parse_mme_answer,
    parse_option_letter,
    parse_pope_answer,
    parse_scienceqa_choice,
    process_punctuation,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),  # period not before a digit dropped, number word -> digit
        ("3.5", "3.5"),  # a period before a digit stays
        ("The cat's toy", "cat's toy"),  # article dropped, apostrophe kept
        ("dont know", "don't know"),  # contraction restored
        ("couldnt've", "couldn't've"),
        ("red, white", "red white"),  # ", " touches a space -> the comma is deleted
        ("1,000", "1000"),  # digit,digit -> every mark is deleted
        ("yes/no", "yes no"),  # a mark touching no space becomes a space
        ("an apple!", "apple"),
        ("a.m.", "am"),
        ("none", "0"),
        ("  Yes\n", "yes"),
        ("its well", "its well"),  # ordinary words that look like contractions stay
        ("were", "were"),  # not "we're"
        ("t-shirt", "t shirt"),  # a hyphen is punctuation
        ("ten", "10"),
        ("a dog", "dog"),
    ],
)
def test_vqa_normalisation_matches_the_vqa_rules(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("couldntve", "couldntve"),  # the protocol's table drops one apostrophe at a time
        ("im", "im"),  # its I-forms are capitalised and never match a lower-cased word
        ("shes", "shes"),  # "she's" maps only to itself
        ("somebody'd", "somebodyd"),  # and "somebody'd" the other way
        ("yall'd've", "y'all'd've"),
    ],
)
def test_contractions_follow_the_protocol_table(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Man's", "man 's"),  # "'s" split off its word first
        ("red,white", "redwhite"),  # commas and question marks deleted before the punctuation rule
        ("what's", "what 's"),
        ("whats", "what's"),
        ("Two dogs?", "2 dogs"),
    ],
)
def test_m4c_normalisation_tokenises_first(raw, expected):
    assert m4c_normalize_answer(raw) == expected


def test_vqa_punctuation_only_keeps_case_and_articles():
    assert normalize_vqa_answer("The Red, one.", full=False) == "The Red one"
    assert process_punctuation("(left)") == " left "
    assert process_punctuation("x (y)") == "x y "  # " (" touches a space: deleted; ")" touches none: a space


@pytest.mark.parametrize(
    ("raw", "expected"), [("Yes.", "yes"), ("  Table ", "table"), ("left..", "left"), ("3.5", "3.5"), ("Yes .", "yes")]
)
def test_exact_match_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_gqa_predictions_are_converted_as_llava_converts_them():
    assert gqa_prediction("Yes.") == "yes" and gqa_prediction("Yes. ") == "yes. "  # only trailing periods go


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is not a dog in the image", "no"),
        ("no\nthe image shows a cat", "yes"),  # LLaVA splits on single spaces: "no\nthe" is not "no"
        ("No there is not", "no"),
        ("No, the image shows a cat.", "no"),  # commas go before the words are split
        ("Yes. No other animals are visible.", "yes"),  # only the first sentence counts
        ("Nope", "yes"),  # LLaVA's rule looks for the words No/no/not only
    ],
)
def test_pope_answer_parsing_follows_llava(raw, expected):
    assert parse_pope_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes", "yes"), (" NO ", "no"), ("yes, it is", "yes"), ("Not really", "no"), ("Maybe", "other"),
        ("I think yes", "other"), ("(yes) it is", "yes"),
    ],
)
def test_mme_answer_parsing_uses_the_first_four_characters(raw, expected):
    assert parse_mme_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "num_choices", "expected"),
    [
        ("B", 3, 1),
        ("B. interrogative", 3, 1),
        ("B. ", 3, 1),  # the letter and ". " are enough
        ("The answer is C.", 3, 2),
        ("C", 2, -1),  # letter beyond the choices
        ("I think B", 3, -1),
        ("b", 3, -1),
        # LLaVA's eval_science_qa.py takes the text as generated: these are FAILED there
        ("B\nBecause", 3, -1),
        (" B", 3, -1),
        ("The answer is B", 3, -1),  # the pattern needs a character after the letter
        ("The answer is A. The answer is B.", 3, -1),  # two answers
        ("", 3, -1),
        ("The answer is B\n", 3, -1),  # the pattern's "." is not a newline
        ("The answer is B,", 3, 1),
        ("E. nothing", 5, 4),
        ("The answer is F.", 6, -1),  # the script knows A-E only, whatever the number of choices
    ],
)
def test_scienceqa_choice_parsing(raw, num_choices, expected):
    assert parse_scienceqa_choice(raw, num_choices) == expected


def test_scienceqa_letter_is_a_member_of_the_options_not_a_substring():
    """LLaVA's options are a list: "AB" is not an answer, though it is a substring of "ABCDE"."""
    raws = ["A", "AB", "BC", "ABCD", "CD", "E", "The answer is B.", "ABCDE", "AB. cat"]
    assert [parse_scienceqa_choice(raw, 4) for raw in raws] == [0, -1, -1, -1, -1, -1, 1, -1, -1]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A", "A"),
        ("(B)", "B"),
        ("C.", "C"),
        ("D. beach", "D"),
        ("(B) forest", "B"),
        ("C: desert", "C"),
        ("The answer is C", "C"),
        ("answer is: (A)", "A"),
        ("Desert.", "C"),  # the text of exactly one option
        ("A cat", None),  # an article is not an option letter
        ("The answer is Blue", None),  # "B" must end a word
        ("E", None),  # only 4 options
        ("I am not sure", None),
    ],
)
def test_option_letter_parsing(raw, expected):
    assert parse_option_letter(raw, 4, ["beach", "forest", "desert", "city"]) == expected


def test_option_text_matching_two_options_is_ambiguous():
    assert parse_option_letter("yes", 2, ["yes", "Yes"]) is None
