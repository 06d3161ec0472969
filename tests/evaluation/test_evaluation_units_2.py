"""Scoring rules and DDP state reductions of the evaluation metrics that the other evaluation tests leave open."""

import json
import math
from pathlib import Path

import pytest

from lvlm_prune.evaluation.export import (
    answer_id_for,
    score_answer_file,
    write_answers_jsonl,
    write_llava_answers,
    write_vqav2_submission,
)
from lvlm_prune.evaluation.metrics import (
    CiderDCorpus,
    ExactMatchAccuracy,
    GQAAccuracy,
    MMBenchCircularAccuracy,
    MMEScore,
    POPEMetrics,
    VQASoftAccuracy,
)
from lvlm_prune.evaluation.readers import AnswerRecord, QuestionRecord

FIXTURES = Path(__file__).parent / "fixtures"


def as_floats(result):
    return {key: float(value) for key, value in result.items()}


def test_exact_match_category_counts_add_up_when_both_ranks_score_one_category():
    rank0, rank1 = ExactMatchAccuracy(categories=["color", "count"]), ExactMatchAccuracy(categories=["color", "count"])
    rank0.update(["red", "blue"], ["red", "red"], ["color", "color"])
    rank1.update(["red"], ["red"], ["color"])
    rank0.merge_state(rank1)
    result = as_floats(rank0.compute())
    # color: 2 right of 3 over both ranks (a max-reduced count would give 2 of 2)
    assert result["acc"] == pytest.approx(2 / 3) and result["acc/color"] == pytest.approx(2 / 3)
    assert math.isnan(result["acc/count"])


def test_pope_counts_add_up_across_ranks():
    rank0, rank1 = POPEMetrics(splits=["random"]), POPEMetrics(splits=["random"])
    rank0.update(["yes", "yes"], ["yes", "no"], ["random"] * 2)  # TP 1, FP 1
    rank1.update(["yes", "no"], ["yes", "no"], ["random"] * 2)  # TP 1, TN 1
    rank0.merge_state(rank1)
    result = as_floats(rank0.compute())
    # TP 2, FP 1, TN 1, FN 0 -> acc 3/4, precision 2/3, recall 1, F1 4/5, yes ratio 3/4
    assert result["random/acc"] == pytest.approx(3 / 4) and result["random/precision"] == pytest.approx(2 / 3)
    assert result["random/recall"] == 1.0 and result["random/f1"] == pytest.approx(4 / 5)
    assert result["random/yes_ratio"] == pytest.approx(3 / 4)


def test_pope_means_skip_splits_without_items_and_those_splits_are_nan():
    metric = POPEMetrics(splits=["random", "popular"])
    metric.update(["yes", "no"], ["yes", "yes"], ["random"] * 2)  # TP 1, FN 1
    result = as_floats(metric.compute())
    # random: acc 1/2, precision 1, recall 1/2, F1 2/3; popular has no item: nan, and left out of the means
    assert result["acc"] == 0.5 and result["f1"] == pytest.approx(2 / 3)
    assert all(math.isnan(result[f"popular/{name}"]) for name in ("acc", "precision", "recall", "f1", "yes_ratio"))


def test_vqav2_prediction_goes_through_the_m4c_upload_conversion_first():
    # LLaVA's upload deletes the comma ("red,blue" -> "redblue"); the VQA script alone would make it "red blue"
    metric = VQASoftAccuracy(target_normalization="punctuation")
    metric.update(["red,blue"], [["red blue"] * 10])
    assert float(metric.compute()["acc"]) == 0.0
    matching = VQASoftAccuracy(target_normalization="punctuation")
    matching.update(["red,blue"], [["redblue"] * 10])
    assert float(matching.compute()["acc"]) == 1.0


def test_gqa_keeps_surrounding_spaces_of_the_prediction_as_llava_converts_it():
    predictions, targets = [" yes", "no. ", "Table."], ["yes", "no", "table"]
    gqa, exact = GQAAccuracy(), ExactMatchAccuracy()
    gqa.update(predictions, targets)
    exact.update(predictions, targets)
    # gqa_prediction only strips trailing periods and lowercases: " yes" and "no. " stay wrong
    assert float(gqa.compute()["acc"]) == pytest.approx(1 / 3)
    assert float(exact.compute()["acc"]) == 1.0


def test_mme_ground_truth_is_stripped_before_checking_and_comparing():
    metric = MMEScore()
    metric.update(["Yes", "no"], [" Yes\n", "No "], ["color", "color"], ["a.jpg", "a.jpg"])
    result = as_floats(metric.compute())
    assert result["color/acc"] == 100.0 and result["color/acc_plus"] == 100.0 and result["color/score"] == 200.0


def test_mmbench_vanilla_accuracy_leaves_out_the_first_rotation_at_index_one_million():
    metric = MMBenchCircularAccuracy()
    metric.update(["A", "A"], ["A", "B"], [0, 1_000_000], [["x", "y"], ["y", "x"]])
    # index 1000000 is question 0's first rotation (answered wrong), not an original row
    assert as_floats(metric.compute()) == {"acc": 0.0, "acc/vanilla": 1.0}


def test_mmbench_questions_below_one_million_apart_are_separate_groups():
    metric = MMBenchCircularAccuracy()
    metric.update(["A", "A"], ["A", "B"], [5, 100_005], [["x", "y"]] * 2)
    # two original rows (both < 1e6): question 5 right, question 100005 wrong
    assert as_floats(metric.compute()) == {"acc": 0.5, "acc/vanilla": 0.5}


def test_cider_document_frequency_counts_each_image_once_over_all_its_references():
    corpus = CiderDCorpus({"cat": ["a cat", "the black cat"], "dog": ["a dog", "a dog"]})
    # "black" only in cat's second reference; "cat" in both of cat's references, "a" in both images
    assert corpus.document_frequency[("black",)] == 1 and corpus.document_frequency[("black", "cat")] == 1
    assert corpus.document_frequency[("cat",)] == 1 and corpus.document_frequency[("a",)] == 2


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_gqa_scores_without_per_type_accuracy_when_a_question_has_no_structural_type(tmp_path):
    annotation = tmp_path / "testdev_balanced_questions.json"
    annotation.write_text(json.dumps({
        "1": {"answer": "no", "types": {"structural": "verify"}},
        "2": {"answer": "table", "types": {}},
    }))
    questions = _write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": "1", "image": "a.jpg", "text": "Is it overcast?"},
        {"question_id": "2", "image": "b.jpg", "text": "What is it?"},
    ])
    answers = _write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": "1", "prompt": "Is it overcast?", "text": "No."},
        {"question_id": "2", "prompt": "What is it?", "text": "chair"},
    ])
    result = score_answer_file("gqa", questions, answers, annotation)
    assert result == {"acc": 0.5, "num_scored": 2.0, "num_skipped": 0.0}


def test_pope_question_without_category_is_not_matched_when_the_labels_have_several_splits(tmp_path):
    records = [json.loads(line) for line in (FIXTURES / "pope" / "llava_pope_test.jsonl").read_text().splitlines()]
    assert records[0]["question_id"] == 1 and records[0]["category"] == "adversarial"
    del records[0]["category"]
    questions = _write_jsonl(tmp_path / "q.jsonl", records)
    answers = FIXTURES / "pope" / "answers.jsonl"
    with pytest.raises(ValueError, match="no POPE label for question 1"):
        score_answer_file("pope", questions, answers, FIXTURES / "pope")
    result = score_answer_file("pope", questions, answers, FIXTURES / "pope", on_bad_record="skip")
    assert result["num_scored"] == len(records) - 1 and result["num_skipped"] == 1


def test_pope_labels_match_questions_by_image_file_name_whatever_their_folders(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    _write_jsonl(labels / "coco_pope_random.json", [
        {"question_id": 7, "image": "val2014/COCO_1.jpg", "text": "Is there a cat in the image?", "label": "yes"},
    ])
    prompt = "Is there a cat in the image?\nAnswer the question using a single word or phrase."
    questions = _write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "image": "coco/COCO_1.jpg", "text": prompt, "category": "random"},
    ])
    answers = _write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "prompt": prompt, "text": "Yes."}])
    result = score_answer_file("pope", questions, answers, labels)
    assert result["random/acc"] == 1.0 and result["random/yes_ratio"] == 1.0 and result["num_scored"] == 1.0


def test_mme_groups_questions_for_accuracy_plus_by_their_image_not_their_id(tmp_path):
    texts = ["Is the car red? Please answer yes or no.", "Is the car blue? Please answer yes or no."]
    questions = _write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": f"q{i}", "image": "color/1.jpg", "text": text, "category": "color", "answer": truth}
        for i, (text, truth) in enumerate(zip(texts, ["Yes", "No"]))
    ])
    answers = _write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": f"q{i}", "prompt": text, "text": "Yes"} for i, text in enumerate(texts)
    ])
    result = score_answer_file("mme", questions, answers)
    # one image, one of its two questions right: acc 50, acc+ 0
    assert result["color/acc"] == 50.0 and result["color/acc_plus"] == 0.0 and result["num_scored"] == 2.0


def _vqav2_files(tmp_path, annotations, predictions):
    annotation = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotation.write_text(json.dumps({"annotations": annotations}))
    prompts = [f"Question {i}?" for i in range(len(predictions))]
    questions = _write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": entry["question_id"], "image": "a.jpg", "text": prompt}
        for entry, prompt in zip(annotations, prompts)
    ])
    answers = _write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": entry["question_id"], "prompt": prompt, "text": prediction}
        for entry, prompt, prediction in zip(annotations, prompts, predictions)
    ])
    return questions, answers, annotation


def test_vqav2_scores_without_per_type_accuracy_when_an_annotation_has_no_answer_type(tmp_path):
    annotations = [
        {"question_id": 1, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10},
        {"question_id": 2, "answers": [{"answer": "red"}] * 10},
    ]
    result = score_answer_file("vqav2", *_vqav2_files(tmp_path, annotations, ["Yes", "blue"]))
    assert result == {"acc": 0.5, "num_scored": 2.0, "num_skipped": 0.0}


def test_vqav2_scorer_keeps_the_articles_of_agreeing_human_answers(tmp_path):
    annotations = [{"question_id": 1, "answer_type": "other", "answers": [{"answer": "the red one"}] * 10}]
    result = score_answer_file("vqav2", *_vqav2_files(tmp_path, annotations, ["red one"]))
    # the official VQAv2 script leaves "the" in ten agreeing human answers; TextVQA's m4c evaluator would not
    assert result["acc"] == 0.0 and result["acc/other"] == 0.0


def test_answers_jsonl_keeps_given_answer_ids_extra_fields_and_both_prompts_of_one_id(tmp_path):
    answers = [
        AnswerRecord(question_id="artwork/1.jpg", text="Yes", prompt="Is it a painting?", answer_id="given",
                     model_id="m", extra={"round": 2}),
        AnswerRecord(question_id="artwork/1.jpg", text="No", prompt="Is it a photo?", model_id="m"),
    ]
    path = write_answers_jsonl(tmp_path / "answers.jsonl", answers)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"question_id": "artwork/1.jpg", "prompt": "Is it a painting?", "text": "Yes",
                        "answer_id": "given", "model_id": "m", "metadata": {}, "round": 2}
    assert lines[1]["answer_id"] == answer_id_for("artwork/1.jpg", "Is it a photo?") and lines[1]["text"] == "No"


def test_llava_answers_carry_the_prediction_prompt_and_model_id(tmp_path):
    questions = [QuestionRecord(question_id=3, text="What color?"), QuestionRecord(question_id=4, text="How many?")]
    path = write_llava_answers(tmp_path / "a.jsonl", questions, ["red", "two"], model_id="tiny-llava")
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["question_id"], r["prompt"], r["text"], r["model_id"]) for r in lines] == [
        (3, "What color?", "red", "tiny-llava"), (4, "How many?", "two", "tiny-llava")]


def test_vqav2_submission_rejects_a_question_answered_twice(tmp_path):
    questions = [QuestionRecord(question_id=5, text="What?")]
    answers = [AnswerRecord(question_id=5, text="a"), AnswerRecord(question_id="5", text="b")]
    with pytest.raises(ValueError, match="question id '5' appears twice"):
        write_vqav2_submission(tmp_path / "s.json", questions, answers)


def test_flickr30k_image_captioned_twice_is_a_bad_record_every_time(tmp_path):
    annotation = tmp_path / "dataset_flickr30k.json"
    annotation.write_text(json.dumps({"images": [
        {"filename": "1.jpg", "sentences": [{"raw": "A cat."}, {"raw": "a cat"}]},
        {"filename": "2.jpg", "sentences": [{"raw": "A dog!"}, {"raw": "a dog"}]},
    ]}))
    prompt = "Provide a one-sentence caption for the provided image."
    questions = _write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": i, "image": image, "text": prompt} for i, image in ((1, "1.jpg"), (2, "2.jpg"), (3, "1.jpg"),
                                                                           (4, "1.jpg"))
    ])
    answers = _write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": i, "prompt": prompt, "text": text} for i, text in ((1, "a cat"), (2, "a dog"), (3, "a dog"),
                                                                           (4, "a dog"))
    ])
    with pytest.raises(ValueError, match=r"image '1\.jpg' is captioned twice \(question 3\)"):
        score_answer_file("flickr30k", questions, answers, annotation)
    result = score_answer_file("flickr30k", questions, answers, annotation, on_bad_record="skip")
    # questions 3 and 4 both repeat image 1 and are left out; "a cat" and "a dog" equal their references: 5 each
    assert result == pytest.approx({"cider_d": 5.0, "num_scored": 2.0, "num_skipped": 2.0})
