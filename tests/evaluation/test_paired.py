"""Paired comparison of answer files: exact McNemar p-values, the difference's interval, scoring and alignment."""

from __future__ import annotations

import json
import random

import pytest

from lvlm_prune.evaluation.paired import (
    align,
    compare_answer_files,
    compare_paired,
    mcnemar_exact_p,
    score_answers_exact_match,
)


def write_answers(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def record(qid, text, answer, category="count", prompt=None):
    return {"question_id": qid, "prompt": prompt or f"question {qid}", "text": text, "answer": answer,
            "category": category, "model_id": "m"}


@pytest.mark.parametrize(
    ("only_first", "only_second", "expected"),
    [(0, 0, 1.0), (0, 5, 2 / 32), (1, 9, 2 * (1 + 10) / 1024), (9, 1, 2 * (1 + 10) / 1024), (5, 5, 1.0),
     (2, 3, 1.0), (0, 1, 1.0), (3, 12, 2 * (1 + 15 + 105 + 455) / 2**15)],
)
def test_mcnemar_exact_p_is_the_two_sided_binomial_tail(only_first, only_second, expected):
    assert mcnemar_exact_p(only_first, only_second) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_exact_p_stays_finite_for_thousands_of_discordant_questions():
    p = mcnemar_exact_p(900, 1100)
    # normal approximation of the same two-sided tail: z = (1100 - 1000) / sqrt(500) = 4.47, p about 8e-6
    assert 3e-6 < p < 2e-5
    assert mcnemar_exact_p(1000, 1000) == 1.0


def test_mcnemar_exact_p_refuses_negative_counts():
    with pytest.raises(ValueError, match="discordant counts"):
        mcnemar_exact_p(-1, 3)


def test_compare_paired_counts_discordant_questions_and_their_interval():
    correct_a = [i < 6 for i in range(10)]  # right on 0-5
    correct_b = [i >= 3 for i in range(10)]  # right on 3-9
    result = compare_paired(correct_a, correct_b)
    assert (result.num_questions, result.only_a_correct, result.only_b_correct) == (10, 3, 4)
    assert (result.accuracy_a, result.accuracy_b) == (0.6, 0.7)
    assert result.difference == pytest.approx(0.1)
    # per-question differences: three -1, four +1, three 0 -> sample variance (7 - 10 * 0.1^2) / 9
    half_width = 1.959963984540054 * ((7 - 0.1) / 9 / 10) ** 0.5
    assert result.interval_95 == pytest.approx((0.1 - half_width, 0.1 + half_width))
    assert result.p_value == pytest.approx(mcnemar_exact_p(3, 4))


def test_compare_paired_of_identical_results_has_no_difference():
    correct = [True, False, True, True]
    result = compare_paired(correct, list(correct))
    assert result.difference == 0.0 and result.interval_95 == (0.0, 0.0) and result.p_value == 1.0


def test_compare_paired_of_one_question_has_no_interval():
    assert compare_paired([True], [False]).interval_95 is None


@pytest.mark.parametrize(("first", "second", "message"), [([True], [True, False], "same questions"),
                                                          ([], [], "no question")])
def test_compare_paired_refuses_unpaired_or_empty_results(first, second, message):
    with pytest.raises(ValueError, match=message):
        compare_paired(first, second)


def test_interval_covers_the_true_difference_and_the_test_keeps_its_level():
    """Simulated methods with known accuracies (0.60 vs 0.65, correlated through shared question difficulty)."""
    rng = random.Random(0)
    covered = rejected_null = 0
    replicates, n = 300, 300
    for _ in range(replicates):
        difficulty = [rng.random() for _ in range(n)]
        first = [d < 0.60 for d in difficulty]
        second = [d < 0.55 or (0.55 <= d < 0.75 and rng.random() < 0.5) for d in difficulty]  # 0.55 + 0.1 = 0.65
        low, high = compare_paired(first, second).interval_95
        covered += low <= 0.05 <= high
        same_level = [d < 0.55 or (0.55 <= d < 0.75 and rng.random() < 0.25) for d in difficulty]  # 0.60
        rejected_null += compare_paired(first, same_level).p_value < 0.05
    assert 0.90 <= covered / replicates <= 0.99
    assert rejected_null / replicates <= 0.08


def test_score_answers_exact_match_normalises_and_keeps_categories(tmp_path):
    path = write_answers(tmp_path / "a.jsonl", [record(1, "Yes.", "yes", "exist"), record(2, " two", "three"),
                                                record(3, "RED", "red", "query_at")])
    scored = score_answers_exact_match(path)
    assert list(scored.correct.values()) == [True, False, True]
    assert list(scored.categories.values()) == ["exist", "count", "query_at"]
    assert scored.model_ids == ("m",)


@pytest.mark.parametrize("answer", [None, "missing", ["no", "nope"]])
def test_score_answers_exact_match_names_a_record_without_a_reference(tmp_path, answer):
    second = record(2, "no", answer)
    if answer == "missing":
        del second["answer"]
    path = write_answers(tmp_path / "test_answers.jsonl", [record(1, "yes", "yes"), second])
    with pytest.raises(ValueError, match=r"test_answers.jsonl: line 2: question 2 has no single reference answer"):
        score_answers_exact_match(path)


def test_score_answers_exact_match_names_a_malformed_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(record(1, "yes", "yes")) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2: not valid JSON"):
        score_answers_exact_match(path)


def test_questions_sharing_an_id_are_told_apart_by_their_prompt(tmp_path):
    # MME asks two questions about one image under one id
    path = write_answers(tmp_path / "mme.jsonl", [record(7, "yes", "yes", prompt="is it red ?"),
                                                  record(7, "yes", "no", prompt="is it blue ?")])
    assert list(score_answers_exact_match(path).correct.values()) == [True, False]


def test_align_names_both_files_when_their_questions_differ(tmp_path):
    reference = score_answers_exact_match(write_answers(tmp_path / "ref.jsonl", [record(1, "a", "a"),
                                                                                 record(2, "b", "b")]))
    other = score_answers_exact_match(write_answers(tmp_path / "other.jsonl", [record(1, "a", "a"),
                                                                               record(3, "c", "c")]))
    with pytest.raises(ValueError, match=r"other.jsonl does not answer the questions of .*ref.jsonl: 1 .* missing "
                                         r"from it and it has 1 others \(e.g. question '2'\)"):
        align(reference, other)
    more = score_answers_exact_match(write_answers(tmp_path / "more.jsonl", [record(1, "a", "a"), record(2, "b", "b"),
                                                                             record(4, "d", "d")]))
    with pytest.raises(ValueError, match=r"0 of the latter's are missing from it and it has 1 others "
                                         r"\(e.g. question '4'"):
        align(reference, more)


def test_compare_answer_files_follows_the_reference_order_and_filters_a_category(tmp_path):
    reference = score_answers_exact_match(write_answers(tmp_path / "ref.jsonl", [
        record(1, "a", "a", "count"), record(2, "x", "b", "count"), record(3, "c", "c", "exist")]))
    other = score_answers_exact_match(write_answers(tmp_path / "other.jsonl", [
        record(3, "x", "c", "exist"), record(2, "b", "b", "count"), record(1, "a", "a", "count")]))
    overall = compare_answer_files(reference, other)
    assert (overall.num_questions, overall.only_a_correct, overall.only_b_correct) == (3, 1, 1)
    count = compare_answer_files(reference, other, "count")
    assert (count.num_questions, count.accuracy_a, count.accuracy_b) == (2, 0.5, 1.0)
    with pytest.raises(ValueError, match="no question of category 'relate'"):
        compare_answer_files(reference, other, "relate")
