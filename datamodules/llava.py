"""LightningDataModules for LLaVA-format data: instruction JSON for training, question files for evaluation.

Records become `VQAExample`s batched by `VQACollator`, so the batches are exactly those of the synthetic
datamodule and every LightningModule consumes them unchanged.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from lvlm_prune.data import LengthGroupedSampler, VQACollator, VQAExample
from lvlm_prune.evaluation.readers import (
    IMAGE_PLACEHOLDER,
    BadRecords,
    QuestionRecord,
    check_on_bad_record,
    iter_jsonl,
    mme_core_question,
    read_caption_references,
    read_gqa_annotations,
    read_mmbench_tsv,
    read_mme_ground_truth,
    read_pope_label_dir,
    read_questions,
    read_scienceqa_problems,
    read_textvqa_annotations,
    read_utf8,
    read_vqa_annotations,
)
from lvlm_prune.evaluation.scoring import BENCHMARK_SCORERS
from lvlm_prune.modeling.loading import load_processor
from lvlm_prune.modeling.prompt import get_template

logger = logging.getLogger(__name__)

HUMAN, GPT = "human", "gpt"
UNCATEGORIZED = "uncategorized"
OPTION_LETTERS = "ABCDEFGHIJ"
# LLaVA's `--single-pred-prompt` (model_vqa_science / model_vqa_mmbench); the other LLaVA question files carry
# their answer-format instruction in the question text already.
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
DEFAULT_QUESTION_SUFFIX = {"scienceqa": LETTER_PROMPT, "mmbench": LETTER_PROMPT}


@dataclass(frozen=True)
class LlavaRecord:
    """One validated record; `question_id` keeps the file's type (an int id stays an int in the answer file:
    LLaVA's VQAv2 converter looks answers up by it; compare ids as `str(question_id)`); `image` is a file path, or
    base64 bytes for MMBench's tsv; `source` (the file) and `location` (the record in it) name it in error
    messages; `length` is the conversation's word count (for length grouping); `prompt` is the question file's own
    text, which the answer file's `prompt` repeats (LLaVA's scripts match answers to questions by it), where
    `question`, what the model reads, adds a `question_suffix` (None: the same as `question`); for MMBench it is
    LLaVA's answer-file prompt (hint, question, options), where the hint reaches the model as `context`."""

    question_id: int | str
    image: Path | str
    question: str
    answer: str | None = None
    category: str = ""
    context: str | None = None
    extra_turns: tuple[tuple[str, str], ...] = ()
    source: str = ""
    location: str = ""
    length: int = 0
    prompt: str | None = None


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Pad to a square, image centred, with `fill` (LLaVA-1.5's `image_aspect_ratio='pad'`: the image
    processor's mean colour, so the centre crop that follows keeps the whole image)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _image_source(image: Path | str) -> Path | io.BytesIO:
    return image if isinstance(image, Path) else io.BytesIO(base64.b64decode(image, validate=True))


def _open_image(image: Path | str) -> Image.Image:
    with Image.open(_image_source(image)) as opened:
        return opened.convert("RGB")


# what PIL and base64 raise for a file that is not a whole image (binascii.Error is a ValueError)
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _image_problem(image: Path | str, verify: bool) -> str | None:
    """Why the image cannot be used, or None. With `verify` (always for a base64 image, MMBench) the image is
    decoded in full, as `LlavaRecordDataset` will: PIL's `verify()` passes a JPEG cut short."""
    if isinstance(image, Path) and not image.is_file():
        return f"image file not found: {image}"
    if not verify and isinstance(image, Path):
        return None
    try:
        with Image.open(_image_source(image)) as opened:
            opened.load()
    except IMAGE_ERRORS as error:
        what = image if isinstance(image, Path) else "embedded base64 image"
        return f"image unreadable: {what} ({type(error).__name__}: {error})"
    return None


class LlavaRecordDataset(Dataset):
    """Records -> `VQAExample`s; images are opened (and padded to a square) on access.

    Bad images are meant to be caught at setup (`verify_images` decodes each one, so `on_bad_record='skip'` drops
    the record there). An image that still fails here (not decoded at setup, or changed since) raises a ValueError
    naming the file, the record's line and id, whatever `on_bad_record` says: dropping it now would change the
    length of the dataset and the batches mid-epoch (and differ between ranks).

    Args:
        records: validated records.
        pad_fill: colour to pad images to a square with; None keeps the aspect ratio.
    """

    def __init__(self, records: Sequence[LlavaRecord], pad_fill: tuple[int, ...] | None):
        self.records = list(records)
        self.pad_fill = pad_fill

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> VQAExample:
        record = self.records[index]
        try:
            image = _open_image(record.image)
        except IMAGE_ERRORS as error:
            what = record.image if isinstance(record.image, Path) else "embedded base64 image"
            problem = (f"image unreadable: {what} ({type(error).__name__}: {error}); it was not caught at setup "
                       "(data.verify_images=false, or the file changed since), so on_bad_record cannot drop it")
            raise ValueError(f"{record.source}: {record.location}: {problem}") from error
        if self.pad_fill is not None:
            image = expand_to_square(image, self.pad_fill)
        return VQAExample(record.question_id, image, record.question, record.answer, record.category,
                          context=record.context, extra_turns=record.extra_turns)


class EvaluationDataset(LlavaRecordDataset):
    """`LlavaRecordDataset` whose items also carry the record's position in the question file and its `prompt`,
    for `EvaluationCollator`."""

    def __getitem__(self, index: int) -> tuple[int, str, VQAExample]:  # type: ignore[override]
        record = self.records[index]
        return index, record.question if record.prompt is None else record.prompt, super().__getitem__(index)


@dataclass
class EvaluationCollator:
    """`VQACollator`'s batch + `dataset_indices` (positions in the question file: a distributed sampler deals
    them out rank by rank, and `AnswerFileWriter` restores the file's order, which LLaVA's POPE evaluation pairs
    answers with labels by) and `prompts` (the question file's texts, for the answer file)."""

    collator: VQACollator

    def __call__(self, items: list[tuple[int, str, VQAExample]]) -> dict[str, Any]:
        batch = self.collator([example for _, _, example in items])
        batch["dataset_indices"] = [index for index, _, _ in items]
        batch["prompts"] = [prompt for _, prompt, _ in items]
        return batch


# ------------------------------------------------------------------------------------------- instruction data
def _is_record_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool) and value != ""


def _load_instruction_file(path: Path, bad: BadRecords) -> Iterator[tuple[str, Any]]:
    """(where, raw record): "line N" of a `.jsonl` (a line that is not UTF-8, JSON or an object goes to `bad`),
    "record N" of a `.json` list (which is read whole: one bad byte or bracket fails the file)."""
    if path.suffix == ".jsonl":
        for number, raw in iter_jsonl(path, bad):
            yield f"line {number}", raw
        return
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno} column {error.colno}, "
                         f"character {error.pos})") from error
    if not isinstance(data, list):
        raise ValueError(f"{path}: an instruction file must hold a JSON list of records")
    for position, raw in enumerate(data, start=1):
        yield f"record {position}", raw


TEXT_ONLY = ("has no 'image': a text-only record (data.text_only_records='skip' leaves such records out; the "
             "plug-ins prune visual tokens, and a text-only record has none)")
TEXT_ONLY_RECORDS = ("skip", "error")


def _parse_conversation(
    record: Any, source: str, location: str, image_root: Path
) -> tuple[LlavaRecord | None, str | None]:
    """A LLaVA instruction record -> a record (turn 1: question/answer; later turns: extra_turns) or a problem."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if not _is_record_id(record.get("id")):
        return None, "needs an 'id' (an int or a non-empty string)"
    image = record.get("image")
    if image is None:
        return None, TEXT_ONLY
    if not isinstance(image, str) or not image:
        return None, f"has 'image' {image!r}, expected the image file's path"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None, "needs a non-empty 'conversations' list"
    texts = []
    for number, turn in enumerate(turns, start=1):
        expected = HUMAN if number % 2 else GPT
        role = turn.get("from") if isinstance(turn, dict) else None
        if role != expected:
            which = "the first turn" if number == 1 else f"turn {number}"
            return None, f"{which} is from {role!r}, expected {expected!r} (turns alternate human/gpt)"
        value = turn.get("value")
        if not isinstance(value, str):
            return None, f"turn {number} ({role}) has 'value' {value!r} ({type(value).__name__}), expected a string"
        if not value.replace(IMAGE_PLACEHOLDER, "").strip():
            what = "question" if role == HUMAN else "answer"
            return None, f"turn {number} ({role}) has an empty {what}"
        placeholders = value.count(IMAGE_PLACEHOLDER)
        if placeholders != (1 if number == 1 else 0):
            where = "the first human turn" if number == 1 else f"turn {number}"
            return None, (f"{where} has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s); a record needs exactly one, "
                          "in its first human turn")
        texts.append(value.replace(IMAGE_PLACEHOLDER, "").strip())
    if len(texts) % 2:
        return None, f"ends with human turn {len(texts)}, which has no gpt answer"
    extra = tuple((texts[i], texts[i + 1]) for i in range(2, len(texts), 2))
    parsed = LlavaRecord(record["id"], image_root / image, texts[0], texts[1], extra_turns=extra,
                         source=source, location=location, length=sum(len(text.split()) for text in texts))
    return parsed, None


def read_instruction_records(path: Path, image_root: Path, bad: BadRecords, text_only: str = "error",
                             text_only_count: list[int] | None = None) -> list[LlavaRecord]:
    """Structurally valid records of a LLaVA instruction file (`.json` list or `.jsonl`), in file order.

    A record without an `image` (LLaVA-1.5's mix holds 40,688 text-only ones) is left out when `text_only` is 'skip'
    (counted in `text_only_count[0]`), and is a bad record when it is 'error'.
    Bad (reported to `bad`): a `.jsonl` line that is not UTF-8 or JSON, not an object, no id, an image that is not a path, roles not
    alternating human/gpt from a human turn, an empty or non-string question or answer, not exactly one `<image>`
    (in the first human turn). A repeated id (5 and "5" are one id) is not an error: LLaVA keys its conversations
    by image, so the k-th record with an id becomes '<id>#k' (logged). Image files are not checked here (see
    `select_usable`).
    """
    records: list[LlavaRecord] = []
    for where, raw in _load_instruction_file(path, bad):
        record_id = raw.get("id") if isinstance(raw, dict) else None
        location = where + ("" if record_id is None else f" (id {record_id!r})")
        parsed, problem = _parse_conversation(raw, str(path), location, image_root)
        if problem is TEXT_ONLY and text_only == "skip":
            if text_only_count is not None:
                text_only_count[0] += 1
            continue
        if parsed is None:
            bad.report(f"{location}: {problem}")
            continue
        records.append(parsed)
    return _with_unique_ids(records, path)


def _with_unique_ids(records: list[LlavaRecord], path: Path) -> list[LlavaRecord]:
    """LLaVA's instruction data keys records by image, so one id holds several conversations (LLaVA-Instruct's
    conversation, detail and reasoning records of one COCO image share it). Each record needs its own id (answer files, ACCM's description cache): the k-th record with an
    id becomes '<id>#k', skipping names another record of the file already has."""
    taken = {str(record.question_id) for record in records}  # by str(id): 5 and "5" are one id
    seen: set[str] = set()
    unique, renamed = [], 0
    for record in records:
        key = str(record.question_id)
        if key in seen:
            repeat = 2
            while f"{key}#{repeat}" in taken:
                repeat += 1
            key = f"{key}#{repeat}"
            taken.add(key)
            record = replace(record, question_id=key)
            renamed += 1
        seen.add(key)
        unique.append(record)
    if renamed:
        logger.info("%s: %d record(s) repeat an earlier record's id (LLaVA keys conversations by image); they are "
                    "named '<id>#2', '<id>#3', ... in file order", path, renamed)
    return unique


def no_records_message(source: str | Path, skipped: Sequence[str]) -> str:
    if not skipped:
        return f"{source} holds no records"
    return (f"{source} has no usable records: all {len(skipped)} were skipped as bad (data.on_bad_record='skip'); "
            f"first: {skipped[0]}")


class ImageCheck:
    """`_image_problem` once per image file. LLaVA's files ask several questions of one image (VQAv2 about three,
    the 665k mix several conversations per COCO image), and decoding each image once per record would multiply the
    set-up time by that. Base64 images (MMBench) are checked each time: every row carries its own."""

    def __init__(self, verify: bool) -> None:
        self.verify = verify
        self._problems: dict[Path, str | None] = {}

    def __call__(self, image: Path | str) -> str | None:
        if not isinstance(image, Path):
            return _image_problem(image, self.verify)
        if image not in self._problems:
            self._problems[image] = _image_problem(image, self.verify)
        return self._problems[image]


def select_usable(
    records: Sequence[LlavaRecord],
    bad: BadRecords,
    verify_images: bool,
    subset_size: int | None,
    subset_seed: int,
    held_out: int = 0,
) -> tuple[list[LlavaRecord], list[LlavaRecord]]:
    """(training, held-out) records whose image exists (and decodes, with `verify_images`), each in file order.

    With `subset_size` or `held_out`, records are visited in a permutation seeded by `subset_seed` and only the
    visited images are checked: training gets the first `subset_size` usable records (all but the held-out ones
    without `subset_size`), the held-out set the next `held_out` (the last ones without `subset_size`).
    """
    order = list(range(len(records)))
    if subset_size is not None or held_out:
        random.Random(subset_seed).shuffle(order)
    wanted = None if subset_size is None else subset_size + held_out
    chosen: list[int] = []
    image_problem = ImageCheck(verify_images)
    for index in order:
        problem = image_problem(records[index].image)
        if problem is not None:
            bad.report(f"{records[index].location}: {problem}")
            continue
        chosen.append(index)
        if wanted is not None and len(chosen) == wanted:
            break
    needed = wanted if wanted is not None else held_out + 1
    if not chosen:
        raise ValueError(no_records_message(bad.source, bad.messages))
    if len(chosen) < needed:
        skipped = f" ({len(bad.messages)} skipped as bad records)" if bad.messages else ""
        raise ValueError(f"{bad.source} has {len(chosen)} usable records{skipped}; data.subset_size={subset_size} "
                         f"with data.val_size={held_out} needs {needed}")
    split = len(chosen) - held_out
    return [records[i] for i in sorted(chosen[:split])], [records[i] for i in sorted(chosen[split:])]


# ------------------------------------------------------------------------------------------- question files
AnswerLookup = Callable[[QuestionRecord], str | None]


class BadReferenceAnswer(ValueError):
    """A question record's own reference answer cannot be used (the message names the field)."""


def reference_text(field: str, value: Any) -> str | None:
    """A reference answer field as text: a string as is, an integer (or an integral float: 2.0) as its digits,
    None as no answer; a bool or any other type raises `BadReferenceAnswer` (True is neither "yes" nor "1")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise BadReferenceAnswer(f"field {field!r} is {type(value).__name__} {value!r}; a reference answer must be a "
                             "string or an integer")


def _majority(answers: Sequence[str]) -> str:
    return Counter(answers).most_common(1)[0][0]


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def _answer_lookup(benchmark: str | None, annotation: Path | None) -> AnswerLookup:
    """The reference answer of a question: from `annotation` through the benchmark's reader, else the question
    record's own `answer` field (POPE: also `label`) through `reference_text`, which may raise
    `BadReferenceAnswer`. VQAv2/TextVQA give the most frequent human answer (the soft score itself comes from
    `score_answer_file`); ScienceQA the option letter."""
    if annotation is None:
        def own_field(q: QuestionRecord) -> str | None:
            if "answer" in q.extra or benchmark != "pope":
                return reference_text("answer", q.extra.get("answer"))
            return reference_text("label", q.extra.get("label"))
        return own_field
    if benchmark == "gqa":
        gqa = read_gqa_annotations(annotation)
        return lambda q: gqa[str(q.question_id)].answer if str(q.question_id) in gqa else None
    if benchmark == "textvqa":
        texts = read_textvqa_annotations(annotation)

        def most_frequent(q: QuestionRecord) -> str | None:
            found = texts.find(q.question_id, q.text)
            return None if found is None else _majority(found.answers)
        return most_frequent
    if benchmark == "vqav2":
        vqa = read_vqa_annotations(annotation)
        return lambda q: _majority(vqa[str(q.question_id)].answers) if str(q.question_id) in vqa else None
    if benchmark == "pope":
        by_split = read_pope_label_dir(annotation)
        only_split = next(iter(by_split)) if len(by_split) == 1 else None
        labels = {(split, Path(label.image).name, _first_line(label.text)): label.label
                  for split, split_labels in by_split.items() for label in split_labels}
        return lambda q: labels.get((q.category or only_split, Path(q.image or "").name, _first_line(q.text)))
    if benchmark == "mme":
        truth = read_mme_ground_truth(annotation)
        return lambda q: truth.get((q.category or str(q.question_id).split("/", 1)[0], Path(q.image or "").name,
                                    mme_core_question(q.text)))
    if benchmark == "scienceqa":
        problems = read_scienceqa_problems(annotation)
        return lambda q: (OPTION_LETTERS[problems[str(q.question_id)].answer]
                          if str(q.question_id) in problems else None)
    if benchmark == "flickr30k":
        references = read_caption_references(annotation)

        def first_caption(q: QuestionRecord) -> str | None:
            for key in (str(q.question_id), Path(q.image or "").name):
                if key in references:
                    return references[key][0]
            return None
        return first_caption
    raise ValueError(f"data.annotation is not used for benchmark {benchmark!r} (MMBench answers are in its tsv)")


def _check_benchmark(benchmark: str | None, annotation: str | None) -> None:
    if benchmark is not None and benchmark not in BENCHMARK_SCORERS:
        raise ValueError(f"data.benchmark={benchmark!r}; choose None or one of {sorted(BENCHMARK_SCORERS)}")
    if annotation is not None and benchmark == "mmbench":
        raise ValueError(f"data.annotation={annotation!r}: MMBench's answers are in its tsv; leave it null")
    if annotation is not None and benchmark is None:
        raise ValueError(f"data.annotation={annotation!r} needs data.benchmark naming its format "
                         f"(one of {sorted(set(BENCHMARK_SCORERS) - {'mmbench'})})")


def read_question_records(
    path: Path,
    image_root: Path | None,
    on_bad_record: str = "error",
    verify_images: bool = True,
    benchmark: str | None = None,
    annotation: Path | None = None,
    question_suffix: str = "",
) -> tuple[list[LlavaRecord], tuple[str, ...]]:
    """Records of a LLaVA question file (`.jsonl`, ScienceQA's `.json`, MMBench's `.tsv`) and the messages of
    the records skipped.

    Bad records: those `read_questions` / `read_mmbench_tsv` reject (a line that is not UTF-8 or JSON, missing
    fields, a question id twice), an empty question, a reference `answer` that is not a string or an integer, a
    missing or unreadable image, and with `annotation` a question it has no answer for. ScienceQA's text-only
    problems are left out (ScienceQA-IMG), with a logged count. A file left with no record raises a ValueError
    that says how many were skipped.
    """
    bad = BadRecords(path, on_bad_record)
    lookup = _answer_lookup(benchmark, annotation)

    def with_suffix(text: str) -> str:
        # some converted files carry the instruction already
        return f"{text}\n{question_suffix}" if question_suffix and not text.endswith(question_suffix) else text

    records: list[LlavaRecord] = []
    if path.suffix == ".tsv":
        loaded = read_mmbench_tsv(path, on_bad_record=on_bad_record)
        for row in loaded:
            location = f"line {row.line} (index {row.index})"
            if row.image is None:
                bad.report(f"{location}: no image")
                continue
            options = "".join(f"\n{letter}. {option}" for letter, option in zip(OPTION_LETTERS, row.options))
            # the answer file's prompt is LLaVA's (model_vqa_mmbench.py): hint, question, options
            hinted = f"{row.question}{options}" if row.hint is None else f"{row.hint}\n{row.question}{options}"
            records.append(LlavaRecord(row.index, row.image, with_suffix(f"{row.question}{options}"),
                                       row.answer, row.category or "", context=row.hint, source=str(path),
                                       location=location, prompt=hinted))
    else:
        loaded = read_questions(path, image_root=None, on_bad_record=on_bad_record,
                                require_image=benchmark != "scienceqa",
                                key_by_text=benchmark in ("mme", "textvqa"))  # their files repeat ids
        unit = "record" if path.suffix == ".json" else "line"
        text_only = 0
        for question in loaded:
            location = f"{unit} {question.line} (question id {question.question_id!r})"
            if question.image is None:
                text_only += 1
                continue
            if not question.text.strip():
                bad.report(f"{location}: empty question")
                continue
            try:
                answer = lookup(question)
            except BadReferenceAnswer as error:
                bad.report(f"{location}: {error}")
                continue
            if answer is None and annotation is not None:
                bad.report(f"{location}: {annotation} has no answer for this question")
                continue
            records.append(LlavaRecord(question.question_id, Path(question.image), with_suffix(question.text),
                                       answer, question.category or "", source=str(path), location=location,
                                       prompt=question.text))
        if text_only:
            logger.info("%s: left out %d text-only problem(s) (ScienceQA-IMG keeps image problems)", path, text_only)
    usable = []
    image_problem = ImageCheck(verify_images)
    for record in records:
        if isinstance(record.image, Path) and image_root is not None:
            record = replace(record, image=image_root / record.image)
        problem = image_problem(record.image)
        if problem is not None:
            bad.report(f"{record.location}: {problem}")
            continue
        usable.append(record)
    skipped = loaded.skipped + bad.finish()
    if not usable:  # else the test "passes" on zero batches
        raise ValueError(no_records_message(path, skipped))
    unanswered = sum(record.answer is None for record in usable)
    if 0 < unanswered < len(usable):  # all or none is a benchmark's test file or an annotated one: nothing to say
        logger.warning("%s: %d of %d questions have no reference answer; in-loop accuracy covers the other %d (the "
                       "answer file holds all of them)", path, unanswered, len(usable), len(usable) - unanswered)
    return usable, skipped


def categorize(splits: Sequence[list[LlavaRecord]]) -> tuple[list[str], list[list[LlavaRecord]]]:
    """Sorted unique categories over all splits; when any record has one, records without get `UNCATEGORIZED`
    (per-category metrics need a known category for every item)."""
    if not any(record.category for records in splits for record in records):
        return [], [list(records) for records in splits]
    filled = [[r if r.category else replace(r, category=UNCATEGORIZED) for r in records] for records in splits]
    return sorted({record.category for records in filled for record in records}), filled


# ------------------------------------------------------------------------------------------- datamodules
def expand_user(path: str | None) -> str | None:
    """`path` with `~` expanded: the datamodules expand their path settings once, before `check_paths`, so that the
    readers (and the saved hyperparameters) use the path that was checked."""
    return None if path is None else str(Path(path).expanduser())


def check_paths(
    files: dict[str, str | None], directories: dict[str, str | None], either: dict[str, str | None] | None = None
) -> None:
    """FileNotFoundError listing every given setting whose path is missing (a config's placeholders included)."""
    missing = [f"{name}={path!r} (no such file)" for name, path in files.items()
               if path is not None and not Path(path).expanduser().is_file()]
    missing += [f"{name}={path!r} (no such directory)" for name, path in directories.items()
                if path is not None and not Path(path).expanduser().is_dir()]
    missing += [f"{name}={path!r} (no such file or directory)" for name, path in (either or {}).items()
                if path is not None and not Path(path).expanduser().exists()]
    if missing:
        raise FileNotFoundError("missing input path(s): " + "; ".join(missing))


def check_a_full_batch(count: int, batch_size: int, world_size: int, what: str) -> None:
    """A ValueError when `drop_last` would leave no training batch (Lightning would warn "no training batches" and
    exit 0 without training)."""
    per_process = -(-count // world_size)  # the distributed sampler pads every rank to the same count
    if per_process < batch_size:
        spread = f" over {world_size} processes ({per_process} each)" if world_size > 1 else ""
        raise ValueError(f"data.batch_size={batch_size} is more than the {count} {what}{spread}: dropping the "
                         "incomplete last batch leaves no training batch; lower data.batch_size")


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"data.{name}={value} must be at least 1")


@dataclass
class Batching:
    """What turns records into batches: the processor, the `VQACollator` built on it with the template, and
    the colour that pads images to a square (None: no padding)."""

    processor: Any
    collator: VQACollator
    pad_fill: tuple[int, ...] | None

    @classmethod
    def load(cls, processor_path: str, template: str, max_length: int, seed: int, pad_to_square: bool) -> "Batching":
        processor = load_processor(processor_path, setting="data.init_args.processor_path")
        image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        collator = VQACollator(processor, get_template(template), image_token_id, max_length, seed)
        mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        return cls(processor, collator, tuple(int(c * 255) for c in mean) if pad_to_square else None)

    def loader(self, records: Sequence[LlavaRecord], batch_size: int, num_workers: int,
               sampler: Sampler[int] | None = None, drop_last: bool = False) -> DataLoader:
        return DataLoader(LlavaRecordDataset(records, self.pad_fill), batch_size=batch_size, sampler=sampler,
                          shuffle=False, drop_last=drop_last, collate_fn=self.collator,
                          num_workers=num_workers, persistent_workers=num_workers > 0)

    def evaluation_loader(self, records: Sequence[LlavaRecord], batch_size: int, num_workers: int) -> DataLoader:
        """Batches in file order that also carry `dataset_indices` and `prompts` (`EvaluationCollator`)."""
        return DataLoader(EvaluationDataset(records, self.pad_fill), batch_size=batch_size, shuffle=False,
                          collate_fn=EvaluationCollator(self.collator), num_workers=num_workers,
                          persistent_workers=num_workers > 0)


class LlavaInstructionDataModule(L.LightningDataModule):
    """Training on LLaVA instruction data; validation and test on LLaVA question files.

    Training records (`id`, `image`, `conversations` alternating `human`/`gpt`, `<image>` in the first human
    turn): turn 1 is the question and answer, later turns are extra turns; `VQACollator` puts the loss on every
    gpt answer (+ EOS) only. Evaluation records (`question_id`, `image`, `text`, `category`?, `answer`?): the
    reference answer is the record's `answer` field, else None (no accuracy; LlavaQuestionsDataModule reads
    benchmark annotations); or, with `val_size`, validation holds out instruction records. `categories`: the
    question files' categories, sorted.

    Args:
        train_file: instruction data (`.json` list, or `.jsonl`), e.g. llava_v1_5_mix665k.json or a VQAv2 file.
        image_root: folder the training records' `image` paths are relative to.
        processor_path: directory with the base model's processor (AutoProcessor; the `-hf` checkpoint).
        val_question_file: question `.jsonl` for validation (None: see val_size).
        test_question_file: question `.jsonl` for test (None: no test).
        val_image_root: image folder of the validation questions (default: image_root).
        test_image_root: image folder of the test questions (default: image_root).
        template: conversation template ('vicuna_v1' = LLaVA-1.5; 'tiny' = without the system message).
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size.
        subset_size: train on this many records, drawn at random (the papers use 10k VQAv2 samples); None: all.
        subset_seed: fixes the subset and the held-out validation records.
        val_size: hold out this many instruction records (disjoint from training) for validation, with the first
            turn as question and reference answer; an alternative to val_question_file (real LLaVA question
            files have no answers, so no in-training accuracy).
        group_by_length: batch records of similar text length together (`LengthGroupedSampler`); False shuffles.
        seed: fixes the training order (with the epoch) of this module's own loader. Under `cli.py` the
            `ResumableDataOrder` callback rebuilds the loader, and its order follows `data_order.seed` (default: the
            run's `seed_everything`); a length-grouped order keeps this seed.
        on_bad_record: 'error' raises on a bad record naming the file and the record; 'skip' drops it, counts it
            (`skipped[split]`) and logs the count.
        text_only_records: 'skip' leaves out records without an image (LLaVA-1.5's mix holds 40,688), counted in
            `text_only_skipped` and logged: the plug-ins learn to prune and compensate visual tokens, and such a
            record has none. 'error' treats one as a bad record (see on_bad_record).
        verify_images: decode every image at setup (of the subset only; False checks that the files exist).
        pad_to_square: pad images to a square with the processor's mean colour, as LLaVA-1.5 does.
        max_length: longest teacher-forced sequence; longer conversations are cut to it with a warning, as LLaVA cuts
            to model_max_length (an image that does not fit whole is an error naming the sample).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        train_file: str,
        image_root: str,
        processor_path: str,
        val_question_file: str | None = None,
        test_question_file: str | None = None,
        val_image_root: str | None = None,
        test_image_root: str | None = None,
        template: str = "vicuna_v1",
        batch_size: int = 16,
        eval_batch_size: int = 16,
        subset_size: int | None = None,
        subset_seed: int = 0,
        val_size: int = 0,
        group_by_length: bool = True,
        seed: int = 0,
        on_bad_record: str = "error",
        text_only_records: str = "skip",
        verify_images: bool = True,
        pad_to_square: bool = True,
        max_length: int = 2048,
        num_workers: int = 4,
    ):
        super().__init__()
        check_on_bad_record(on_bad_record)
        if text_only_records not in TEXT_ONLY_RECORDS:
            raise ValueError(f"data.text_only_records={text_only_records!r}; choose one of {TEXT_ONLY_RECORDS}")
        _check_positive(batch_size=batch_size, eval_batch_size=eval_batch_size, subset_size=subset_size,
                        max_length=max_length)
        get_template(template)
        if val_size < 0 or (val_size and val_question_file is not None):
            raise ValueError(f"data.val_size={val_size}: must be >= 0, and 0 when data.val_question_file is set")
        (train_file, image_root, processor_path, val_question_file, test_question_file, val_image_root,
         test_image_root) = map(expand_user, (train_file, image_root, processor_path, val_question_file,
                                              test_question_file, val_image_root, test_image_root))
        check_paths(
            {"data.train_file": train_file, "data.val_question_file": val_question_file,
             "data.test_question_file": test_question_file},
            {"data.image_root": image_root, "data.processor_path": processor_path,
             "data.val_image_root": val_image_root, "data.test_image_root": test_image_root},
        )
        self.save_hyperparameters()
        self.batching = Batching.load(processor_path, template, max_length, seed, pad_to_square)
        self.processor = self.batching.processor
        self.collator = self.batching.collator
        self.skipped: dict[str, tuple[str, ...]] = {}
        self.text_only_skipped = 0
        # Question files are read now: the CLI links `categories` into the model at instantiation.
        eval_splits: dict[str, list[LlavaRecord]] = {}
        for split, question_file, root in (("val", val_question_file, val_image_root),
                                           ("test", test_question_file, test_image_root)):
            if question_file is not None:
                eval_splits[split], self.skipped[split] = read_question_records(
                    Path(question_file), Path(root or image_root), on_bad_record, verify_images)
        self.categories, filled = categorize(list(eval_splits.values()))
        if self.categories and val_size and UNCATEGORIZED not in self.categories:
            # the held-out training records (read later) carry no category; the metric must know theirs now
            self.categories = sorted([*self.categories, UNCATEGORIZED])
        self.eval_records = dict(zip(eval_splits, filled))
        self._train_records: list[LlavaRecord] | None = None

    @property
    def train_records(self) -> list[LlavaRecord]:
        """The training records: read, checked and subset on first use (the held-out ones go to `eval_records`)."""
        if self._train_records is None:
            hp = self.hparams
            bad = BadRecords(hp.train_file, hp.on_bad_record)
            text_only = [0]
            parsed = read_instruction_records(Path(hp.train_file), Path(hp.image_root), bad, hp.text_only_records,
                                              text_only)
            self.text_only_skipped = text_only[0]
            if text_only[0]:
                logger.info(f"{hp.train_file}: {text_only[0]} text-only records left out (data.text_only_records='skip')")
            self._train_records, held_out = select_usable(parsed, bad, hp.verify_images, hp.subset_size,
                                                          hp.subset_seed, hp.val_size)
            if hp.val_size:
                category = UNCATEGORIZED if self.categories else ""
                self.eval_records["val"] = [replace(r, extra_turns=(), category=category) for r in held_out]
            self.skipped["train"] = bad.finish()
        return self._train_records

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") or self.hparams.val_size:
            _ = self.train_records

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        records = self.train_records
        world_size = self.trainer.world_size if self.trainer is not None else 1
        check_a_full_batch(len(records), hp.batch_size, world_size, f"training records in {hp.train_file}")
        if hp.group_by_length:
            sampler: Sampler[int] = LengthGroupedSampler([r.length for r in records], hp.batch_size * world_size,
                                                         hp.seed)
        else:
            sampler = torch.utils.data.RandomSampler(records, generator=torch.Generator().manual_seed(hp.seed))
        return self.batching.loader(records, hp.batch_size, hp.num_workers, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.hparams.val_size:
            _ = self.train_records  # holds the validation records out
        if "val" not in self.eval_records:
            return []  # Lightning skips validation for an empty list
        return self.batching.evaluation_loader(self.eval_records["val"], self.hparams.eval_batch_size,
                                               self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.eval_records:
            raise ValueError("no test split: set data.test_question_file")
        return self.batching.evaluation_loader(self.eval_records["test"], self.hparams.eval_batch_size,
                                               self.hparams.num_workers)


class LlavaQuestionsDataModule(L.LightningDataModule):
    """Evaluation only: one benchmark question file and its images (test and predict).

    Reference answers (`answers` in the batch, for in-loop accuracy; the official score comes from
    `lvlm_prune.evaluation.export.score_answer_file` on the written answer file): from `annotation` read with
    the benchmark's reader, else each record's `answer` field (POPE: also `label`), else None.
    `categories`: the file's categories, sorted.

    Args:
        question_file: LLaVA question file: `.jsonl` ({question_id, image, text, category?}), ScienceQA's `.json`,
            or MMBench's `.tsv` (images embedded).
        image_root: folder the `image` fields are relative to (None only for MMBench's tsv).
        processor_path: directory with the base model's processor (AutoProcessor; the `-hf` checkpoint).
        benchmark: the file's benchmark (gqa, pope, mme, scienceqa, vqav2, textvqa, mmbench, flickr30k) or None
            (a `.tsv` is MMBench).
        annotation: the benchmark's ground truth, as for `score_answer_file`; None: answers from the file.
        template: conversation template ('vicuna_v1' = LLaVA-1.5).
        question_suffix: a line appended to every question that does not already end with it; None: LLaVA's
            choice for the benchmark (ScienceQA, MMBench: "Answer with the option's letter from the given choices
            directly."; others: nothing, their question files carry the instruction).
        eval_batch_size: batch size.
        on_bad_record: 'error' or 'skip' (counted in `skipped['test']`, logged).
        verify_images: decode every image at setup (False checks that the files exist).
        pad_to_square: pad images to a square with the processor's mean colour, as LLaVA-1.5 does.
        max_length: longest teacher-forced sequence (longer ones are cut to it with a warning, as LLaVA does).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        question_file: str,
        image_root: str | None,
        processor_path: str,
        benchmark: str | None = None,
        annotation: str | None = None,
        template: str = "vicuna_v1",
        question_suffix: str | None = None,
        eval_batch_size: int = 16,
        on_bad_record: str = "error",
        verify_images: bool = True,
        pad_to_square: bool = True,
        max_length: int = 2048,
        num_workers: int = 4,
    ):
        super().__init__()
        check_on_bad_record(on_bad_record)
        _check_positive(eval_batch_size=eval_batch_size, max_length=max_length)
        get_template(template)
        question_file, image_root, processor_path, annotation = map(
            expand_user, (question_file, image_root, processor_path, annotation))
        is_tsv = question_file.endswith(".tsv")
        if is_tsv and benchmark not in (None, "mmbench"):
            raise ValueError(f"data.question_file={question_file!r} is a tsv (MMBench), data.benchmark={benchmark!r}")
        benchmark = "mmbench" if is_tsv else benchmark
        _check_benchmark(benchmark, annotation)
        if image_root is None and not is_tsv:
            raise ValueError("data.image_root is required (only MMBench's .tsv embeds its images)")
        check_paths({"data.question_file": question_file},
                    {"data.image_root": image_root, "data.processor_path": processor_path},
                    {"data.annotation": annotation})
        self.save_hyperparameters()
        self.batching = Batching.load(processor_path, template, max_length, 0, pad_to_square)
        self.processor = self.batching.processor
        self.collator = self.batching.collator
        suffix = DEFAULT_QUESTION_SUFFIX.get(benchmark or "", "") if question_suffix is None else question_suffix
        records, skipped = read_question_records(
            Path(question_file), None if image_root is None else Path(image_root), on_bad_record, verify_images,
            benchmark, None if annotation is None else Path(annotation), suffix)
        self.skipped = {"test": skipped}
        self.categories, (self.records,) = categorize([records])

    def test_dataloader(self) -> DataLoader:
        return self.batching.evaluation_loader(self.records, self.hparams.eval_batch_size, self.hparams.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
