import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from lvlm_prune.evaluation.export import (
    BENCHMARK_SCORERS,
    GQA_PREDICTIONS_FILENAME,
    answer_id_for,
    score_answer_file,
    write_gqa_predictions,
    write_llava_answers,
    write_vqav2_submission,
)
from lvlm_prune.evaluation.readers import read_answers, read_questions

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_paths(benchmark):
    folder = FIXTURES / benchmark
    return {
        "gqa": (folder / "llava_gqa_testdev_balanced.jsonl", folder / "testdev_balanced_questions.json"),
        "pope": (folder / "llava_pope_test.jsonl", folder),
        "mme": (folder / "llava_mme.jsonl", folder / "eval_tool"),
        "scienceqa": (folder / "llava_test_CQM-A.json", folder / "problems.json"),
        "vqav2": (folder / "llava_vqav2_val.jsonl", folder / "v2_mscoco_val2014_annotations.json"),
        "textvqa": (folder / "llava_textvqa_val.jsonl", folder / "TextVQA_0.5.1_val.json"),
        "mmbench": (folder / "mmbench_dev_en.tsv", None),
        "flickr30k": (folder / "llava_flickr30k_test.jsonl", folder / "flickr30k_test_captions.json"),
    }[benchmark]


def score_fixture(benchmark, **kwargs):
    questions, annotation = fixture_paths(benchmark)
    return score_answer_file(benchmark, questions, FIXTURES / benchmark / "answers.jsonl", annotation, **kwargs)


def test_registry_names_every_benchmark_and_rejects_unknown_ones():
    assert sorted(BENCHMARK_SCORERS) == ["flickr30k", "gqa", "mmbench", "mme", "pope", "scienceqa", "textvqa", "vqav2"]
    with pytest.raises(ValueError, match=r"unknown benchmark 'vqa'; known: \['flickr30k', 'gqa'"):
        score_answer_file("vqa", "q.jsonl", "a.jsonl")


def test_gqa_exact_match():
    result = score_fixture("gqa")
    # "No." -> no (right, verify), "Table" -> table (right, query), "right" vs left (wrong, choose),
    # "yes" (right, logical), "white and blue" vs white (wrong, query): 3/5
    assert result["acc"] == pytest.approx(0.6)
    assert result["acc/verify"] == 1.0 and result["acc/query"] == 0.5 and result["acc/choose"] == 0.0
    assert math.isnan(result["acc/compare"])
    assert result["num_scored"] == 5 and result["num_skipped"] == 0


def test_pope_per_split_and_mean_f1():
    result = score_fixture("pope")
    # adversarial labels yes yes no no, parsed yes no yes no: TP FN FP TN -> acc .5, P .5, R .5, F1 .5
    assert [result[f"adversarial/{k}"] for k in ("acc", "precision", "recall", "f1", "yes_ratio")] == [0.5] * 5
    # popular labels yes no, parsed yes yes: TP FP -> acc .5, P .5, R 1, F1 2*.5*1/1.5 = 2/3, yes ratio 1
    assert result["popular/f1"] == pytest.approx(2 / 3) and result["popular/yes_ratio"] == 1.0
    # random labels yes no, parsed yes no ("No, it is not."): all right
    assert result["random/acc"] == 1.0 and result["random/f1"] == 1.0
    # mean F1 (.5 + 2/3 + 1) / 3 = 0.7222; mean acc (.5 + .5 + 1) / 3
    assert result["f1"] == pytest.approx(13 / 18) and result["acc"] == pytest.approx(2 / 3)


def test_pope_with_labels_in_the_question_file(tmp_path):
    labels = {1: "yes", 2: "yes", 3: "no", 4: "no", 5: "yes", 6: "no", 7: "yes", 8: "no"}
    lines = (FIXTURES / "pope" / "llava_pope_test.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({**r, "label": labels[r["question_id"]]}) + "\n" for r in records))
    inline = score_answer_file("pope", path, FIXTURES / "pope" / "answers.jsonl")
    assert inline == score_fixture("pope")


def test_pope_question_without_matching_label_errors_or_is_counted(tmp_path):
    lines = (FIXTURES / "pope" / "llava_pope_test.jsonl").read_text().splitlines()
    renamed = json.loads(lines[-1]) | {"text": "Is there a zebra in the image?"}
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(lines[:-1] + [json.dumps(renamed)]) + "\n")
    answers = FIXTURES / "pope" / "answers.jsonl"
    with pytest.raises(ValueError, match=r"no POPE label for question 8"):
        score_answer_file("pope", questions, answers, FIXTURES / "pope")
    result = score_answer_file("pope", questions, answers, FIXTURES / "pope", on_bad_record="skip")
    # random keeps only question 7 (label yes, "Yes.") -> acc 1, F1 1; the other splits are unchanged
    assert result["num_skipped"] == 1 and result["random/acc"] == 1.0 and result["random/yes_ratio"] == 1.0


def test_pope_labels_in_the_question_file_are_read_in_any_case_and_a_bad_one_names_its_line(tmp_path):
    labels = {1: "Yes", 2: "yes", 3: "NO", 4: "no", 5: "yes", 6: "no", 7: "yes", 8: "maybe"}
    records = [json.loads(line) for line in (FIXTURES / "pope" / "llava_pope_test.jsonl").read_text().splitlines()]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({**r, "label": labels[r["question_id"]]}) + "\n" for r in records))
    answers = FIXTURES / "pope" / "answers.jsonl"
    with pytest.raises(ValueError, match=rf"{path}.*POPE label of question 8 \(question file line 8\): label 'maybe' is "
                                         r"not 'yes' or 'no'"):
        score_answer_file("pope", path, answers)
    assert score_answer_file("pope", path, answers, on_bad_record="skip")["num_skipped"] == 1


def test_mme_ground_truth_and_subtasks_are_checked_per_question(tmp_path):
    records = [json.loads(line) | {"answer": "yes"}
               for line in (FIXTURES / "mme" / "llava_mme.jsonl").read_text().splitlines()]
    answers = FIXTURES / "mme" / "answers.jsonl"
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert score_answer_file("mme", path, answers)["num_scored"] == len(records)  # answers in the question file
    for change, expected in (({"answer": "Yes."}, r"answer 'Yes\.' is not 'yes' or 'no'"),
                             ({"category": "Artwork"}, r"subtask 'Artwork' \(its category, else its id's first "
                                                       r"part\) is not one of MME's: existence")):
        path.write_text("".join(json.dumps(r | change if i == 0 else r) + "\n" for i, r in enumerate(records)))
        with pytest.raises(ValueError, match=rf"MME ground truth of question .* \(question file line 1\): {expected}"):
            score_answer_file("mme", path, answers)
        assert score_answer_file("mme", path, answers, on_bad_record="skip")["num_skipped"] == 1


def test_mme_subtask_scores_and_sums():
    result = score_fixture("mme")
    # artwork: right right | right ("yes, it is") wrong -> acc 3/4 = 75, acc+ 1/2 images = 50, score 125
    # code_reasoning: "Maybe" -> other (wrong) | right -> acc 50, acc+ 0, score 50
    assert result["artwork/acc"] == 75.0 and result["artwork/acc_plus"] == 50.0 and result["artwork/score"] == 125.0
    assert result["code_reasoning/score"] == 50.0
    assert result["perception"] == 125.0 and result["cognition"] == 50.0 and result["num_scored"] == 6


def test_mme_with_answers_in_the_question_file(tmp_path):
    truth = ["Yes", "No", "Yes", "No", "Yes", "No"]
    lines = (FIXTURES / "mme" / "llava_mme.jsonl").read_text().splitlines()
    path = tmp_path / "llava_mme.jsonl"
    path.write_text("".join(json.dumps({**json.loads(l), "answer": t}) + "\n" for l, t in zip(lines, truth)))
    assert score_answer_file("mme", path, FIXTURES / "mme" / "answers.jsonl") == score_fixture("mme")


def test_scienceqa_img_accuracy():
    result = score_fixture("scienceqa")
    # 4: "B" = 1 right (img); 5: "The answer is A." = 0 right (no img); 8: "C" of 2 choices wrong (img);
    # 12: "D. tundra" = 3 right (img) -> 3/4; IMG 2/3; no image 1/1
    assert result["acc"] == 0.75 and result["acc/img"] == pytest.approx(2 / 3) and result["acc/no_img"] == 1.0


def test_scienceqa_answers_to_image_problems_only_score_scienceqa_img_and_missing_ones_are_named(tmp_path):
    questions, problems = fixture_paths("scienceqa")
    lines = (FIXTURES / "scienceqa" / "answers.jsonl").read_text().splitlines()
    img_only = tmp_path / "answers.jsonl"  # what a test run writes: ScienceQA-IMG's questions only
    img_only.write_text("".join(line + "\n" for line in lines if json.loads(line)["question_id"] != "5"))
    result = score_answer_file("scienceqa", questions, img_only, problems)
    assert result["acc/img"] == pytest.approx(2 / 3) and result["acc"] == pytest.approx(2 / 3)
    assert result["num_scored"] == 3 and result["num_skipped"] == 1  # the text-only problem
    truncated = tmp_path / "truncated.jsonl"  # a run cut short: an image problem lacks its answer
    truncated.write_text("".join(line + "\n" for line in lines if json.loads(line)["question_id"] not in ("5", "8")))
    with pytest.raises(ValueError, match=r"1 of 3 questions of .*llava_test_CQM-A.json have no answer"):
        score_answer_file("scienceqa", questions, truncated, problems)


def test_vqav2_soft_accuracy_by_answer_type():
    result = score_fixture("vqav2")
    # "Skateboarding." -> skateboarding, 2 of 10 humans -> 0.6; "two" -> 2, 10 humans -> 1.0;
    # "Yes" -> yes, 3 humans -> 0.9; "red", 1 human -> 0.3; mean 2.8 / 4 = 0.7
    assert result["acc"] == pytest.approx(0.7)
    assert result["acc/other"] == pytest.approx(0.45) and result["acc/number"] == 1.0 and result["acc/yes/no"] == 0.9


def test_textvqa_soft_accuracy():
    result = score_fixture("textvqa")
    # LLaVA's file: the image id is the question id, two questions on the first image, each found by its text
    # "Dakota" -> dakota: 7 + "Dakota" normalised = 8 humans -> 1.0; "Black": 6 -> 1.0; "ask": 2 -> 0.6;
    # "1980s": "the 1980s" -> 1980s, 3 -> 0.9; mean 3.5 / 4
    assert result["acc"] == pytest.approx(3.5 / 4) and result["num_scored"] == 4


def test_mmbench_circular_accuracy():
    result = score_fixture("mmbench")
    # question 0: "A", "D. beach", "The answer is C", "beach" (= option B of rotation 3) all right;
    # question 1: "B" right, rotation 1000001 answered "B" but its answer is A -> circular 1/2, vanilla 2/2
    assert result["acc"] == 0.5 and result["acc/vanilla"] == 1.0
    assert result["acc/image_scene"] == 1.0 and result["acc/ocr"] == 0.0


def test_flickr30k_cider_d():
    result = score_fixture("flickr30k")
    # "A cat." equals its references -> 5.0; "dog": unigram cosine 1, length penalty exp(-1/72) -> 2.5 exp(-1/72)
    assert result["cider_d"] == pytest.approx((5.0 + 2.5 * math.exp(-1 / 72)) / 2)


def test_missing_annotation_argument_is_an_error():
    questions, _ = fixture_paths("gqa")
    with pytest.raises(ValueError, match="annotation is required for gqa"):
        score_answer_file("gqa", questions, FIXTURES / "gqa" / "answers.jsonl")


def test_answer_file_with_missing_ids_errors_or_is_counted(tmp_path, caplog):
    lines = (FIXTURES / "gqa" / "answers.jsonl").read_text().splitlines()
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(lines[:3]) + "\n")
    questions, annotation = fixture_paths("gqa")
    with pytest.raises(ValueError, match=r"2 of 5 questions .* have no answer .*'20968379', '20567512'"):
        score_answer_file("gqa", questions, answers, annotation)
    with caplog.at_level(logging.WARNING):
        result = score_answer_file("gqa", questions, answers, annotation, on_bad_record="skip")
    # the 3 answered: no (right), table (right), right (wrong) -> 2/3, 2 skipped
    assert result["acc"] == pytest.approx(2 / 3) and result["num_scored"] == 3 and result["num_skipped"] == 2
    assert "have no answer" in caplog.text


def test_question_without_annotation_errors_or_is_counted(tmp_path):
    truth = json.loads((FIXTURES / "gqa" / "testdev_balanced_questions.json").read_text())
    del truth["20567512"]
    annotation = tmp_path / "testdev_balanced_questions.json"
    annotation.write_text(json.dumps(truth))
    questions, _ = fixture_paths("gqa")
    with pytest.raises(ValueError, match=r"no GQA annotation for question '20567512'"):
        score_answer_file("gqa", questions, FIXTURES / "gqa" / "answers.jsonl", annotation)
    result = score_answer_file("gqa", questions, FIXTURES / "gqa" / "answers.jsonl", annotation, on_bad_record="skip")
    assert result["acc"] == 0.75 and result["num_skipped"] == 1


def test_image_checks_through_the_scorer(tmp_path):
    questions, annotation = fixture_paths("gqa")
    for record in read_questions(questions):
        if record.image != "n422021.jpg":
            Image.new("RGB", (2, 2)).save(tmp_path / record.image, format="JPEG")
    with pytest.raises(ValueError, match="image file not found: .*n422021.jpg"):
        score_fixture("gqa", image_root=tmp_path)
    result = score_fixture("gqa", image_root=tmp_path, on_bad_record="skip")
    # the question with the missing image is skipped and so is its answer: 3/4 right
    assert result["num_scored"] == 4 and result["num_skipped"] == 1 and result["acc"] == 0.75


def test_everything_skipped_is_an_error_not_an_empty_score(tmp_path):
    empty = tmp_path / "answers.jsonl"
    empty.write_text("")
    questions, annotation = fixture_paths("gqa")
    with pytest.raises(ValueError, match="no question could be scored"):
        score_answer_file("gqa", questions, empty, annotation, on_bad_record="skip")


def test_written_answers_round_trip_and_score_the_same(tmp_path):
    questions_path, annotation = fixture_paths("gqa")
    questions = list(read_questions(questions_path))
    predictions = [a.text for a in read_answers(FIXTURES / "gqa" / "answers.jsonl")]
    path = write_llava_answers(tmp_path / "answers.jsonl", questions, predictions, model_id="tiny-llava")
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert first["question_id"] == "201307251" and first["prompt"] == questions[0].text
    assert first["answer_id"] == answer_id_for("201307251", questions[0].text)
    ids = [json.loads(line)["answer_id"] for line in path.read_text().splitlines()]
    assert len(set(ids)) == 5
    rescored = score_answer_file("gqa", questions_path, path, annotation)
    assert rescored == pytest.approx(score_fixture("gqa"), nan_ok=True)
    with pytest.raises(ValueError, match="got 4 predictions for 5 questions"):
        write_llava_answers(tmp_path / "x.jsonl", questions, predictions[:4], model_id="m")
    with pytest.raises(ValueError, match="appears twice"):
        write_llava_answers(tmp_path / "x.jsonl", questions[:1] * 2, predictions[:2], model_id="m")


def test_answer_ids_are_deterministic_and_depend_on_the_prompt():
    assert answer_id_for(5, "a") == answer_id_for(5, "a") != answer_id_for(5, "b")
    assert len(answer_id_for(5)) == 32


def test_gqa_predictions_file_layout(tmp_path):
    answers = list(read_answers(FIXTURES / "gqa" / "answers.jsonl"))
    path = write_gqa_predictions(tmp_path, answers)
    assert path.name == GQA_PREDICTIONS_FILENAME == "testdev_balanced_predictions.json"
    entries = json.loads(path.read_text())
    assert entries[0] == {"questionId": "201307251", "prediction": "no"} and len(entries) == 5
    with pytest.raises(ValueError, match="appears twice"):
        write_gqa_predictions(tmp_path / "p.json", answers[:1] * 2)


def test_vqav2_submission_normalises_and_handles_missing_answers(tmp_path, caplog):
    questions = list(read_questions(FIXTURES / "vqav2" / "llava_vqav2_val.jsonl"))
    answers = list(read_answers(FIXTURES / "vqav2" / "answers.jsonl"))
    path = write_vqav2_submission(tmp_path / "submission.json", questions, answers)
    entries = json.loads(path.read_text())
    assert entries[0] == {"question_id": 262148000, "answer": "skateboarding"}
    assert entries[1] == {"question_id": 262148001, "answer": "2"}  # "two" -> "2"
    # as LLaVA's converter: every question of the list, "" where the run has no answer (test2015 vs test-dev)
    with caplog.at_level(logging.INFO):
        path = write_vqav2_submission(tmp_path / "s.json", questions, answers[:3])
    assert json.loads(path.read_text())[-1] == {"question_id": 262148003, "answer": ""}
    assert "1 of 4 questions have no answer" in caplog.text
    # an answer to a question outside the list is a bad record
    with pytest.raises(ValueError, match="answer to question 262148003, which is not in the question list"):
        write_vqav2_submission(tmp_path / "s.json", questions[:3], answers)
    with caplog.at_level(logging.WARNING):
        path = write_vqav2_submission(tmp_path / "s.json", questions[:3], answers, on_bad_record="skip")
    assert len(json.loads(path.read_text())) == 3 and "skipped 1 bad record" in caplog.text
    # EvalAI's ids are integers: another benchmark's question file is named, not a bare int() error
    renamed = [replace(questions[0], question_id="q-1"), *questions[1:]]
    with pytest.raises(ValueError, match=r"s\.json: question id 'q-1' \(question file line 1\) is not an integer"):
        write_vqav2_submission(tmp_path / "s.json", renamed, answers[1:])

