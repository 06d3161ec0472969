import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from lvlm_prune.evaluation.readers import (
    match_answers,
    mme_core_question,
    read_answers,
    read_caption_references,
    read_gqa_annotations,
    read_mmbench_tsv,
    read_mme_ground_truth,
    read_pope_label_dir,
    read_pope_labels,
    read_questions,
    read_scienceqa_problems,
    read_textvqa_annotations,
    read_vqa_annotations,
    textvqa_question,
)

FIXTURES = Path(__file__).parent / "fixtures"


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def question(question_id, image="a.jpg", text="What is it?"):
    record = {"question_id": question_id, "text": text}
    if image is not None:
        record["image"] = image
    return record


def test_reads_llava_question_jsonl_into_typed_records():
    loaded = read_questions(FIXTURES / "gqa" / "llava_gqa_testdev_balanced.jsonl")
    assert len(loaded) == 5 and loaded.skipped == ()
    first = next(iter(loaded))
    assert first.question_id == "201307251" and first.image == "n161313.jpg" and first.line == 1
    assert first.text.startswith("Is it overcast?\nAnswer")
    assert list(loaded.records)[:2] == ["201307251", "201640614"]


def test_reads_llava_conversation_json_without_placeholder():
    loaded = read_questions(FIXTURES / "scienceqa" / "llava_test_CQM-A.json", require_image=False)
    records = loaded.records
    assert set(records) == {"4", "5", "8", "12"}
    assert records["4"].image == "4/image.png" and records["4"].text.startswith("Context: N/A")
    assert records["5"].image is None


def test_mme_ids_repeat_so_records_are_keyed_by_text(tmp_path):
    path = FIXTURES / "mme" / "llava_mme.jsonl"
    loaded = read_questions(path, key_by_text=True)
    assert len(loaded) == 6 and loaded.records[("artwork/10002.jpg", next(iter(loaded)).text)].category == "artwork"
    with pytest.raises(ValueError, match=r"llava_mme.jsonl: line 2: question id 'artwork/10002.jpg' appears twice"):
        read_questions(path)


def test_question_id_twice_is_an_error_naming_id_and_file(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [question(7), question(8), question(7)])
    with pytest.raises(ValueError, match=r"q.jsonl: line 3: question id 7 appears twice \(first at line 1\)"):
        read_questions(path)


def test_missing_fields_name_line_and_file(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [question(1), {"question_id": 2, "image": "b.jpg"}])
    with pytest.raises(ValueError, match=r"q.jsonl: line 2: missing field\(s\) \['text'\]"):
        read_questions(path)


def test_invalid_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [question(1), '{"question_id": 2,'])
    with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
        read_questions(path)


def test_malformed_json_question_file_names_the_file(tmp_path):
    path = tmp_path / "llava_test.json"
    path.write_text('[{"id": "1",', encoding="utf-8")
    with pytest.raises(ValueError, match=r"llava_test.json: not valid JSON"):
        read_questions(path)


def test_record_without_image_is_bad_unless_images_are_optional(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [question(1), question(2, image=None)])
    with pytest.raises(ValueError, match=r"line 2: question 2 has no image"):
        read_questions(path)
    assert len(read_questions(path, require_image=False)) == 2


def test_placeholder_without_image_is_bad(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [question(1, image=None, text="<image>\nWhat is it?")])
    with pytest.raises(ValueError, match=r"q\.jsonl: line 1: text has 1 <image> placeholder\(s\) for image None"):
        read_questions(path, require_image=False)
    doubled = write_jsonl(tmp_path / "d.jsonl", [question(1, text="<image>\n<image>\nWhat is it?")])
    with pytest.raises(ValueError, match=r"d\.jsonl: line 1: text has 2 <image> placeholder\(s\) for image '"):
        read_questions(doubled)
    single = write_jsonl(tmp_path / "s.jsonl", [question(1, text="<image>\nWhat is it?")])  # the one LLaVA writes
    assert [q.text for q in read_questions(single, verify_images=False).records.values()] == ["What is it?"]


def test_a_category_that_is_not_a_string_is_bad(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [question(1) | {"category": "color"}, question(2) | {"category": ["a"]}])
    with pytest.raises(ValueError, match=r"line 2: category must be a string, got \['a'\]"):
        read_questions(path)
    assert [q.category for q in read_questions(path, on_bad_record="skip")] == ["color"]


def test_an_answer_whose_prompt_is_not_a_string_is_bad(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "red", "prompt": "What colour?"},
                                              {"question_id": 2, "text": "blue", "prompt": None}])
    with pytest.raises(ValueError, match=r"line 2: prompt must be a string when present, got None"):
        read_answers(path)


def test_conversation_record_with_image_but_without_placeholder_is_bad(tmp_path):
    records = [
        {"id": "1", "image": "1/image.png", "conversations": [{"from": "human", "value": "<image>\nQuestion?"}]},
        {"id": "2", "image": "2/image.png", "conversations": [{"from": "human", "value": "Question?"}]},
    ]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(ValueError, match=r"q.json: record 2: image '2/image.png' but 0 <image>"):
        read_questions(path)
    assert list(read_questions(path, on_bad_record="skip").records) == ["1"]


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(root / "good.png")
    (root / "broken.jpg").write_bytes(b"not an image at all")
    return root


def test_missing_image_is_an_error(tmp_path, image_folder):
    path = write_jsonl(tmp_path / "q.jsonl", [question(1, "good.png"), question(2, "absent.jpg")])
    with pytest.raises(ValueError, match=r"line 2: image file not found: .*absent.jpg"):
        read_questions(path, image_root=image_folder)


def test_unreadable_image_is_an_error(tmp_path, image_folder):
    path = write_jsonl(tmp_path / "q.jsonl", [question(1, "broken.jpg")])
    with pytest.raises(ValueError, match=r"line 1: image file unreadable: .*broken.jpg"):
        read_questions(path, image_root=image_folder)
    assert len(read_questions(path, image_root=image_folder, verify_images=False)) == 1


def test_skip_counts_and_logs_bad_records(tmp_path, image_folder, caplog):
    path = write_jsonl(
        tmp_path / "q.jsonl",
        [question(1, "good.png"), question(2, "absent.jpg"), question(3, "broken.jpg"), question(1, "good.png")],
    )
    with caplog.at_level(logging.WARNING, logger="lvlm_prune.evaluation.readers"):
        loaded = read_questions(path, image_root=image_folder, on_bad_record="skip")
    assert list(loaded.records) == ["1"] and len(loaded.skipped) == 3 and loaded.num_read == 4
    assert "skipped 3 bad record(s)" in caplog.text and "q.jsonl" in caplog.text


def test_on_bad_record_must_be_known(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [question(1)])
    with pytest.raises(ValueError, match="on_bad_record must be one of"):
        read_questions(path, on_bad_record="ignore")


def test_reads_answers_and_rejects_duplicates_and_missing_text(tmp_path):
    loaded = read_answers(FIXTURES / "gqa" / "answers.jsonl")
    answer = loaded.records["201307251"]
    assert answer.text == "No." and answer.model_id == "llava-v1.5-7b" and answer.extra == {"metadata": {}}
    duplicate = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "x"}, {"question_id": 1, "text": "y"}])
    with pytest.raises(ValueError, match=r"a.jsonl: line 2: question id 1 appears twice"):
        read_answers(duplicate)
    no_text = write_jsonl(tmp_path / "b.jsonl", [{"question_id": 1, "prompt": "q"}])
    with pytest.raises(ValueError, match=r"b.jsonl: line 1: missing field\(s\) \['text'\]"):
        read_answers(no_text)


def test_answer_file_with_missing_ids_lists_count_and_ids(tmp_path, caplog):
    questions = read_questions(write_jsonl(tmp_path / "q.jsonl", [question(i) for i in range(1, 6)]))
    answers = read_answers(write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": "x"} for i in (1, 2, 5)]))
    expected = r"2 of 5 questions of .*q.jsonl have no answer in .*a.jsonl \(e.g. '3', '4'\)"
    with pytest.raises(ValueError, match=expected):
        match_answers(questions, answers)
    with caplog.at_level(logging.WARNING):
        matched = match_answers(questions, answers, on_bad_record="skip")
    assert [q.question_id for q, _ in matched.pairs] == [1, 2, 5] and matched.missing == ("3", "4")
    assert "have no answer" in caplog.text


def test_pairs_follow_the_question_file_and_text_keys_ignore_the_image_placeholder(tmp_path):
    questions = read_questions(write_jsonl(tmp_path / "q.jsonl", [question(1, text="Q1?"), question(2, text="Q2?")]),
                               key_by_text=True)
    records = [{"question_id": 2, "prompt": "<image>\nQ2?", "text": "b"},
               {"question_id": 1, "prompt": "Q1?", "text": "a"}]
    answers = read_answers(write_jsonl(tmp_path / "a.jsonl", records), key_by_text=True)
    pairs = match_answers(questions, answers).pairs
    assert [(q.question_id, a.text) for q, a in pairs] == [(1, "a"), (2, "b")]


def test_answers_for_unknown_questions_are_an_error(tmp_path):
    questions = read_questions(write_jsonl(tmp_path / "q.jsonl", [question(1)]))
    records = [{"question_id": 1, "text": "x"}, {"question_id": 9, "text": "y"}]
    answers = read_answers(write_jsonl(tmp_path / "a.jsonl", records))
    with pytest.raises(ValueError, match=r"1 answers in .*a.jsonl are for questions not in .*q.jsonl \(e.g. '9'\)"):
        match_answers(questions, answers)


def test_annotation_readers_parse_the_official_formats():
    gqa = read_gqa_annotations(FIXTURES / "gqa" / "testdev_balanced_questions.json")
    assert gqa["201307251"].answer == "no" and gqa["201307251"].structural_type == "verify"
    pope = read_pope_label_dir(FIXTURES / "pope")
    assert sorted(pope) == ["adversarial", "popular", "random"] and [x.label for x in pope["popular"]] == ["yes", "no"]
    mme = read_mme_ground_truth(FIXTURES / "mme" / "eval_tool")
    assert mme[("artwork", "10002.jpg", "Does this artwork exist in the form of painting?")] == "yes"
    sqa = read_scienceqa_problems(FIXTURES / "scienceqa" / "problems.json")
    assert sqa["12"].answer == 3 and len(sqa["12"].choices) == 4 and sqa["12"].has_image and not sqa["5"].has_image
    vqa = read_vqa_annotations(FIXTURES / "vqav2" / "v2_mscoco_val2014_annotations.json")
    assert len(vqa["262148001"].answers) == 10 and vqa["262148001"].answer_type == "number"
    textvqa = read_vqa_annotations(FIXTURES / "textvqa" / "TextVQA_0.5.1_val.json")
    assert textvqa["34602"].answers[-1] == "Dakota" and textvqa["34602"].answer_type is None
    texts = read_textvqa_annotations(FIXTURES / "textvqa" / "TextVQA_0.5.1_val.json")
    prompt = "what color is the camera?\nReference OCR token: dakota, digital\nAnswer the question using a single word."
    assert texts.find("003a8ae2ef43b901", prompt).answers[0] == "black"  # LLaVA: the image id, then the question
    assert texts.find("003a8ae2ef43b901", "What is the brand of this camera?\nAnswer.").answers[-1] == "Dakota"
    assert texts.find(34602, "anything").answers[-1] == "Dakota"  # TextVQA's own question id
    assert texts.find("003a8ae2ef43b901", "what is this?\nAnswer.") is None
    captions = read_caption_references(FIXTURES / "flickr30k" / "flickr30k_test_captions.json")
    assert captions["10002456"] == ["A dog!", "a dog"]


def test_mmbench_tsv_options_answers_and_rotation_groups():
    loaded = read_mmbench_tsv(FIXTURES / "mmbench" / "mmbench_dev_en.tsv")
    assert len(loaded) == 6
    first, second = loaded.records["0"], loaded.records["1"]
    assert first.options == ("beach", "forest", "desert", "city") and first.answer == "A" and first.hint is None
    assert second.options == ("yes", "no") and second.hint == "The sign is at a crossing."
    assert loaded.records["3000000"].base_index == 0 and loaded.records["1000001"].base_index == 1


def test_mmbench_options_and_hints_reading_none_are_absent_as_in_llava(tmp_path):
    path = tmp_path / "mm.tsv"
    path.write_text("index\tquestion\thint\tA\tB\tC\tanswer\n0\tQ?\tNone\tx\ty\tnone\tA\n", encoding="utf-8")
    row = read_mmbench_tsv(path).records["0"]
    assert row.options == ("x", "y") and row.hint is None


def test_mmbench_options_stop_at_the_first_empty_column_and_nan_cells_are_missing(tmp_path):
    path = tmp_path / "mm.tsv"
    path.write_text("index\tquestion\tA\tB\tC\tD\tanswer\tcategory\n0\tQ?\tx\ty\t\tz\tnan\tnan\n", encoding="utf-8")
    row = read_mmbench_tsv(path).records["0"]
    assert row.options == ("x", "y") and row.answer is None and row.category is None


def test_mmbench_bad_rows(tmp_path):
    header = "index\tquestion\tA\tB\tanswer\tcategory\n"
    path = tmp_path / "mm.tsv"
    path.write_text(header + "0\tQ?\tx\ty\tC\tocr\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mm.tsv: line 2: answer 'C' is not one of the 2 option letters"):
        read_mmbench_tsv(path)
    path.write_text(header + "0\tQ?\tx\ty\tAB\tocr\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: answer 'AB' is not one of the 2 option letters"):
        read_mmbench_tsv(path)
    path.write_text(header + "0\tQ?\tx\ty\tA\tocr\n0\tQ?\tx\ty\tB\tocr\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 3: index 0 appears twice"):
        read_mmbench_tsv(path)
    assert len(read_mmbench_tsv(path, on_bad_record="skip")) == 1


def test_annotation_readers_reject_malformed_files(tmp_path):
    bad_gqa = tmp_path / "gqa.json"
    bad_gqa.write_text(json.dumps({"1": {"question": "q"}}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"question '1' has no string 'answer'"):
        read_gqa_annotations(bad_gqa)
    bad_label = {"question_id": 1, "image": "a", "text": "q", "label": "maybe"}
    bad_pope = write_jsonl(tmp_path / "coco_pope_random.json", [bad_label])
    with pytest.raises(ValueError, match=r"label must be 'yes' or 'no'"):
        read_pope_labels(bad_pope)
    bad_sqa = tmp_path / "problems.json"
    bad_sqa.write_text(json.dumps({"4": {"choices": ["a", "b"], "answer": 2}}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"problem '4' needs"):
        read_scienceqa_problems(bad_sqa)
    bad_vqa = tmp_path / "vqa.json"
    bad_vqa.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": []}]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"entry 0 needs a question_id and a non-empty answers list"):
        read_vqa_annotations(bad_vqa)
    gt_folder = tmp_path / "gt"
    gt_folder.mkdir()
    (gt_folder / "color.txt").write_text("1.jpg\tIs it red?\tperhaps\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"color.txt: line 1"):
        read_mme_ground_truth(gt_folder)
    with pytest.raises(ValueError, match="COCO-style"):
        read_caption_references(bad_gqa)


def test_annotation_entries_without_their_answer_text_name_file_and_entry(tmp_path):
    vqa = tmp_path / "vqa.json"
    vqa.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "yes"}]},
                                               {"question_id": 2, "answers": [{"answer_id": 1}]}]}))
    with pytest.raises(ValueError, match=r"vqa.json: entry 1: answers must be strings or \{'answer': str\}"):
        read_vqa_annotations(vqa)
    karpathy = tmp_path / "captions.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "a.jpg", "sentences": [{"raw": "a dog"}]},
                                               {"filename": "b.jpg", "sentences": [{"tokens": ["a", "cat"]}]}]}))
    with pytest.raises(ValueError, match=r"captions.json: image 1: sentences must be strings or \{'raw': str\}"):
        read_caption_references(karpathy)
    karpathy.write_text(json.dumps({"images": [7]}))
    with pytest.raises(ValueError, match=r"captions.json: image 0 needs a filename and a non-empty sentences list"):
        read_caption_references(karpathy)


def test_a_line_that_is_not_utf8_is_a_bad_record_naming_file_and_line(tmp_path):
    latin1 = b'{"question_id": 2, "text": "caf\xe9"}'
    lines = [json.dumps(question(1)).encode(), latin1, json.dumps(question(3)).encode()]
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=r"q.jsonl: line 2: not valid UTF-8 \(byte 0xe9 at column 32\)"):
        read_questions(path, require_image=False)
    loaded = read_questions(path, require_image=False, on_bad_record="skip")
    assert list(loaded.records) == ["1", "3"]
    assert loaded.skipped == ("line 2: not valid UTF-8 (byte 0xe9 at column 32)",)
    answers = tmp_path / "a.jsonl"
    answers.write_bytes(b'{"question_id": 1, "text": "ja"}\n{"question_id": 2, "text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl: line 2: not valid UTF-8 \(byte 0xff"):
        read_answers(answers)
    assert list(read_answers(answers, on_bad_record="skip").records) == ["1"]


def test_whole_file_formats_that_are_not_utf8_name_file_and_line(tmp_path):
    (tmp_path / "problems.json").write_bytes(b'{\n "1": {"answer": 0,\n "choices": ["caf\xe9"]}}')
    with pytest.raises(ValueError, match=r"problems.json: line 3: not valid UTF-8 \(byte 0xe9 at column 18\)"):
        read_scienceqa_problems(tmp_path / "problems.json")
    (tmp_path / "mme").mkdir()
    (tmp_path / "mme" / "artwork.txt").write_bytes(b"a.jpg\tIs it?\tYes\nb.jpg\tCaf\xe9?\tNo\n")
    with pytest.raises(ValueError, match=r"artwork.txt: line 2: not valid UTF-8"):
        read_mme_ground_truth(tmp_path / "mme")
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_bytes(b"index\tquestion\tA\tB\n0\twhat?\tred\tblue\n1\tcaf\xe9?\tred\tblue\n")
    with pytest.raises(ValueError, match=r"mmbench.tsv: line 3: not valid UTF-8"):
        read_mmbench_tsv(tsv)


def test_image_check_decodes_the_whole_image(tmp_path, image_folder):
    pixels = bytes(i * 7919 % 256 for i in range(32 * 32 * 3))  # busy enough that half the file is past the headers
    Image.frombytes("RGB", (32, 32), pixels).save(image_folder / "cut.jpg", quality=95)
    data = (image_folder / "cut.jpg").read_bytes()
    (image_folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(image_folder / "cut.jpg") as opened:
        opened.verify()  # PIL's own check passes a JPEG cut short
    path = write_jsonl(tmp_path / "q.jsonl", [question(1, "good.png"), question(2, "cut.jpg")])
    with pytest.raises(ValueError, match=r"line 2: image file unreadable: .*cut.jpg \(OSError: image file is trunc"):
        read_questions(path, image_root=image_folder)


def test_mme_ground_truth_ignores_a_prediction_column_and_questions_lose_their_instructions(tmp_path):
    (tmp_path / "artwork.txt").write_text("a.jpg\tIs it red?\tYes\tNo\n", encoding="utf-8")
    assert read_mme_ground_truth(tmp_path) == {("artwork", "a.jpg", "Is it red?"): "yes"}
    both = "Is it red? Please answer yes or no. Answer the question using a single word or phrase."
    assert mme_core_question(both) == "Is it red?"
    assert mme_core_question("Is  it\nred?\nPlease answer yes or no.") == "Is it red?"


def test_textvqa_question_follows_llava_prompt_formats():
    assert textvqa_question("<image>\nWhat Is It?\nReference OCR token: a\nAnswer briefly.") == "what is it?"
    assert textvqa_question("What is it?\nAnswer briefly.") == "what is it?"
    assert textvqa_question("OCR tokens: a, b Question: What is it? Short answer:") == "what is it?"
    # OCR tokens first: LLaVA's evaluation takes the second line
    assert textvqa_question("<image>\nReference OCR token: a, b\nWhat Is It?\nAnswer briefly.") == "what is it?"
    # ... only when the prompt has exactly three lines
    assert textvqa_question("Reference OCR token: a\nWhat is it?\nAnswer.\nMore.") == "reference ocr token: a"
