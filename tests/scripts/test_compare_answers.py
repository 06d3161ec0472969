"""scripts/compare_answers.py on answer files in the format `cli.py test` writes (AnswerFileWriter's lines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import compare_answers  # noqa: E402

from callbacks.answer_writer import answer_line  # noqa: E402
from lightning_modules.common import prediction_records  # noqa: E402

ANSWERS = ["yes", "two", "red", "no", "three", "blue"]
CATEGORIES = ["exist", "count", "query_at", "exist", "count", "query_at"]


def write_run(path: Path, predictions: list[str], model_id: str, ids: list[int] | None = None) -> Path:
    ids = ids or list(range(len(predictions)))
    batch = {"question_ids": ids, "questions": [f"question {i} ?" for i in ids], "answers": ANSWERS[: len(ids)],
             "categories": CATEGORIES[: len(ids)]}
    records = prediction_records(batch, predictions, model_id)
    path.write_text("".join(answer_line(record) for record in records))
    return path


@pytest.fixture
def runs(tmp_path):
    reference = write_run(tmp_path / "random.jsonl", ["yes", "one", "red", "yes", "one", "red"], "accm_random@r=0.969")
    better = write_run(tmp_path / "accm.jsonl", ["Yes.", "two", "red", "no", "three", "red"], "accm@r=0.969")
    return reference, better


def test_compare_answers_prints_and_writes_the_paired_rows(runs, tmp_path, capsys):
    reference, better = runs
    rows = compare_answers.main([str(reference), str(better), "--json", str(tmp_path / "out.json")])
    assert len(rows) == 1
    (entry,) = rows
    # reference right on 0, 2 (2 of 6); accm right on 0, 1, 3, 4 and "Yes." normalised (5 of 6 wrong only on 5)
    assert entry["accuracy_reference"] == pytest.approx(2 / 6) and entry["accuracy"] == pytest.approx(5 / 6)
    assert (entry["only_reference_correct"], entry["only_this_correct"]) == (0, 3)
    assert entry["mcnemar_p"] == pytest.approx(0.25)
    printed = capsys.readouterr().out
    assert "Reference: random.jsonl (accm_random@r=0.969)" in printed
    assert "| accm.jsonl (accm@r=0.969) | all | 6 | 33.3 | 83.3 | +50.0 |" in printed
    assert json.loads((tmp_path / "out.json").read_text()) == {"reference": "random.jsonl (accm_random@r=0.969)",
                                                              "rows": rows}


def test_compare_answers_by_category_adds_a_row_per_family(runs):
    reference, better = runs
    rows = compare_answers.main([str(reference), str(better), "--by-category"])
    assert [(r["category"], r["questions"], r["only_this_correct"]) for r in rows] == [
        ("", 6, 3), ("count", 2, 2), ("exist", 2, 1), ("query_at", 2, 0)]


def test_compare_answers_names_a_missing_file(runs, capsys):
    reference, _ = runs
    with pytest.raises(SystemExit):
        compare_answers.main([str(reference), str(reference.parent / "nowhere.jsonl")])
    assert "no answer file at" in capsys.readouterr().err


def test_compare_answers_names_files_of_different_questions(runs, tmp_path, capsys):
    reference, _ = runs
    fewer = write_run(tmp_path / "part.jsonl", ["yes", "two"], "accm@r=0.969")
    with pytest.raises(SystemExit):
        compare_answers.main([str(reference), str(fewer)])
    assert "part.jsonl does not answer the questions of" in capsys.readouterr().err


def test_compare_answers_names_a_file_without_reference_answers(runs, tmp_path, capsys):
    reference, _ = runs
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text(json.dumps({"question_id": 0, "prompt": "question 0 ?", "text": "yes"}) + "\n")
    with pytest.raises(SystemExit):
        compare_answers.main([str(reference), str(unlabelled)])
    assert "unlabelled.jsonl: line 1: question 0 has no single reference answer" in capsys.readouterr().err
