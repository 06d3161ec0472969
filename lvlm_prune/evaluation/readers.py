"""Readers for LLaVA's evaluation files and each benchmark's annotation files, with validation.

Every reader that walks records takes `on_bad_record`: "error" raises a ValueError naming the file, the line
and the problem; "skip" drops the record, counts it and logs one warning per file with the count.
Records are keyed by `str(question_id)` (ids are ints in some files and strings in others), or by
(question id, question text) with `key_by_text=True`, for files whose ids repeat (LLaVA's MME file uses the
image path as question id, two questions per image).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
ON_BAD_RECORD_CHOICES = ("error", "skip")
RecordKey = str | tuple[str, str]
QuestionId = int | str
R = TypeVar("R")
Q = TypeVar("Q")


def check_on_bad_record(on_bad_record: str) -> str:
    """Return `on_bad_record` if it is "error" or "skip", else raise a ValueError naming the setting."""
    if on_bad_record not in ON_BAD_RECORD_CHOICES:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD_CHOICES}, got {on_bad_record!r}")
    return on_bad_record


class BadRecords:
    """Raises or collects bad-record messages for one source, and logs the skipped count once.

    Args:
        source: the file (or a description) the records come from; it prefixes every message.
        on_bad_record: "error" or "skip".
    """

    def __init__(self, source: str | Path, on_bad_record: str) -> None:
        self.source = str(source)
        self.on_bad_record = check_on_bad_record(on_bad_record)
        self.messages: list[str] = []

    def report(self, message: str) -> None:
        if self.on_bad_record == "error":
            raise ValueError(f"{self.source}: {message}")
        self.messages.append(message)

    def finish(self) -> tuple[str, ...]:
        if self.messages:
            logger.warning(
                "%s: skipped %d bad record(s) (on_bad_record='skip'); first: %s",
                self.source, len(self.messages), "; ".join(self.messages[:3]),
            )
        return tuple(self.messages)


@dataclass(frozen=True)
class QuestionRecord:
    """One question of a LLaVA question file.

    `text` has no image placeholder (LLaVA puts "<image>\\n" in front when it builds the prompt); `extra` holds
    the record's other fields (e.g. an MME `answer`, a POPE `label`); `line` is 1-based (the list position for a
    .json file).
    """

    question_id: QuestionId
    text: str
    image: str | None = None
    category: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    line: int = 0

    def key(self, by_text: bool = False) -> RecordKey:
        return (str(self.question_id), self.text) if by_text else str(self.question_id)


@dataclass(frozen=True)
class AnswerRecord:
    """One line of a LLaVA answer file (`text` is the model's answer, `prompt` the question text)."""

    question_id: QuestionId
    text: str
    prompt: str = ""
    answer_id: str = ""
    model_id: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    line: int = 0

    def key(self, by_text: bool = False) -> RecordKey:
        return (str(self.question_id), strip_image_placeholder(self.prompt)) if by_text else str(self.question_id)


@dataclass(frozen=True)
class LoadedRecords(Generic[R]):
    """Records of one file in file order, keyed; `skipped` has one message per record dropped by "skip"."""

    path: Path
    records: dict[RecordKey, R]
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[R]:
        return iter(self.records.values())

    @property
    def num_read(self) -> int:
        """Records in the file, kept or skipped."""
        return len(self.records) + len(self.skipped)


def strip_image_placeholder(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def _is_question_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool) and value != ""


def _decode_problem(error: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{error.object[error.start]:02x} at column {error.start + 1})"


def iter_jsonl(path: Path, bad: BadRecords) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file; a line that is not UTF-8, not JSON or
    not an object is reported to `bad` (so "skip" drops that line alone)."""
    # bytes, decoded per line: one stray byte (a Latin-1 "é") must cost its line, not the file
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad.report(f"line {number}: {_decode_problem(error)}")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                bad.report(f"line {number}: not valid JSON ({error.msg})")
                continue
            if not isinstance(record, dict):
                bad.report(f"line {number}: expected a JSON object, got {type(record).__name__}")
                continue
            yield number, record


def read_utf8(path: str | Path) -> str:
    """The text of a whole-file format (JSON, tsv, txt); a byte that is not UTF-8 raises a ValueError naming the
    file and the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1)
        problem = f"not valid UTF-8 (byte 0x{data[error.start]:02x} at column {column + 1})"
        raise ValueError(f"{path}: line {line}: {problem}") from error


def _missing_fields(record: Mapping[str, Any], required: Sequence[str]) -> list[str]:
    return [name for name in required if name not in record or record[name] is None]


def _image_problem(image: str, image_root: Path, verify: bool) -> str | None:
    path = image_root / image
    if not path.is_file():
        return f"image file not found: {path}"
    if verify:
        from PIL import Image

        try:
            with Image.open(path) as opened:
                opened.load()  # a full decode: `verify()` passes a JPEG cut short
        except Exception as error:  # PIL raises many types for corrupt files
            return f"image file unreadable: {path} ({type(error).__name__}: {error})"
    return None


def _question_from_jsonl(number: int, record: dict[str, Any]) -> tuple[QuestionRecord | None, str | None]:
    missing = _missing_fields(record, ("question_id", "text"))
    if missing:
        return None, f"line {number}: missing field(s) {missing}"
    if not _is_question_id(record["question_id"]) or not isinstance(record["text"], str):
        return None, f"line {number}: question_id must be an int or a non-empty string and text a string"
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        return None, f"line {number}: image must be a non-empty string, got {image!r}"
    placeholders = record["text"].count(IMAGE_PLACEHOLDER)
    if placeholders > 1 or (placeholders and image is None):
        return None, f"line {number}: text has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for image {image!r}"
    category = record.get("category")
    if category is not None and not isinstance(category, (str, int)):
        return None, f"line {number}: category must be a string, got {category!r}"
    extra = {k: v for k, v in record.items() if k not in ("question_id", "text", "image", "category")}
    question = QuestionRecord(
        question_id=record["question_id"], text=strip_image_placeholder(record["text"]), image=image,
        category=None if category is None else str(category), extra=extra, line=number,
    )
    return question, None


def _question_from_conversation(number: int, record: Any) -> tuple[QuestionRecord | None, str | None]:
    """A record of LLaVA's .json question files (ScienceQA): {"id", "image"?, "conversations": [{"value"}, ...]}."""
    if not isinstance(record, dict):
        return None, f"record {number}: expected a JSON object, got {type(record).__name__}"
    missing = _missing_fields(record, ("id", "conversations"))
    if missing:
        return None, f"record {number}: missing field(s) {missing}"
    turns = record["conversations"]
    if (
        not _is_question_id(record["id"]) or not isinstance(turns, list) or not turns
        or not isinstance(turns[0], dict) or not isinstance(turns[0].get("value"), str)
    ):
        return None, f"record {number}: needs an int or string id and a first conversation turn with a 'value'"
    image = record.get("image")
    text = turns[0]["value"]
    placeholders = text.count(IMAGE_PLACEHOLDER)
    if (image is not None) != (placeholders == 1) or placeholders > 1:
        return None, (
            f"record {number}: image {image!r} but {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the question;"
            f" a record with an image needs exactly one, a record without none"
        )
    extra = {k: v for k, v in record.items() if k not in ("id", "image", "conversations")}
    question = QuestionRecord(
        question_id=record["id"], text=strip_image_placeholder(text), image=image, extra=extra, line=number
    )
    return question, None


def read_questions(
    path: str | Path,
    image_root: str | Path | None = None,
    on_bad_record: str = "error",
    require_image: bool = True,
    verify_images: bool = True,
    key_by_text: bool = False,
) -> LoadedRecords[QuestionRecord]:
    """Read a LLaVA question file: `.jsonl` ({question_id, image, text, category?}) or LLaVA's conversation `.json`.

    Bad records: invalid JSON, missing fields, a question id (or id and text) twice, no image when
    `require_image`, an image placeholder that does not match the image field, and with `image_root` an image
    file that is missing or (with `verify_images`) unreadable.

    Args:
        path: the question file.
        image_root: folder the `image` fields are relative to; None skips the image checks.
        on_bad_record: "error" or "skip".
        require_image: a record without an image is bad (False for ScienceQA, which has text-only problems).
        verify_images: decode each image with PIL to check it is whole (only with `image_root`).
        key_by_text: key records by (question id, text) so ids may repeat with different questions.
    """
    path = Path(path)
    bad = BadRecords(path, on_bad_record)
    root = None if image_root is None else Path(image_root)
    if path.suffix == ".json":
        data = _load_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json question file must hold a list of records")
        parsed = (_question_from_conversation(i, record) for i, record in enumerate(data, start=1))
    else:
        parsed = (_question_from_jsonl(number, record) for number, record in iter_jsonl(path, bad))
    records: dict[RecordKey, QuestionRecord] = {}
    for question, problem in parsed:
        if question is None:
            bad.report(problem)
            continue
        unit = "record" if path.suffix == ".json" else "line"
        where = f"{unit} {question.line}"
        if question.image is None and require_image:
            bad.report(f"{where}: question {question.question_id!r} has no image")
            continue
        key = question.key(key_by_text)
        if key in records:
            first = f"{unit} {records[key].line}"
            bad.report(f"{where}: question id {question.question_id!r} appears twice (first at {first})")
            continue
        if root is not None and question.image is not None:
            image_problem = _image_problem(question.image, root, verify_images)
            if image_problem is not None:
                bad.report(f"{where}: {image_problem}")
                continue
        records[key] = question
    return LoadedRecords(path, records, bad.finish())


def read_answers(
    path: str | Path, on_bad_record: str = "error", key_by_text: bool = False
) -> LoadedRecords[AnswerRecord]:
    """Read a LLaVA answer `.jsonl` ({question_id, prompt, text, answer_id, model_id}; `question_id` and `text`
    are required). A question id twice is a bad record.

    Args:
        path: the answer file.
        on_bad_record: "error" or "skip".
        key_by_text: key answers by (question id, prompt), matching `read_questions(key_by_text=True)`.
    """
    path = Path(path)
    bad = BadRecords(path, on_bad_record)
    records: dict[RecordKey, AnswerRecord] = {}
    for number, record in iter_jsonl(path, bad):
        missing = _missing_fields(record, ("question_id", "text"))
        if missing:
            bad.report(f"line {number}: missing field(s) {missing}")
            continue
        if not _is_question_id(record["question_id"]) or not isinstance(record["text"], str):
            bad.report(f"line {number}: question_id must be an int or a non-empty string and text a string")
            continue
        if not isinstance(record.get("prompt", ""), str):
            bad.report(f"line {number}: prompt must be a string when present, got {record['prompt']!r}")
            continue
        extra = {k: v for k, v in record.items() if k not in ("question_id", "text", "prompt", "answer_id", "model_id")}
        answer = AnswerRecord(
            question_id=record["question_id"], text=record["text"], prompt=str(record.get("prompt", "")),
            answer_id=str(record.get("answer_id", "")), model_id=str(record.get("model_id", "")),
            extra=extra, line=number,
        )
        key = answer.key(key_by_text)
        if key in records:
            first = records[key].line
            bad.report(f"line {number}: question id {answer.question_id!r} appears twice (first at line {first})")
            continue
        records[key] = answer
    return LoadedRecords(path, records, bad.finish())


@dataclass(frozen=True)
class MatchedAnswers(Generic[Q]):
    """(question, answer) pairs in question-file order; the keys of questions without an answer and of answers
    without a question (non-empty only with on_bad_record="skip")."""

    pairs: list[tuple[Q, AnswerRecord]]
    missing: tuple[RecordKey, ...] = ()
    extra: tuple[RecordKey, ...] = ()


def _few(keys: Sequence[RecordKey], limit: int = 5) -> str:
    shown = ", ".join(repr(key) for key in keys[:limit])
    return shown + (", ..." if len(keys) > limit else "")


def match_answers(
    questions: LoadedRecords[Q], answers: LoadedRecords[AnswerRecord], on_bad_record: str = "error"
) -> MatchedAnswers[Q]:
    """Pair every question with its answer (records must use the same keying).

    Questions without an answer, and answers to questions not in the question file, raise a ValueError that
    says how many and shows a few ids; with "skip" they are left out and logged.
    """
    check_on_bad_record(on_bad_record)
    missing = tuple(key for key in questions.records if key not in answers.records)
    extra = tuple(key for key in answers.records if key not in questions.records)
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} of {len(questions)} questions of {questions.path} have no answer in {answers.path}"
            f" (e.g. {_few(missing)})"
        )
    if extra:
        problems.append(
            f"{len(extra)} answers in {answers.path} are for questions not in {questions.path} (e.g. {_few(extra)})"
        )
    if problems and on_bad_record == "error":
        raise ValueError("; ".join(problems))
    for problem in problems:
        logger.warning("%s; skipped (on_bad_record='skip')", problem)
    pairs = [(question, answers.records[key]) for key, question in questions.records.items() if key in answers.records]
    return MatchedAnswers(pairs, missing, extra)


def _load_json(path: str | Path) -> Any:
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from error


@dataclass(frozen=True)
class GQAAnnotation:
    answer: str
    structural_type: str | None = None


def read_gqa_annotations(path: str | Path) -> dict[str, GQAAnnotation]:
    """GQA `testdev_balanced_questions.json`: {question id: {"answer", "types": {"structural"}, ...}}."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping question ids to questions")
    annotations = {}
    for question_id, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("answer"), str):
            raise ValueError(f"{path}: question {question_id!r} has no string 'answer'")
        types = entry.get("types") if isinstance(entry.get("types"), dict) else {}
        annotations[str(question_id)] = GQAAnnotation(entry["answer"], types.get("structural"))
    return annotations


@dataclass(frozen=True)
class POPELabel:
    question_id: QuestionId
    image: str
    text: str
    label: str


def read_pope_labels(path: str | Path) -> list[POPELabel]:
    """A POPE label file (`coco_pope_<split>.json`, JSON lines {question_id, image, text, label}), in file order."""
    path = Path(path)
    labels = []
    for number, record in iter_jsonl(path, BadRecords(path, "error")):
        missing = _missing_fields(record, ("question_id", "image", "text", "label"))
        if missing:
            raise ValueError(f"{path}: line {number}: missing field(s) {missing}")
        if record["label"] not in ("yes", "no"):
            raise ValueError(f"{path}: line {number}: label must be 'yes' or 'no', got {record['label']!r}")
        labels.append(POPELabel(record["question_id"], record["image"], record["text"], record["label"]))
    return labels


def read_pope_label_dir(path: str | Path) -> dict[str, list[POPELabel]]:
    """POPE labels by split from a folder of `coco_pope_<split>.json` files (or one such file)."""
    path = Path(path)
    files = sorted(path.glob("coco_pope_*.json")) if path.is_dir() else [path]
    if not files or not all(f.name.startswith("coco_pope_") and f.suffix == ".json" for f in files):
        raise ValueError(f"{path}: expected coco_pope_<split>.json label file(s)")
    return {f.name[len("coco_pope_") : -len(".json")]: read_pope_labels(f) for f in files}


_MME_PROMPT_SUFFIXES = ("Answer the question using a single word or phrase.", "Please answer yes or no.")


def mme_core_question(text: str) -> str:
    """An MME question without the answer-format instruction LLaVA or MME appends, whitespace collapsed."""
    text = text.strip()
    for suffix in _MME_PROMPT_SUFFIXES:
        if text.endswith(suffix):
            text = text[: -len(suffix)].strip()
    return " ".join(text.split())


def read_mme_ground_truth(path: str | Path) -> dict[tuple[str, str, str], str]:
    """MME ground truth from the eval_tool layout: a folder of `<subtask>.txt`, lines `image<TAB>question<TAB>answer`
    (a 4th column, a prediction, is ignored).

    Returns (subtask, image file name, `mme_core_question(question)`) -> "yes"/"no".
    """
    path = Path(path)
    files = sorted(path.glob("*.txt"))
    if not files:
        raise ValueError(f"{path}: no <subtask>.txt ground-truth files")
    truth = {}
    for file in files:
        for number, line in enumerate(read_utf8(file).splitlines(), start=1):
            if not line.strip():
                continue
            columns = line.split("\t")
            if len(columns) not in (3, 4) or columns[2].strip().lower() not in ("yes", "no"):
                raise ValueError(f"{file}: line {number}: expected image<TAB>question<TAB>yes|no")
            key = (file.stem, os.path.basename(columns[0]), mme_core_question(columns[1]))
            truth[key] = columns[2].strip().lower()
    return truth


@dataclass(frozen=True)
class ScienceQAProblem:
    answer: int
    choices: tuple[str, ...]
    has_image: bool
    split: str | None = None


def read_scienceqa_problems(path: str | Path) -> dict[str, ScienceQAProblem]:
    """ScienceQA `problems.json`: {problem id: {"answer": index, "choices": [...], "image": name or null, "split"}}."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping problem ids to problems")
    problems = {}
    for problem_id, entry in data.items():
        choices = entry.get("choices") if isinstance(entry, dict) else None
        answer = entry.get("answer") if isinstance(entry, dict) else None
        if not isinstance(choices, list) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{path}: problem {problem_id!r} needs a 'choices' list and an 'answer' index into it")
        has_image = bool(entry.get("image"))
        problems[str(problem_id)] = ScienceQAProblem(answer, tuple(choices), has_image, entry.get("split"))
    return problems


@dataclass(frozen=True)
class VQAAnnotation:
    answers: tuple[str, ...]
    answer_type: str | None = None


def read_vqa_annotations(path: str | Path) -> dict[str, VQAAnnotation]:
    """VQAv2 (`{"annotations": [{question_id, answers: [{answer}, ...], answer_type}]}`) or TextVQA
    (`{"data": [{question_id, answers: [str, ...]}]}`) human answers by question id."""
    data = _load_json(path)
    entries = data.get("annotations", data.get("data")) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected an 'annotations' (VQAv2) or 'data' (TextVQA) list")
    annotations = {}
    for position, entry in enumerate(entries):
        answers = entry.get("answers") if isinstance(entry, dict) else None
        if not isinstance(answers, list) or not answers or "question_id" not in entry:
            raise ValueError(f"{path}: entry {position} needs a question_id and a non-empty answers list")
        texts = tuple(a.get("answer") if isinstance(a, dict) else a for a in answers)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{path}: entry {position}: answers must be strings or {{'answer': str}} objects")
        annotations[str(entry["question_id"])] = VQAAnnotation(texts, entry.get("answer_type"))
    return annotations


def textvqa_question(prompt: str) -> str:
    """The question of a LLaVA TextVQA prompt, lower-cased, as LLaVA's TextVQA evaluation finds it: between
    "Question:" and "Short answer:" in the OCR-token prompt format; the second line of a three-line prompt that
    starts with the OCR tokens ("Reference OCR token: ...\n<question>\n<instruction>"); else the first line
    ("<question>\nReference OCR token: ...\n<instruction>" or "<question>\n<instruction>")."""
    prompt = strip_image_placeholder(prompt)
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match:
            return match.group(1).lower()
    lines = prompt.split("\n")
    if len(lines) == 3 and lines[0].startswith("Reference OCR token:"):
        return lines[1].lower()
    return lines[0].lower()


@dataclass(frozen=True)
class TextVQAAnnotations:
    """TextVQA human answers. LLaVA's question file uses the image id as `question_id` (one image, several
    questions), so a question is found by (image id, its question text); files that carry TextVQA's own question
    ids are found by those."""

    by_image_question: dict[tuple[str, str], VQAAnnotation]
    by_question_id: dict[str, VQAAnnotation]

    def find(self, question_id: QuestionId, prompt: str) -> VQAAnnotation | None:
        found = self.by_image_question.get((str(question_id), textvqa_question(prompt)))
        return found if found is not None else self.by_question_id.get(str(question_id))


def read_textvqa_annotations(path: str | Path) -> TextVQAAnnotations:
    """`TextVQA_0.5.1_val.json` (`{"data": [{question_id, image_id, question, answers: [str, ...]}]}`)."""
    data = _load_json(path)
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected TextVQA's 'data' list")
    by_image_question, by_question_id = {}, {}
    for position, entry in enumerate(entries):
        answers = entry.get("answers") if isinstance(entry, dict) else None
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{path}: entry {position} needs a non-empty list of answer strings")
        missing = [k for k in ("question_id", "image_id", "question") if k not in entry]
        if missing:
            raise ValueError(f"{path}: entry {position} has no {', '.join(missing)}")
        annotation = VQAAnnotation(tuple(answers))
        by_image_question[(str(entry["image_id"]), str(entry["question"]).lower())] = annotation
        by_question_id[str(entry["question_id"])] = annotation
    return TextVQAAnnotations(by_image_question, by_question_id)


@dataclass(frozen=True)
class MMBenchQuestion:
    """One MMBench tsv row; `options` are the option texts in letter order (A, B, ...)."""

    index: int
    question: str
    options: tuple[str, ...]
    answer: str | None = None
    category: str | None = None
    hint: str | None = None
    image: str | None = None
    line: int = 0

    @property
    def base_index(self) -> int:
        return self.index % 1_000_000


def _tsv_value(row: Mapping[str, str | None], column: str, none_is_missing: bool = False) -> str | None:
    """A cell, or None when empty or "nan"; with `none_is_missing` also when "none" (LLaVA's MMBench loader treats
    an option or hint that reads "none" as absent)."""
    value = row.get(column)
    if value is None:
        return None
    value = value.strip()
    missing = ("", "nan", "none") if none_is_missing else ("", "nan")
    return None if value.lower() in missing else value


def _utf8_lines(path: Path, handle: Iterable[bytes]) -> Iterator[str]:
    for number, raw in enumerate(handle, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: line {number}: {_decode_problem(error)}") from error


def read_mmbench_tsv(path: str | Path, on_bad_record: str = "error") -> LoadedRecords[MMBenchQuestion]:
    """An MMBench tsv (`index`, `question`, `hint`?, `A`..`D`, `answer`?, `category`, `image` base64).

    Options run from A up to the first empty column; the rotations of a question share `index % 1e6`.
    Bad records: a non-integer or repeated index, fewer than 2 options, an answer that is not an option letter.
    """
    path = Path(path)
    bad = BadRecords(path, on_bad_record)
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # rows carry base64 images
    records: dict[RecordKey, MMBenchQuestion] = {}
    with path.open("rb") as handle:
        reader = csv.DictReader(_utf8_lines(path, handle), delimiter="\t")
        missing_columns = [c for c in ("index", "question", "A", "B") if c not in (reader.fieldnames or [])]
        if missing_columns:
            raise ValueError(f"{path}: missing column(s) {missing_columns}")
        for row in reader:
            number = reader.line_num
            options = []
            for letter in "ABCDEFGHIJ":
                value = _tsv_value(row, letter, none_is_missing=True)
                if value is None:
                    break
                options.append(value)
            index_text, question = _tsv_value(row, "index"), _tsv_value(row, "question")
            answer = _tsv_value(row, "answer")
            if index_text is None or not index_text.lstrip("-").isdigit():
                bad.report(f"line {number}: index must be an integer, got {index_text!r}")
                continue
            if question is None or len(options) < 2:
                bad.report(f"line {number}: needs a question and at least options A and B")
                continue
            if answer is not None and answer not in tuple("ABCDEFGHIJ"[: len(options)]):
                bad.report(f"line {number}: answer {answer!r} is not one of the {len(options)} option letters")
                continue
            if index_text in records:
                first = records[index_text].line
                bad.report(f"line {number}: index {index_text} appears twice (first at line {first})")
                continue
            records[index_text] = MMBenchQuestion(
                index=int(index_text), question=question, options=tuple(options), answer=answer,
                category=_tsv_value(row, "category"), hint=_tsv_value(row, "hint", none_is_missing=True),
                image=_tsv_value(row, "image"), line=number,
            )
    return LoadedRecords(path, records, bad.finish())


def read_caption_references(path: str | Path) -> dict[str, list[str]]:
    """Reference captions by image: COCO style `{"annotations": [{image_id, caption}]}` keyed by `str(image_id)`,
    or Karpathy style `{"images": [{filename, sentences: [{raw}]}]}` keyed by file name."""
    data = _load_json(path)
    references: dict[str, list[str]] = {}
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        for position, entry in enumerate(data["annotations"]):
            if not isinstance(entry, dict) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
                raise ValueError(f"{path}: annotation {position} needs an image_id and a string caption")
            references.setdefault(str(entry["image_id"]), []).append(entry["caption"])
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        for position, entry in enumerate(data["images"]):
            sentences = entry.get("sentences") if isinstance(entry, dict) else None
            if not isinstance(sentences, list) or not sentences or "filename" not in entry:
                raise ValueError(f"{path}: image {position} needs a filename and a non-empty sentences list")
            captions = [s.get("raw") if isinstance(s, dict) else s for s in sentences]
            if not all(isinstance(c, str) for c in captions):
                raise ValueError(f"{path}: image {position}: sentences must be strings or {{'raw': str}} objects")
            references[entry["filename"]] = captions
    else:
        raise ValueError(f"{path}: expected COCO-style 'annotations' or Karpathy-style 'images'")
    return references


def lookup_annotations(
    pairs: Sequence[tuple[Q, AnswerRecord]], find: Callable[[Q], Any], bad: BadRecords, what: str,
    check: Callable[[Q, Any], str | None] | None = None,
) -> list[tuple[Q, AnswerRecord, Any]]:
    """Attach the annotation `find(question)` to each pair; a missing one (None), or one that `check(question,
    annotation)` describes as wrong (a message; None when it is fine), is a bad record of `bad`. Question records
    need a `line` (QuestionRecord, MMBenchQuestion)."""
    found = []
    for question, answer in pairs:
        annotation = find(question)
        if annotation is None:
            bad.report(f"no {what} for question {answer.question_id!r} (question file line {question.line})")
            continue
        problem = check(question, annotation) if check is not None else None
        if problem is not None:
            bad.report(f"{what} of question {answer.question_id!r} (question file line {question.line}): {problem}")
            continue
        found.append((question, answer, annotation))
    return found
