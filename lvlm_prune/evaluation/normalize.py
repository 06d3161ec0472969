"""Answer normalisation and answer parsing for the benchmark scorers.

Three normalisations:
- `normalize_answer`: lowercase, strip, drop trailing periods (GQA exact match, the synthetic benchmark).
- `normalize_vqa_answer`: the VQA evaluation's punctuation, number-word, article and contraction rules (the
  official VQAv2 script).
- `m4c_normalize_answer`: the same after the m4c / EvalAI answer processor's first tokenising step (TextVQA, and
  the answers LLaVA uploads for VQAv2).

And the parsers that turn free generated text into a benchmark's answer space: POPE and MME yes/no,
ScienceQA and MMBench option letters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The VQA script's period pattern has a malformed look-behind (it reads as a look-ahead for "<=" + digit), so in
# effect it deletes every period that is not followed by a digit: "3.5" keeps its period, "5." and "a.m." lose theirs.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTED_FORMS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he'll", "he's", "how'd", "how'll", "how's", "isn't",
    "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't",
    "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd", "she'd've", "she'll", "should've", "shouldn't",
    "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll",
    "someone's", "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're",
    "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd", "we'd've",
    "we'll", "we're", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's",
    "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't",
    "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll",
    "you're", "you've",
)
# Apostrophe-less spellings that are ordinary words stay as they are ("well" is not "we'll").
_ORDINARY_WORDS = frozenset({"hell", "ill", "its", "id", "lets", "shed", "shell", "wed", "well", "were"})
# Where the protocol's table departs from the rule below, its behaviour is kept, since scores must match the
# official ones: its I-forms are capitalised and never match the lower-cased words ("im" stays "im"), "she's"
# and "let's" map only to themselves ("shes" stays), and "somebody'd" maps the other way, to "somebodyd".
_PROTOCOL_EXCEPTIONS = {"somebody'd": "somebodyd"}


def _contraction_map() -> dict[str, str]:
    """Every spelling of a contraction with exactly one apostrophe missing -> the contraction ("couldnt've" and
    "couldn'tve", not "couldntve"), as the VQA evaluation's table has them, plus `_PROTOCOL_EXCEPTIONS`."""
    mapping: dict[str, str] = {}
    for form in _CONTRACTED_FORMS:
        for position in (i for i, char in enumerate(form) if char == "'"):
            variant = form[:position] + form[position + 1:]
            if variant not in _ORDINARY_WORDS:
                mapping[variant] = form
    return {**mapping, **_PROTOCOL_EXCEPTIONS}


_CONTRACTIONS = _contraction_map()


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: strip, drop trailing periods, lowercase ("Yes." -> "yes")."""
    return text.strip().rstrip(".").strip().lower()


def gqa_prediction(text: str) -> str:
    """A prediction as LLaVA's `convert_gqa_for_eval.py` writes it for GQA's `eval.py`: trailing periods removed,
    lowercased; nothing else (surrounding spaces stay)."""
    return text.rstrip(".").lower()


def process_punctuation(text: str) -> str:
    """The VQA evaluation's punctuation rule.

    A mark next to a space anywhere in the answer (or any answer with a digit-comma-digit, "1,000") is deleted,
    otherwise it becomes a space ("yes/no" -> "yes no"); periods not followed by a digit are deleted.
    """
    delete_marks = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete_marks or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digits_and_articles(text: str) -> str:
    """Lowercase, number words 0-10 to digits, drop a/an/the, restore contraction apostrophes, single spaces."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str, full: bool = True) -> str:
    """The VQA answer normalisation.

    Args:
        text: an answer (generated or human).
        full: also apply `process_digits_and_articles` (always for predictions); with False only the
            whitespace and punctuation steps run, which is what the official VQAv2 script applies to human answers.
    """
    text = process_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    return process_digits_and_articles(text) if full else text


def m4c_normalize_answer(text: str) -> str:
    """The m4c (EvalAI) answer processor: lowercase, delete "," and "?", split "'s" off its word ("man's" ->
    "man 's"), then `normalize_vqa_answer`. LLaVA scores TextVQA with it (predictions and human answers) and
    converts its VQAv2 answers with it before the upload."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(text)


def parse_pope_answer(text: str) -> str:
    """LLaVA's POPE rule (`eval_pope.py`): "no" if the first sentence has the word "no", "No" or "not", else "yes".

    Words are split on single spaces, as there ("no\\nthe image ..." counts as yes).
    """
    first_sentence = text.split(".", 1)[0].replace(",", "")
    words = set(first_sentence.split(" "))
    return "no" if words & {"No", "no", "not"} else "yes"


def parse_mme_answer(text: str) -> str:
    """The MME rule: "yes"/"no" when the answer is that word or its first 4 characters contain it, else "other"."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


_SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")  # LLaVA's eval_science_qa.py: a list, so `in` is membership
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_scienceqa_choice(text: str, num_choices: int) -> int:
    """LLaVA's ScienceQA rule (`eval_science_qa.py`): the chosen option index, or -1 when it finds no valid letter.

    The text as generated (not stripped): exactly one letter A-E ("B"; "AB" is no answer); or a letter A-E followed
    by ". " ("B. cat"); or exactly one "The answer is X" followed by any character but a newline ("The answer is
    B." or "The answer is B,"). The letter must be one of the first `num_choices` of A-E. An unparsed answer is
    wrong (-1), as in LLaVA-1.5's script (LLaVA-1's drew a random option).

    Args:
        text: the generated answer.
        num_choices: number of options of the problem; letters beyond it are invalid.
    """
    if text in _SCIENCEQA_OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in _SCIENCEQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    valid = _SCIENCEQA_OPTIONS[:num_choices]
    return valid.index(letter) if letter in valid else -1


_BARE_LETTER = re.compile(r"^\(?([A-Z])\)?[.:]?$")
_LEADING_LETTER = re.compile(r"^\(?([A-Z])[).:]\s")
_ANSWER_IS_ANY_CASE = re.compile(r"[Aa]nswer is:?\s*\(?([A-Z])\b")


def parse_option_letter(text: str, num_options: int, choices: Sequence[str] | None = None) -> str | None:
    """The option letter a multiple-choice answer names (MMBench), or None.

    Tried in order: a bare letter ("B", "(B)", "B."), a leading letter with a separator ("B. cat", "(B) cat",
    "B: cat"), "the answer is B", and last an answer that equals exactly one option's text.

    Args:
        text: the generated answer.
        num_options: options of the question; letters beyond it are invalid.
        choices: the option texts in letter order, for matching an answer given as text.
    """
    text = text.strip()
    valid = OPTION_LETTERS[:num_options]
    for match in (_BARE_LETTER.match(text), _LEADING_LETTER.match(text), _ANSWER_IS_ANY_CASE.search(text)):
        if match and match.group(1) in valid:
            return match.group(1)
    if choices is not None:
        answer = normalize_answer(text)
        hits = [letter for letter, choice in zip(valid, choices) if normalize_answer(choice) == answer]
        if len(hits) == 1:
            return hits[0]
    return None
