"""datamodules/llava_export.py on a three-question split: the records it writes, an export complete or absent."""

import json

import pytest
from PIL import Image

from datamodules.llava_export import export_split
from datamodules.synthetic import SyntheticVQADataModule


@pytest.fixture(scope="module")
def data():
    return SyntheticVQADataModule(num_train=2, num_val=2, num_test=3)


def test_the_export_writes_one_question_one_instruction_and_one_image_per_sample(data, tmp_path):
    samples = list(data.samples("test"))
    export_split(data, "test", tmp_path)
    questions = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert questions == [{"question_id": s.question_id, "image": f"{s.question_id}.png", "text": s.question,
                          "category": s.family, "answer": s.answer} for s in samples]
    assert json.loads((tmp_path / "instructions.json").read_text()) == [
        {"id": s.question_id, "image": f"{s.question_id}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{s.question}"}, {"from": "gpt", "value": s.answer}]}
        for s in samples]
    side = data.config.grid * data.config.cell_size
    for sample in samples:
        assert Image.open(tmp_path / "images" / f"{sample.question_id}.png").size == (side, side)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "instructions.json", "questions.jsonl"]


def test_an_export_interrupted_before_its_question_file_is_made_again_in_place(data, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "partial.png").write_bytes(b"cut short")
    export_split(data, "test", tmp_path)
    assert len((tmp_path / "questions.jsonl").read_text().splitlines()) == 3


def test_an_export_that_fails_writing_the_instructions_leaves_no_question_file(data, tmp_path):
    (tmp_path / "instructions.json").mkdir()  # writing the instruction file fails
    with pytest.raises(IsADirectoryError):
        export_split(data, "test", tmp_path)
    assert not (tmp_path / "questions.jsonl").exists()  # its presence is what marks a finished export
