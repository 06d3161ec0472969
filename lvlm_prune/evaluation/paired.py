"""Paired comparison of two methods answering the same questions: accuracy difference, its 95 % interval and the
exact McNemar test.

Two accuracies on one test split share the questions, so their difference is far less noisy than each accuracy's
own standard error suggests: only the questions one method answers and the other does not carry information. The
exact McNemar test asks whether those discordant questions split evenly (two-sided binomial test at p = 1/2).

Plain Python (no torch, no Lightning).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lvlm_prune.evaluation.normalize import normalize_answer
from lvlm_prune.evaluation.readers import RecordKey, read_answers

Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def mcnemar_exact_p(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: the probability, under a fair split of the discordant questions, of a split
    at least as uneven as (only_first, only_second). 1.0 when there is no discordant question."""
    if only_first < 0 or only_second < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_first} and {only_second}")
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_first, only_second) + 1))
    return min(1.0, 2 * tail / 2**discordant)  # int / int: correctly rounded however large


@dataclass(frozen=True)
class PairedComparison:
    """Method B against method A on the same `num_questions` questions. `difference` is accuracy B - A, with a
    Wald 95 % interval from the per-question differences' sample variance (None with fewer than two questions)."""

    num_questions: int
    accuracy_a: float
    accuracy_b: float
    only_a_correct: int
    only_b_correct: int
    difference: float
    interval_95: tuple[float, float] | None
    p_value: float


def compare_paired(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> PairedComparison:
    """Compare two methods' per-question correctness (same questions, same order)."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired results need the same questions: {len(correct_a)} against {len(correct_b)}")
    n = len(correct_a)
    if n == 0:
        raise ValueError("no question to compare")
    only_a = sum(1 for a, b in zip(correct_a, correct_b) if a and not b)
    only_b = sum(1 for a, b in zip(correct_a, correct_b) if b and not a)
    difference = (only_b - only_a) / n
    interval = None
    if n > 1:
        # per-question differences are -1, 0 or 1: population variance E[d^2] - E[d]^2, made unbiased
        variance = ((only_a + only_b) / n - difference**2) * n / (n - 1)
        half_width = Z_95 * math.sqrt(max(variance, 0.0) / n)
        interval = (difference - half_width, difference + half_width)
    return PairedComparison(
        num_questions=n,
        accuracy_a=sum(map(bool, correct_a)) / n,
        accuracy_b=sum(map(bool, correct_b)) / n,
        only_a_correct=only_a,
        only_b_correct=only_b,
        difference=difference,
        interval_95=interval,
        p_value=mcnemar_exact_p(only_a, only_b),
    )


@dataclass(frozen=True)
class ScoredAnswers:
    """Exact-match correctness of one answer file's records, keyed by (question id, prompt), with each record's
    category ('' without one) and the file's model id(s)."""

    path: Path
    correct: Mapping[RecordKey, bool]
    categories: Mapping[RecordKey, str]
    model_ids: tuple[str, ...]


def score_answers_exact_match(path: str | Path) -> ScoredAnswers:
    """Read an answer `.jsonl` whose records carry their reference `answer` (as `cli.py test` writes them, through
    `callbacks.answer_writer.AnswerFileWriter`) and score each by exact match after `normalize_answer`.

    Raises ValueError naming the file and line of a record without a reference answer, or of a malformed record.
    """
    loaded = read_answers(path, key_by_text=True)
    correct: dict[RecordKey, bool] = {}
    categories: dict[RecordKey, str] = {}
    for key, record in loaded.records.items():
        reference = record.extra.get("answer")
        if not isinstance(reference, str):
            raise ValueError(
                f"{loaded.path}: line {record.line}: question {record.question_id!r} has no single reference answer "
                f"('answer' is {reference!r}); a paired comparison needs answer files of a split with answers, "
                "as `cli.py test` writes them"
            )
        correct[key] = normalize_answer(record.text) == normalize_answer(reference)
        categories[key] = str(record.extra.get("category") or "")
    model_ids = tuple(dict.fromkeys(record.model_id for record in loaded.records.values()))
    return ScoredAnswers(loaded.path, correct, categories, model_ids)


def align(reference: ScoredAnswers, other: ScoredAnswers) -> list[RecordKey]:
    """The keys both files answer, in the reference's order; a ValueError naming both files when their questions
    differ (a comparison on part of a split would not be the split's)."""
    missing = [key for key in reference.correct if key not in other.correct]
    extra = [key for key in other.correct if key not in reference.correct]
    if missing or extra:
        example = (missing or extra)[0]
        raise ValueError(
            f"{other.path} does not answer the questions of {reference.path}: {len(missing)} of the latter's are "
            f"missing from it and it has {len(extra)} others (e.g. question {example[0]!r}); compare answer files of "
            "the same split and size"
        )
    return list(reference.correct)


def compare_answer_files(
    reference: ScoredAnswers, other: ScoredAnswers, category: str | None = None
) -> PairedComparison:
    """`other` against `reference` on their shared questions (all of them, or those of one category)."""
    keys = [key for key in align(reference, other) if category is None or reference.categories[key] == category]
    if not keys:
        raise ValueError(f"{reference.path}: no question of category {category!r}")
    return compare_paired([reference.correct[key] for key in keys], [other.correct[key] for key in keys])
