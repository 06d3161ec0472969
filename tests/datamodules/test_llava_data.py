"""LLaVA-format datamodules: batches equal the in-memory synthetic path, multi-turn labels, length grouping,
benchmark annotations, and every kind of bad input."""

import base64
import io
import json
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from PIL import Image

from datamodules.llava import (
    LETTER_PROMPT,
    LengthGroupedSampler,
    LlavaInstructionDataModule,
    LlavaQuestionsDataModule,
    expand_to_square,
)
from datamodules.synthetic import SyntheticVQADataModule
from lightning_modules.common import prediction_records
from lvlm_prune.data import IGNORE_INDEX, VQAExample
from lvlm_prune.evaluation.export import score_answer_file, write_answers_jsonl
from lvlm_prune.evaluation.readers import AnswerRecord, read_questions, read_textvqa_annotations, read_vqa_annotations

EVAL_FIXTURES = Path(__file__).parents[1] / "evaluation" / "fixtures"
BATCH = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The small synthetic benchmark, its processor saved to a folder, and its splits exported as LLaVA files."""
    root = tmp_path_factory.mktemp("llava_export")
    synthetic = SyntheticVQADataModule(num_train=24, num_val=8, num_test=16, batch_size=BATCH,
                                       eval_batch_size=BATCH)
    synthetic.processor.save_pretrained(root / "processor")
    splits = {split: synthetic.export_llava_format(split, root / split) for split in ("train", "val", "test")}
    return SimpleNamespace(synthetic=synthetic, root=root, processor=str(root / "processor"), **splits)


def instruction_data(exported, train_file=None, **kwargs):
    kwargs.setdefault("template", "tiny")
    kwargs.setdefault("batch_size", BATCH)
    kwargs.setdefault("eval_batch_size", BATCH)
    kwargs.setdefault("num_workers", 0)
    return LlavaInstructionDataModule(
        train_file=str(train_file or exported.train / "instructions.json"),
        image_root=str(exported.train / "images"), processor_path=exported.processor, **kwargs)


def questions_data(exported, question_file, image_root, **kwargs):
    kwargs.setdefault("template", "tiny")
    kwargs.setdefault("eval_batch_size", BATCH)
    kwargs.setdefault("num_workers", 0)
    return LlavaQuestionsDataModule(str(question_file), None if image_root is None else str(image_root),
                                    exported.processor, **kwargs)


def assert_same_batch(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.allclose(actual[key], value), key
        elif torch.is_tensor(value):
            assert torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


def test_training_batches_equal_the_synthetic_path(exported):
    data = instruction_data(exported)
    data.setup("fit")
    loader = data.train_dataloader()
    order = list(loader.sampler)
    synthetic_examples = exported.synthetic.train_dataloader().dataset
    batches = list(loader)
    assert len(batches) == 24 // BATCH
    for number, batch in enumerate(batches):
        indices = order[number * BATCH : (number + 1) * BATCH]
        expected = exported.synthetic.collator([synthetic_examples[i] for i in indices])
        expected["categories"] = [""] * BATCH  # instruction records carry no category
        assert_same_batch(batch, expected)
        assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()


def assert_same_eval_batch(actual, expected, number):
    """The synthetic batch + each question's position in the question file and its text (for the answer file)."""
    assert actual.pop("dataset_indices") == list(range(number * BATCH, (number + 1) * BATCH))
    assert actual.pop("prompts") == expected["questions"]
    assert_same_batch(actual, expected)


def test_eval_batches_equal_the_synthetic_path(exported):
    data = instruction_data(exported, val_question_file=str(exported.val / "questions.jsonl"),
                            val_image_root=str(exported.val / "images"))
    assert data.categories == sorted(exported.synthetic.categories)
    pairs = zip(data.val_dataloader(), exported.synthetic.val_dataloader(), strict=True)
    for number, (actual, expected) in enumerate(pairs):
        assert_same_eval_batch(actual, expected, number)

    questions = questions_data(exported, exported.test / "questions.jsonl", exported.test / "images")
    assert questions.categories == sorted(exported.synthetic.categories)
    loaders = (questions.test_dataloader(), exported.synthetic.test_dataloader())
    assert len(loaders[0]) == 16 // BATCH
    for number, (actual, expected) in enumerate(zip(*loaders, strict=True)):
        assert_same_eval_batch(actual, expected, number)
    predicted = next(iter(questions.predict_dataloader()))
    assert predicted["question_ids"] == next(iter(loaders[1]))["question_ids"]


def test_without_answers_the_batch_has_prompts_only(exported, tmp_path):
    lines = (exported.test / "questions.jsonl").read_text().splitlines()
    records = [{k: v for k, v in json.loads(line).items() if k != "answer"} for line in lines]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    batch = next(iter(questions_data(exported, path, exported.test / "images").test_dataloader()))
    assert batch["answers"] == [None] * BATCH and "labels" not in batch and "prompt_input_ids" in batch


def write_instructions(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def conversation(record_id, image, *turns, first_role="human"):
    roles = [first_role, "gpt" if first_role == "human" else "human"]
    return {"id": record_id, "image": image,
            "conversations": [{"from": roles[i % 2], "value": text} for i, text in enumerate(turns)]}


def test_multi_turn_labels_cover_every_gpt_turn(exported, tmp_path):
    samples = exported.synthetic.samples("train")
    turns = [(s.question, s.answer) for s in samples[:3]]
    image = f"{samples[0].question_id}.png"
    flat = [text for pair in turns for text in pair]
    first, *rest = flat
    records = [
        conversation("multi", image, f"<image>\n{first}", *rest),
        conversation("placeholder-last", image, f"{first}\n<image>", *rest),  # LLaVA moves it to the front
        conversation("single", f"{samples[3].question_id}.png", f"<image>\n{samples[3].question}", samples[3].answer),
    ]
    data = instruction_data(exported, write_instructions(tmp_path / "multi.json", records), group_by_length=False,
                            batch_size=3)
    examples = [data.train_dataloader().dataset[i] for i in range(3)]
    assert examples[0].extra_turns == tuple(turns[1:]) and examples[2].extra_turns == ()
    batch = data.collator(examples)

    reference = VQAExample("multi", examples[0].image, turns[0][0], turns[0][1], extra_turns=tuple(turns[1:]))
    expected = exported.synthetic.collator([reference])
    length = expected["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :length], expected["input_ids"][0])
    assert torch.equal(batch["labels"][0, :length], expected["labels"][0])
    assert torch.equal(batch["input_ids"][1], batch["input_ids"][0])

    tokenizer = exported.synthetic.processor.tokenizer
    labels = batch["labels"][0]
    supervised = (labels != IGNORE_INDEX).int()
    starts = ((supervised[1:] - supervised[:-1]) == 1).nonzero().squeeze(1) + 1
    assert len(starts) == 3  # one labelled run per gpt turn
    answer_tokens = [tokenizer(f" {answer}</s>", add_special_tokens=False)["input_ids"] for _, answer in turns]
    runs = [labels[start : start + len(tokens)].tolist() for start, tokens in zip(starts.tolist(), answer_tokens)]
    assert runs == answer_tokens
    assert int(supervised.sum()) == sum(len(tokens) for tokens in answer_tokens)


def test_length_grouped_sampler_is_deterministic_and_groups_lengths():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (203,), generator=generator).tolist()
    sampler = LengthGroupedSampler(lengths, group_size=8, seed=3, window_groups=5)
    first = list(sampler)
    assert sorted(first) == list(range(203)) and len(sampler) == 203
    assert list(LengthGroupedSampler(lengths, group_size=8, seed=3, window_groups=5)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(203))
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(LengthGroupedSampler(lengths, group_size=8, seed=4, window_groups=5)) != first

    groups = sampler.groups()
    assert all(len(g) == 8 for g in groups[:-1]) and len(groups[-1]) == 203 % 8  # short group last
    assert lengths.index(max(lengths)) in groups[0]  # an out-of-memory shows at step 1
    spread = sum(max(lengths[i] for i in g) - min(lengths[i] for i in g) for g in groups[:-1]) / (len(groups) - 1)
    random_groups = torch.randperm(200, generator=generator).view(-1, 8).tolist()
    random_spread = sum(max(lengths[i] for i in g) - min(lengths[i] for i in g) for g in random_groups) / 25
    assert spread < random_spread / 3


def test_lightning_sets_the_sampler_epoch(exported):
    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[list[str]] = []

        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.seen.append([])
            self.seen[-1] += batch["question_ids"]
            return (self.weight - batch["pixel_values"].mean()) ** 2

        def validation_step(self, batch, batch_idx):
            raise AssertionError("there is no validation file, so no validation batch")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = instruction_data(exported, seed=1)
    model = Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert len(model.seen) == 2 and model.seen[0] != model.seen[1]
    sampler = LengthGroupedSampler([r.length for r in data.train_records], BATCH, seed=1)
    for epoch, seen in enumerate(model.seen):
        sampler.set_epoch(epoch)
        assert seen == [data.train_records[i].question_id for i in sampler]


def test_subset_is_seeded_and_sized(exported):
    def subset(seed):
        data = instruction_data(exported, subset_size=10, subset_seed=seed)
        return [r.question_id for r in data.train_records]

    assert len(subset(0)) == 10 and subset(0) == subset(0) and set(subset(0)) != set(subset(1))
    assert subset(0) == sorted(subset(0))  # file order
    with pytest.raises(ValueError, match=r"instructions.json has 24 usable records; data.subset_size=20 with "
                                         r"data.val_size=5 needs 25"):
        _ = instruction_data(exported, subset_size=20, val_size=5).train_records


def test_val_size_holds_out_records_disjoint_from_training(exported):
    data = instruction_data(exported, subset_size=16, subset_seed=2, val_size=8)
    train_ids = [r.question_id for r in data.train_records]
    assert train_ids == [r.question_id for r in instruction_data(exported, subset_size=16, subset_seed=2).train_records]
    batch = next(iter(data.val_dataloader()))
    assert len(batch["question_ids"]) == 8 and not set(batch["question_ids"]) & set(train_ids)
    synthetic = {s.question_id: s for s in exported.synthetic.samples("train")}
    assert batch["answers"] == [synthetic[qid].answer for qid in batch["question_ids"]]
    assert "labels" in batch and data.categories == []
    with pytest.raises(ValueError, match=r"data.val_size=8: .* 0 when data.val_question_file is set"):
        instruction_data(exported, val_size=8, val_question_file=str(exported.val / "questions.jsonl"),
                         val_image_root=str(exported.val / "images"))


def test_expand_to_square_pads_with_the_mean_colour_like_llava():
    image = Image.new("RGB", (6, 4), (10, 20, 30))
    square = expand_to_square(image, (1, 2, 3))
    assert square.size == (6, 6)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((5, 5)) == (1, 2, 3)
    assert square.getpixel((0, 1)) == (10, 20, 30) and square.getpixel((5, 4)) == (10, 20, 30)
    assert expand_to_square(square, (0, 0, 0)) is square


# ------------------------------------------------------------------------------------------------ bad input
def write_truncated_jpeg(source: Path, target: Path) -> Path:
    """A JPEG cut in half: PIL's `verify()` passes it, only a full decode fails."""
    Image.open(source).convert("RGB").resize((64, 64)).save(target, quality=95)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with Image.open(target) as opened:
        opened.verify()
    return target


def good_records(exported, count=3):
    return [conversation(s.question_id, f"{s.question_id}.png", f"<image>\n{s.question}", s.answer)
            for s in exported.synthetic.samples("train")[:count]]


def bad_instruction(kind, exported, tmp_path):
    sample = exported.synthetic.samples("train")[5]
    question, answer = sample.question, sample.answer
    if kind == "missing image":
        return conversation("bad", "nowhere.png", f"<image>\n{question}", answer), "image file not found"
    if kind == "unreadable image":
        (exported.train / "images" / "broken.png").write_bytes(b"not a png")
        return conversation("bad", "broken.png", f"<image>\n{question}", answer), "image unreadable"
    if kind == "truncated jpeg":
        images = exported.train / "images"
        write_truncated_jpeg(images / f"{sample.question_id}.png", images / "cut.jpg")
        return conversation("bad", "cut.jpg", f"<image>\n{question}", answer), "image file is truncated"
    if kind == "no placeholder":
        return conversation("bad", f"{sample.question_id}.png", question, answer), "0 <image> placeholder"
    if kind == "first turn not human":
        return (conversation("bad", f"{sample.question_id}.png", answer, f"<image>\n{question}", first_role="gpt"),
                "the first turn is from 'gpt', expected 'human'")
    if kind == "empty question":
        return conversation("bad", f"{sample.question_id}.png", "<image>\n  ", answer), "empty question"
    raise AssertionError(kind)


INSTRUCTION_CASES = ["missing image", "unreadable image", "truncated jpeg", "no placeholder", "first turn not human",
                     "empty question"]


@pytest.mark.parametrize("kind", INSTRUCTION_CASES)
def test_bad_instruction_record_errors_naming_file_and_id(kind, exported, tmp_path):
    record, problem = bad_instruction(kind, exported, tmp_path)
    path = write_instructions(tmp_path / "instructions.json", good_records(exported) + [record])
    data = instruction_data(exported, path)
    with pytest.raises(ValueError) as raised:
        data.setup("fit")
    message = str(raised.value)
    assert str(path) in message and f"(id {record['id']!r})" in message and problem in message


@pytest.mark.parametrize("kind", INSTRUCTION_CASES)
def test_bad_instruction_record_is_skipped_and_counted(kind, exported, tmp_path, caplog):
    record, problem = bad_instruction(kind, exported, tmp_path)
    path = write_instructions(tmp_path / "instructions.json", good_records(exported) + [record])
    data = instruction_data(exported, path, on_bad_record="skip")
    with caplog.at_level(logging.WARNING):
        records = data.train_records
    assert [r.question_id for r in records] == [r["id"] for r in good_records(exported)]
    assert len(data.skipped["train"]) == 1 and problem in data.skipped["train"][0]
    assert "skipped 1 bad record" in caplog.text


def bad_question(kind, exported):
    line = json.loads((exported.test / "questions.jsonl").read_text().splitlines()[0])
    if kind == "missing image":
        return {**line, "question_id": "bad", "image": "nowhere.png"}, "image file not found"
    if kind == "unreadable image":
        (exported.test / "images" / "broken.png").write_bytes(b"not a png")
        return {**line, "question_id": "bad", "image": "broken.png"}, "image unreadable"
    if kind == "truncated jpeg":
        write_truncated_jpeg(exported.test / "images" / line["image"], exported.test / "images" / "cut.jpg")
        return {**line, "question_id": "bad", "image": "cut.jpg"}, "image file is truncated"
    if kind == "boolean answer":
        return {**line, "question_id": "bad", "answer": True}, "field 'answer' is bool True"
    if kind == "not UTF-8":
        return b'{"question_id": "bad", "text": "caf\xe9"}', "line 4: not valid UTF-8 (byte 0xe9 at column 36)"
    if kind == "empty question":
        return {**line, "question_id": "bad", "text": "<image>\n "}, "empty question"
    if kind == "id twice":
        return line, "appears twice"
    raise AssertionError(kind)


QUESTION_CASES = ["missing image", "unreadable image", "truncated jpeg", "boolean answer", "not UTF-8",
                  "empty question", "id twice"]


@pytest.mark.parametrize("kind", QUESTION_CASES)
@pytest.mark.parametrize("module", ["questions", "instruction"])
def test_bad_question_record_errors_or_is_skipped(kind, module, exported, tmp_path):
    record, problem = bad_question(kind, exported)
    lines = (exported.test / "questions.jsonl").read_text().splitlines()[:3]
    path = tmp_path / "questions.jsonl"
    bad_line = record if isinstance(record, bytes) else json.dumps(record).encode()
    path.write_bytes("".join(line + "\n" for line in lines).encode() + bad_line + b"\n")

    def build(on_bad_record):
        if module == "questions":
            return questions_data(exported, path, exported.test / "images", on_bad_record=on_bad_record)
        return instruction_data(exported, test_question_file=str(path), test_image_root=str(exported.test / "images"),
                                on_bad_record=on_bad_record)

    with pytest.raises(ValueError) as raised:
        build("error")
    message = str(raised.value)
    assert str(path) in message and problem in message
    if not isinstance(record, bytes):  # an undecodable line has no id to name
        assert "line 4" in message and f"question id {record['question_id']!r}" in message
    data = build("skip")
    assert len(data.skipped["test"]) == 1 and problem in data.skipped["test"][0]
    batch = next(iter(data.test_dataloader()))
    assert batch["question_ids"] == [json.loads(line)["question_id"] for line in lines]


def test_settings_are_checked(exported):
    with pytest.raises(ValueError, match="on_bad_record must be one of"):
        instruction_data(exported, on_bad_record="ignore")
    with pytest.raises(ValueError, match=r"data.subset_size=0"):
        instruction_data(exported, subset_size=0)
    with pytest.raises(ValueError, match="unknown conversation template"):
        instruction_data(exported, template="chatml")
    with pytest.raises(ValueError, match=r"data.benchmark='coco'"):
        questions_data(exported, exported.test / "questions.jsonl", exported.test / "images", benchmark="coco")
    with pytest.raises(ValueError, match=r"data.annotation=.* needs data.benchmark"):
        questions_data(exported, exported.test / "questions.jsonl", exported.test / "images",
                       annotation=str(exported.test / "questions.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"data.image_root='/nonexistent/images' \(no such directory\)"):
        questions_data(exported, exported.test / "questions.jsonl", "/nonexistent/images")


# ------------------------------------------------------------------------------------------ benchmark files
BENCHMARK_FILES = {
    "gqa": ("gqa/llava_gqa_testdev_balanced.jsonl", "gqa/testdev_balanced_questions.json", "acc"),
    "pope": ("pope/llava_pope_test.jsonl", "pope", "acc"),
    "mme": ("mme/llava_mme.jsonl", "mme/eval_tool", "artwork/acc"),
    "scienceqa": ("scienceqa/llava_test_CQM-A.json", "scienceqa/problems.json", "acc/img"),
    "vqav2": ("vqav2/llava_vqav2_val.jsonl", "vqav2/v2_mscoco_val2014_annotations.json", None),
    "textvqa": ("textvqa/llava_textvqa_val.jsonl", "textvqa/TextVQA_0.5.1_val.json", None),
}


@pytest.mark.parametrize("benchmark", sorted(BENCHMARK_FILES))
def test_reference_answers_come_from_the_benchmark_annotation(benchmark, exported, tmp_path):
    question_name, annotation_name, metric = BENCHMARK_FILES[benchmark]
    question_file, annotation = EVAL_FIXTURES / question_name, EVAL_FIXTURES / annotation_name
    questions = read_questions(question_file, require_image=False, key_by_text=benchmark in ("mme", "textvqa"))
    for question in questions:
        if question.image is not None:
            (tmp_path / question.image).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(tmp_path / question.image)
    data = questions_data(exported, question_file, tmp_path, benchmark=benchmark, annotation=str(annotation))
    with_image = [q for q in questions if q.image is not None]
    assert [r.question_id for r in data.records] == [q.question_id for q in with_image]  # an int id stays an int
    assert all(r.answer is not None for r in data.records)
    if metric is None:  # VQA: the most frequent human answer
        if benchmark == "textvqa":  # LLaVA's ids are image ids: found by (image id, question)
            texts = read_textvqa_annotations(annotation)
            humans = [texts.find(r.question_id, q.text) for q, r in zip(with_image, data.records)]
        else:
            vqa = read_vqa_annotations(annotation)
            humans = [vqa[str(r.question_id)] for r in data.records]
        assert [r.answer for r in data.records] == [Counter(h.answers).most_common(1)[0][0] for h in humans]
        return
    # answering with the reference answers scores 100% under the official protocol
    answers = [AnswerRecord(question_id=q.question_id, text=r.answer, prompt=q.text)
               for q, r in zip(with_image, data.records)]
    write_answers_jsonl(tmp_path / "answers.jsonl", answers)
    scores = score_answer_file(benchmark, question_file, tmp_path / "answers.jsonl", annotation,
                               on_bad_record="skip")
    assert scores[metric] in (1.0, 100.0)
    if benchmark == "scienceqa":
        assert all(r.question.endswith(LETTER_PROMPT) and r.question.count(LETTER_PROMPT) == 1 for r in data.records)


@pytest.mark.parametrize("benchmark", ["mme", "textvqa"])
def test_answer_records_keep_the_question_files_text_under_a_question_suffix(benchmark, exported, tmp_path):
    """MME and TextVQA answers are matched to their questions by the question text (their ids repeat), as LLaVA's
    scripts do: the suffix the model reads stays out of the answer file's prompt."""
    question_name, annotation_name, _ = BENCHMARK_FILES[benchmark]
    question_file, annotation = EVAL_FIXTURES / question_name, EVAL_FIXTURES / annotation_name
    questions = list(read_questions(question_file, key_by_text=True))
    for question in questions:
        (tmp_path / question.image).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / question.image)
    data = questions_data(exported, question_file, tmp_path, benchmark=benchmark, annotation=str(annotation),
                          question_suffix="Answer briefly.", eval_batch_size=3)
    records = []
    for batch in data.test_dataloader():
        assert all(question.endswith("\nAnswer briefly.") for question in batch["questions"])  # the model's input
        records += prediction_records(batch, batch["answers"], "m")
    assert [r["prompt"] for r in records] == [q.text for q in questions]
    assert [r["dataset_index"] for r in records] == list(range(len(questions)))
    write_jsonl(tmp_path / "answers.jsonl", [{k: r[k] for k in ("question_id", "prompt", "text")} for r in records])
    scores = score_answer_file(benchmark, question_file, tmp_path / "answers.jsonl", annotation)
    assert scores["num_scored"] == len(questions)


def test_paths_starting_with_a_tilde_are_expanded_once_for_every_use(exported, monkeypatch):
    monkeypatch.setenv("HOME", str(exported.root))
    questions = questions_data(exported, "~/test/questions.jsonl", "~/test/images")
    assert questions.records[0].image == exported.test / "images" / questions.records[0].image.name
    assert questions.hparams.question_file == str(exported.test / "questions.jsonl")
    data = LlavaInstructionDataModule(train_file="~/train/instructions.json", image_root="~/train/images",
                                      processor_path="~/processor", test_question_file="~/test/questions.jsonl",
                                      test_image_root="~/test/images", template="tiny", batch_size=BATCH)
    data.setup("fit")
    assert len(data.train_records) == 24 and data.train_records[0].image.parent == exported.train / "images"
    assert len(data.eval_records["test"]) == 16


def test_annotation_without_an_answer_is_a_bad_record(exported, tmp_path):
    lines = (exported.test / "questions.jsonl").read_text().splitlines()[:3]
    annotation = {json.loads(line)["question_id"]: {"answer": json.loads(line)["answer"]} for line in lines[:2]}
    (tmp_path / "gqa.json").write_text(json.dumps(annotation))
    missing = json.loads(lines[2])["question_id"]
    with pytest.raises(ValueError, match=rf"question id '{missing}'\): .*gqa.json has no answer"):
        questions_data(exported, exported.test / "questions.jsonl", exported.test / "images", benchmark="gqa",
                       annotation=str(tmp_path / "gqa.json"))


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_mmbench_tsv_prompts_carry_hint_options_and_letter_instruction(exported, tmp_path):
    image = Image.open(exported.test / "images" / "test-000000.png")
    rows = [
        "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage",
        f"0\twhat is the color ?\tnan\tred\tblue\t\t\tB\tcolor\t{png_base64(image)}",
        f"1\thow many objects are there ?\tadditional information : two\tone\ttwo\tthree\t\tB\tcount\t"
        f"{png_base64(image)}",
    ]
    path = tmp_path / "mmbench_dev_en.tsv"
    path.write_text("\n".join(rows) + "\n")
    data = questions_data(exported, path, None, template="tiny")
    assert data.categories == ["color", "count"]
    assert [(r.question_id, r.answer, r.context) for r in data.records] == [
        (0, "B", None), (1, "B", "additional information : two")]
    assert data.records[0].question == f"what is the color ?\nA. red\nB. blue\n{LETTER_PROMPT}"
    batch = next(iter(data.test_dataloader()))
    expected_pixels = exported.synthetic.collator([VQAExample("x", image.convert("RGB"), "what ?")])["pixel_values"]
    assert torch.allclose(batch["pixel_values"][0], expected_pixels[0])
    assert batch["contexts"] == [None, "additional information : two"]
    # the answer file's prompt, as LLaVA writes it: hint, question, options, no letter instruction
    assert batch["prompts"] == ["what is the color ?\nA. red\nB. blue",
                                "additional information : two\nhow many objects are there ?\nA. one\nB. two\nC. three"]


def question_lines(exported, count=3):
    return [json.loads(line) for line in (exported.test / "questions.jsonl").read_text().splitlines()[:count]]


def write_jsonl(path: Path, records) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records))
    return path


def test_an_image_that_fails_only_when_loaded_names_file_line_and_id(exported, tmp_path):
    lines = question_lines(exported)
    write_truncated_jpeg(exported.test / "images" / lines[1]["image"], tmp_path / "cut.jpg")
    lines[1]["image"] = str(tmp_path / "cut.jpg")  # an absolute path wins over image_root
    path = write_jsonl(tmp_path / "questions.jsonl", lines)
    for on_bad_record in ("error", "skip"):  # not checked at setup, so skip cannot drop it any more
        data = questions_data(exported, path, exported.test / "images", verify_images=False,
                              on_bad_record=on_bad_record)
        with pytest.raises(ValueError, match=rf"questions.jsonl: line 2 \(question id '{lines[1]['question_id']}'\): "
                                             r"image unreadable: .*cut.jpg \(OSError: image file is truncated"):
            next(iter(data.test_dataloader()))


def test_integer_reference_answers_become_text_and_other_types_are_bad_records(exported, tmp_path):
    lines = question_lines(exported, 5)
    for line, answer in zip(lines, [2, 3.0, "two", 2.5, None]):
        line["answer"] = answer
    del lines[4]["answer"]
    path = write_jsonl(tmp_path / "questions.jsonl", lines)
    with pytest.raises(ValueError, match=rf"questions.jsonl: line 4 \(question id '{lines[3]['question_id']}'\): "
                                         r"field 'answer' is float 2.5; a reference answer must be a string or an int"):
        questions_data(exported, path, exported.test / "images")
    data = questions_data(exported, path, exported.test / "images", on_bad_record="skip")
    assert [r.answer for r in data.records] == ["2", "3", "two", None]
    assert len(data.skipped["test"]) == 1 and "line 4" in data.skipped["test"][0]
    pope = write_jsonl(tmp_path / "pope.jsonl", [{k: v for k, v in lines[0].items() if k != "answer"} | {"label": 1}])
    assert questions_data(exported, pope, exported.test / "images", benchmark="pope").records[0].answer == "1"


def test_bad_lines_of_an_instruction_jsonl_are_bad_records(exported, tmp_path):
    records = [json.dumps(r).encode() for r in good_records(exported, 4)]
    records[1] = records[1].replace(b'"gpt"', b'"gpt", "note": "caf\xe9"')  # Latin-1, not UTF-8
    records[2] = b'{"id": '
    path = write_jsonl(tmp_path / "instructions.jsonl", records)
    with pytest.raises(ValueError, match=r"instructions.jsonl: line 2: not valid UTF-8 \(byte 0xe9"):
        _ = instruction_data(exported, path).train_records
    data = instruction_data(exported, path, on_bad_record="skip", batch_size=2)
    good = good_records(exported, 4)
    assert [r.question_id for r in data.train_records] == [good[0]["id"], good[3]["id"]]
    assert [m.split(":")[0] for m in data.skipped["train"]] == ["line 2", "line 3"]
    assert "not valid JSON" in data.skipped["train"][1]
    # the record count is by line: a bad record further on is named by its line too
    later_bad = write_jsonl(tmp_path / "later.jsonl", [good[0], b"", good[1], {**good[2], "conversations": []}])
    with pytest.raises(ValueError, match=r"later.jsonl: line 4 \(id '\S+'\): needs a non-empty 'conversations'"):
        _ = instruction_data(exported, later_bad).train_records


def test_records_that_repeat_an_id_are_kept_under_their_own_ids(exported, tmp_path, caplog):
    # LLaVA's instruction data keys conversations by image id, so the 665k mix repeats ids (5 and "5" are one id)
    good = good_records(exported, 4)
    path = write_jsonl(tmp_path / "mix.jsonl", [{**good[0], "id": 5}, {**good[1], "id": "5"}, {**good[2], "id": "5#2"},
                                                {**good[3], "id": 5}])
    with caplog.at_level(logging.INFO):
        records = instruction_data(exported, path).train_records
    assert [r.question_id for r in records] == [5, "5#3", "5#2", "5#4"]
    assert [r.question for r in records] == [r["conversations"][0]["value"].replace("<image>", "").strip()
                                             for r in good]
    assert "2 record(s) repeat an earlier record's id" in caplog.text


def test_a_file_without_a_usable_record_is_an_error(exported, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl holds no records"):
        questions_data(exported, empty, exported.test / "images")
    with pytest.raises(ValueError, match=r"empty.jsonl holds no records"):
        instruction_data(exported, test_question_file=str(empty), test_image_root=str(exported.test / "images"))
    lines = [{**line, "image": "nowhere.png"} for line in question_lines(exported, 2)]
    all_bad = write_jsonl(tmp_path / "all_bad.jsonl", lines)
    with pytest.raises(ValueError, match=r"all_bad.jsonl has no usable records: all 2 were skipped as bad .*"
                                         r"first: line 1 .*image file not found"):
        questions_data(exported, all_bad, exported.test / "images", on_bad_record="skip")

    with pytest.raises(ValueError, match=r"empty.jsonl holds no records"):
        _ = instruction_data(exported, empty).train_records
    bad_training = write_instructions(tmp_path / "bad.json", [{**r, "image": "nowhere.png"}
                                                               for r in good_records(exported)])
    with pytest.raises(ValueError, match=r"bad.json has no usable records: all 3 were skipped as bad"):
        instruction_data(exported, bad_training, on_bad_record="skip").setup("fit")


def test_a_batch_larger_than_the_training_set_is_an_error(exported):
    data = instruction_data(exported, batch_size=32)
    with pytest.raises(ValueError, match=r"data.batch_size=32 is more than the 24 training records in .*"
                                         r"instructions.json: dropping the incomplete last batch"):
        data.train_dataloader()
    data = instruction_data(exported, batch_size=8)
    data.trainer = SimpleNamespace(world_size=4)  # 6 records a process
    with pytest.raises(ValueError, match=r"data.batch_size=8 is more than the 24 .* over 4 processes \(6 each\)"):
        data.train_dataloader()
    data.trainer = SimpleNamespace(world_size=3)  # 8 records a process: one full batch each
    data.train_dataloader()


def test_integer_question_ids_stay_integers(exported, tmp_path):
    lines = question_lines(exported)
    for line, question_id in zip(lines, [20000, 7, "abc"]):
        line["question_id"] = question_id
    path = write_jsonl(tmp_path / "questions.jsonl", lines)
    batch = next(iter(questions_data(exported, path, exported.test / "images").test_dataloader()))
    assert batch["question_ids"] == [20000, 7, "abc"]
    clash = write_jsonl(tmp_path / "clash.jsonl", [lines[0], {**lines[1], "question_id": "20000"}])
    with pytest.raises(ValueError, match=r"clash.jsonl: line 2: question id '20000' appears twice \(first at line 1\)"):
        questions_data(exported, clash, exported.test / "images")


def test_text_only_records_are_left_out_and_counted_or_are_bad_records(exported, tmp_path):
    text_only = {"id": "text-only", "conversations": [{"from": "human", "value": "What is two plus two?"},
                                                      {"from": "gpt", "value": "four"}]}
    path = write_instructions(tmp_path / "instructions.json", good_records(exported) + [text_only])
    data = instruction_data(exported, path)  # on_bad_record='error': a text-only record is not an error by default
    assert [r.question_id for r in data.train_records] == [r["id"] for r in good_records(exported)]
    assert data.text_only_skipped == 1 and data.skipped["train"] == ()
    strict = instruction_data(exported, path, text_only_records="error")
    with pytest.raises(ValueError, match=r"\(id 'text-only'\): has no 'image': a text-only record"):
        strict.setup("fit")
    not_a_path = {**good_records(exported, 1)[0], "id": "odd", "image": 7}
    path = write_instructions(tmp_path / "odd.json", good_records(exported) + [not_a_path])
    with pytest.raises(ValueError, match=r"\(id 'odd'\): has 'image' 7, expected the image file's path"):
        instruction_data(exported, path).setup("fit")
    with pytest.raises(ValueError, match="data.text_only_records='maybe'"):
        instruction_data(exported, path, text_only_records="maybe")


def test_questions_of_which_only_some_have_answers_are_named_in_a_warning(exported, tmp_path, caplog):
    from datamodules.llava import read_question_records

    lines = [json.loads(line) for line in (exported.test / "questions.jsonl").read_text().splitlines()][:6]
    for line in lines[:2]:
        line.pop("answer", None)
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with caplog.at_level(logging.WARNING):
        records, _ = read_question_records(path, exported.test / "images")
    assert sum(r.answer is None for r in records) == 2
    assert "2 of 6 questions have no reference answer; in-loop accuracy covers the other 4" in caplog.text
    caplog.clear()
    for line in lines:
        line.pop("answer", None)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with caplog.at_level(logging.WARNING):
        read_question_records(path, exported.test / "images")  # a test file without answers: nothing to warn about
    assert "no reference answer" not in caplog.text


def test_each_image_file_is_decoded_once_however_many_questions_ask_about_it(exported, tmp_path, monkeypatch):
    import datamodules.llava as llava

    first = json.loads((exported.test / "questions.jsonl").read_text().splitlines()[0])
    lines = [{**first, "question_id": f"q{k}"} for k in range(3)] + [{**first, "question_id": "gone",
                                                                        "image": "nowhere.png"}]
    path = write_jsonl(tmp_path / "questions.jsonl", lines)
    checked = Counter()
    real = llava._image_problem
    monkeypatch.setattr(llava, "_image_problem", lambda image, verify: checked.update([image]) or real(image, verify))
    records, skipped = llava.read_question_records(path, exported.test / "images", on_bad_record="skip")
    assert [r.question_id for r in records] == ["q0", "q1", "q2"]
    assert len(skipped) == 1 and "image file not found" in skipped[0]
    assert sorted(checked.values()) == [1, 1]


def test_held_out_records_are_uncategorized_when_a_question_file_has_categories(exported):
    from lightning_modules.common import exact_match, score

    data = instruction_data(exported, subset_size=16, val_size=8, test_question_file=str(exported.test / "questions.jsonl"),
                            test_image_root=str(exported.test / "images"))
    # known at construction, for the model: the question file's categories and the held-out records'
    assert data.categories == sorted(exported.synthetic.categories) + ["uncategorized"]
    batch = next(iter(data.val_dataloader()))
    assert batch["categories"] == ["uncategorized"] * len(batch["question_ids"])
    metric = exact_match(data.categories)
    score(metric, batch["answers"], batch)  # a category the metric was not built with would raise here
    result = metric.compute()
    assert result["acc"] == 1.0 and result["acc/uncategorized"] == 1.0


# ------------------------------------------------------------------------------------------ records and loaders
@pytest.mark.parametrize(("turns", "problem"), [
    (("<image>\nq", "a", "<image>\nmore?", "no"), "turn 3 has 1 <image> placeholder"),
    (("<image>\nq", "a", "and then?"), "ends with human turn 3, which has no gpt answer"),
])
def test_a_conversation_with_a_late_image_or_no_last_answer_is_a_bad_record(turns, problem, exported, tmp_path):
    image = good_records(exported, 1)[0]["image"]
    records = good_records(exported) + [conversation("odd", image, *turns)]
    path = write_instructions(tmp_path / "instructions.json", records)
    with pytest.raises(ValueError, match=rf"\(id 'odd'\): {problem}"):
        instruction_data(exported, path).setup("fit")
    data = instruction_data(exported, path, on_bad_record="skip")
    assert [r.question_id for r in data.train_records] == [r["id"] for r in good_records(exported)]


def test_a_boolean_id_is_not_an_id(exported, tmp_path):
    record = {**good_records(exported, 1)[0], "id": True}
    path = write_instructions(tmp_path / "instructions.json", good_records(exported) + [record])
    with pytest.raises(ValueError, match=r"record 4.*needs an 'id'"):
        instruction_data(exported, path).setup("fit")


def test_a_records_length_counts_the_words_of_every_turn(exported, tmp_path):
    image = good_records(exported, 1)[0]["image"]
    record = conversation("long", image, "<image>\nwhat is it", "a red ball", "and now", "two blue cubes here")
    path = write_instructions(tmp_path / "instructions.json", [record])
    assert instruction_data(exported, path, batch_size=1).train_records[0].length == 3 + 3 + 2 + 4


def test_held_out_records_are_drawn_by_seed_keep_their_first_turn_and_leave_a_training_record(exported, tmp_path):
    def held_out(seed):
        data = instruction_data(exported, val_size=8, subset_seed=seed)
        _ = data.train_records
        return [r.question_id for r in data.eval_records["val"]]

    assert held_out(0) == held_out(0) and held_out(0) != held_out(1)  # not the file's tail
    with pytest.raises(ValueError, match=r"has 24 usable records; data.subset_size=None with data.val_size=24 "
                                         r"needs 25"):
        _ = instruction_data(exported, val_size=24).train_records
    with pytest.raises(ValueError, match=r"data.val_size=-1: must be >= 0"):
        instruction_data(exported, val_size=-1)

    image = good_records(exported, 1)[0]["image"]
    records = [conversation(f"r{k}", image, "<image>\nq", "a", "again?", "yes") for k in range(10)]
    data = instruction_data(exported, write_instructions(tmp_path / "turns.json", records), val_size=2, batch_size=2)
    assert all(r.extra_turns == (("again?", "yes"),) for r in data.train_records)
    assert len(data.eval_records["val"]) == 2 and all(r.extra_turns == () for r in data.eval_records["val"])


def test_training_batches_are_full_and_grouped_over_every_process(exported):
    data = instruction_data(exported, subset_size=20)
    assert len(data.train_dataloader()) == 2  # 20 records, batches of 8: the incomplete third is dropped
    data = instruction_data(exported, subset_size=22)
    data.trainer = SimpleNamespace(world_size=3)  # ceil(22 / 3) = 8 records a process: one full batch
    assert data.train_dataloader().sampler.group_size == BATCH * 3  # each rank's batch from one length group


def test_questions_without_a_category_are_uncategorized_when_others_have_one(exported, tmp_path):
    lines = question_lines(exported)
    lines[0]["category"] = lines[1]["category"] = "color"
    lines[2].pop("category", None)
    path = write_jsonl(tmp_path / "questions.jsonl", lines)
    data = questions_data(exported, path, exported.test / "images")
    assert data.categories == ["color", "uncategorized"] and data.records[2].category == "uncategorized"


def test_images_keep_their_shape_without_pad_to_square(exported, tmp_path):
    Image.new("RGB", (6, 4), (200, 10, 10)).save(tmp_path / "wide.png")
    path = write_jsonl(tmp_path / "questions.jsonl", [{**question_lines(exported, 1)[0], "image": "wide.png"}])
    for pad, size in ((False, (6, 4)), (True, (6, 6))):
        data = questions_data(exported, path, tmp_path, pad_to_square=pad)
        assert data.batching.loader(data.records, 1, 0).dataset[0].image.size == size


def test_question_module_settings_that_contradict_the_file_are_errors(exported, tmp_path):
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text("index\tquestion\tA\tB\n")
    with pytest.raises(ValueError, match=r"is a tsv \(MMBench\), data.benchmark='gqa'"):
        questions_data(exported, tsv, None, benchmark="gqa")
    with pytest.raises(ValueError, match=r"data.image_root is required"):
        questions_data(exported, exported.test / "questions.jsonl", None)


def test_pope_reads_an_answer_field_and_a_single_label_file_without_categories(exported, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "COCO_val2014_000000429109.jpg")
    lines = [json.loads(line) for line in (EVAL_FIXTURES / "pope" / "llava_pope_test.jsonl").read_text().splitlines()]
    random_split = [{k: v for k, v in line.items() if k != "category"}
                    for line in lines if line["category"] == "random"]
    path = write_jsonl(tmp_path / "pope.jsonl", random_split)
    data = questions_data(exported, path, tmp_path, benchmark="pope",
                          annotation=str(EVAL_FIXTURES / "pope" / "coco_pope_random.json"))
    assert [r.answer for r in data.records] == ["yes", "no"]
    own = write_jsonl(tmp_path / "own.jsonl", [{**random_split[0], "answer": "yes"}])
    assert [r.answer for r in questions_data(exported, own, tmp_path, benchmark="pope").records] == ["yes"]


def test_an_embedded_image_is_decoded_at_setup_even_without_verify_images(exported, tmp_path):
    image = png_base64(Image.open(exported.test / "images" / "test-000000.png"))
    corrupt = base64.b64encode(b"not a png").decode()
    rows = ["index\tquestion\tA\tB\tanswer\timage", f"0\tq ?\tx\ty\tA\t{image}", f"1\tq ?\tx\ty\tB\t{corrupt}"]
    path = tmp_path / "mmbench.tsv"
    path.write_text("\n".join(rows) + "\n")
    data = questions_data(exported, path, None, verify_images=False, on_bad_record="skip")
    assert [r.question_id for r in data.records] == [0] and "embedded base64 image" in data.skipped["test"][0]
