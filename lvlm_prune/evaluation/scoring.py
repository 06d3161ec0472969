"""Scoring a LLaVA answer file against a benchmark's question file and annotations.

`score_answer_file(benchmark, question_file, answer_file, annotation)` dispatches through `BENCHMARK_SCORERS`.
Every scorer returns plain floats: the metric's keys (see `metrics.py`) plus "num_scored" and "num_skipped"
(question-file records that were not scored because on_bad_record="skip" dropped them or their answer or
annotation). Nothing scorable raises a ValueError instead of returning an empty score.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor

from lvlm_prune.evaluation.metrics import (
    GQA_STRUCTURAL_TYPES,
    MME_COGNITION,
    MME_PERCEPTION,
    VQAV2_ANSWER_TYPES,
    CIDErD,
    GQAAccuracy,
    MMBenchCircularAccuracy,
    MMEScore,
    POPEMetrics,
    ScienceQAAccuracy,
    VQASoftAccuracy,
)
from lvlm_prune.evaluation.readers import (
    BadRecords,
    LoadedRecords,
    MatchedAnswers,
    QuestionRecord,
    lookup_annotations,
    match_answers,
    mme_core_question,
    read_answers,
    read_caption_references,
    read_gqa_annotations,
    read_mmbench_tsv,
    read_mme_ground_truth,
    read_pope_label_dir,
    read_questions,
    read_scienceqa_problems,
    read_textvqa_annotations,
    read_vqa_annotations,
)

logger = logging.getLogger(__name__)

PathLike = str | Path
Scorer = Callable[..., dict[str, float]]


def _load(
    question_file: PathLike,
    answer_file: PathLike,
    image_root: PathLike | None,
    on_bad_record: str,
    require_image: bool = True,
    key_by_text: bool = False,
) -> tuple[LoadedRecords[QuestionRecord], MatchedAnswers[QuestionRecord]]:
    questions = read_questions(
        question_file, image_root=image_root, on_bad_record=on_bad_record,
        require_image=require_image, key_by_text=key_by_text,
    )
    answers = read_answers(answer_file, on_bad_record=on_bad_record, key_by_text=key_by_text)
    return questions, match_answers(questions, answers, on_bad_record=on_bad_record)


def _require_annotation(annotation: PathLike | None, benchmark: str) -> Path:
    if annotation is None:
        raise ValueError(f"annotation is required for {benchmark}")
    return Path(annotation)


def _result(metrics: Mapping[str, Tensor], num_scored: int, num_records: int) -> dict[str, float]:
    result: dict[str, float] = {name: float(value) for name, value in metrics.items()}
    result["num_scored"] = float(num_scored)
    result["num_skipped"] = float(num_records - num_scored)
    return result


def _check_scored(rows: list[Any], question_file: PathLike) -> None:
    if not rows:
        raise ValueError(f"{question_file}: no question could be scored (all were skipped)")


def score_gqa(
    question_file: PathLike, answer_file: PathLike, annotation: PathLike | None = None,
    image_root: PathLike | None = None, on_bad_record: str = "error",
) -> dict[str, float]:
    """GQA testdev-balanced exact match; `annotation` is `testdev_balanced_questions.json`.
    Adds per structural type accuracy when every scored question has one."""
    questions, matched = _load(question_file, answer_file, image_root, on_bad_record)
    path = _require_annotation(annotation, "gqa")
    truth = read_gqa_annotations(path)
    bad = BadRecords(path, on_bad_record)
    rows = lookup_annotations(matched.pairs, lambda q: truth.get(str(q.question_id)), bad, "GQA annotation")
    bad.finish()
    _check_scored(rows, question_file)
    typed = all(gt.structural_type in GQA_STRUCTURAL_TYPES for *_, gt in rows)
    metric = GQAAccuracy(categories=GQA_STRUCTURAL_TYPES if typed else None)
    metric.update(
        [a.text for _, a, _ in rows], [gt.answer for *_, gt in rows],
        [gt.structural_type for *_, gt in rows] if typed else None,
    )
    return _result(metric.compute(), len(rows), questions.num_read)


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def score_pope(
    question_file: PathLike, answer_file: PathLike, annotation: PathLike | None = None,
    image_root: PathLike | None = None, on_bad_record: str = "error",
) -> dict[str, float]:
    """POPE per split (the question's `category`) and mean F1 / accuracy.

    `annotation`: a folder of `coco_pope_<split>.json` label files (or one file). A question matches the label
    with the same image and question (its first line; LLaVA appends an answer-format line), because LLaVA's
    question ids are not the label files' ids. Without `annotation`, each question's own `label` field is used.
    """
    questions, matched = _load(question_file, answer_file, image_root, on_bad_record)
    if annotation is None:
        source: PathLike = question_file
        splits = sorted({q.category or "all" for q, _ in matched.pairs}) or ["all"]

        def find(q: QuestionRecord) -> tuple[str, str] | None:
            label = q.extra.get("label")
            return None if label is None else (q.category or "all", str(label).strip().lower())

    else:
        source = annotation
        by_split = read_pope_label_dir(annotation)
        splits = sorted(by_split)
        index: dict[tuple[str | None, str, str], str] = {}
        for split, labels in by_split.items():
            for label in labels:
                key = (split, os.path.basename(label.image), _first_line(label.text))
                if key in index:
                    raise ValueError(
                        f"{annotation}: split {split!r} has image {label.image!r} with {label.text!r} twice"
                    )
                index[key] = label.label
        only_split = splits[0] if len(splits) == 1 else None

        def find(q: QuestionRecord) -> tuple[str, str] | None:
            split = q.category or only_split
            label = index.get((split, os.path.basename(q.image or ""), _first_line(q.text)))
            return None if label is None or split is None else (split, label)

    bad = BadRecords(source, on_bad_record)
    rows = lookup_annotations(matched.pairs, find, bad, "POPE label", check=lambda q, found: (
        None if found[1] in ("yes", "no") else f"label {found[1]!r} is not 'yes' or 'no'"))
    bad.finish()
    _check_scored(rows, question_file)
    metric = POPEMetrics(splits=splits)
    metric.update([a.text for _, a, _ in rows], [label for *_, (_, label) in rows], [s for *_, (s, _) in rows])
    return _result(metric.compute(), len(rows), questions.num_read)


def score_mme(
    question_file: PathLike, answer_file: PathLike, annotation: PathLike | None = None,
    image_root: PathLike | None = None, on_bad_record: str = "error",
) -> dict[str, float]:
    """MME per subtask acc / acc+ and perception / cognition sums.

    Subtask = the question's `category` (else the question id's first path part, LLaVA's "subtask/image.png"
    ids). Questions and answers are keyed by (id, question text): LLaVA's ids repeat, two questions per image.
    Ground truth: each question's `answer` field, or with `annotation` the eval_tool folder of `<subtask>.txt`.
    """
    questions, matched = _load(question_file, answer_file, image_root, on_bad_record, key_by_text=True)

    def subtask_of(q: QuestionRecord) -> str:
        return q.category or str(q.question_id).split("/", 1)[0]

    def image_of(q: QuestionRecord) -> str:
        return os.path.basename(q.image or str(q.question_id))

    if annotation is None:
        source: PathLike = question_file
        find = lambda q: q.extra.get("answer")  # noqa: E731
    else:
        source = annotation
        truth = read_mme_ground_truth(annotation)
        find = lambda q: truth.get((subtask_of(q), image_of(q), mme_core_question(q.text)))  # noqa: E731
    def check(q: QuestionRecord, truth: Any) -> str | None:
        if str(truth).strip().lower() not in ("yes", "no"):
            return f"answer {truth!r} is not 'yes' or 'no'"
        if subtask_of(q) not in MME_PERCEPTION + MME_COGNITION:
            return (f"subtask {subtask_of(q)!r} (its category, else its id's first part) is not one of MME's: "
                    f"{', '.join(MME_PERCEPTION + MME_COGNITION)}")
        return None

    bad = BadRecords(source, on_bad_record)
    rows = lookup_annotations(matched.pairs, find, bad, "MME ground truth", check=check)
    bad.finish()
    _check_scored(rows, question_file)
    metric = MMEScore()
    metric.update(
        [a.text for _, a, _ in rows], [str(gt) for *_, gt in rows],
        [subtask_of(q) for q, _, _ in rows], [image_of(q) for q, _, _ in rows],
    )
    return _result(metric.compute(), len(rows), questions.num_read)


def score_scienceqa(
    question_file: PathLike, answer_file: PathLike, annotation: PathLike | None = None,
    image_root: PathLike | None = None, on_bad_record: str = "error",
) -> dict[str, float]:
    """ScienceQA accuracy; "acc/img" is ScienceQA-IMG. `annotation` is `problems.json`; the question file is
    LLaVA's `.json` (conversations) or a `.jsonl`. Text-only problems are scored when the answer file answers any
    of them (LLaVA's own evaluation answers all); otherwise, as this project's test runs answer ScienceQA-IMG only,
    they are left out (counted in `num_skipped`) and a missing answer to an image problem is still an error."""
    questions = read_questions(question_file, image_root=image_root, on_bad_record=on_bad_record, require_image=False)
    answers = read_answers(answer_file, on_bad_record=on_bad_record)
    num_read = questions.num_read
    text_only = {key for key, question in questions.records.items() if question.image is None}
    if text_only and not text_only & answers.records.keys():
        logger.info("%s: no answer to any of the %d text-only problems: scoring ScienceQA-IMG only", answer_file,
                    len(text_only))
        questions = replace(questions, records={k: q for k, q in questions.records.items() if k not in text_only})
    matched = match_answers(questions, answers, on_bad_record=on_bad_record)
    path = _require_annotation(annotation, "scienceqa")
    problems = read_scienceqa_problems(path)
    bad = BadRecords(path, on_bad_record)
    rows = lookup_annotations(matched.pairs, lambda q: problems.get(str(q.question_id)), bad, "ScienceQA problem")
    bad.finish()
    _check_scored(rows, question_file)
    metric = ScienceQAAccuracy()
    metric.update(
        [a.text for _, a, _ in rows], [p.answer for *_, p in rows],
        [len(p.choices) for *_, p in rows], [p.has_image for *_, p in rows],
    )
    return _result(metric.compute(), len(rows), num_read)


def _score_vqa(
    question_file: PathLike, answer_file: PathLike, annotation: PathLike | None, image_root: PathLike | None,
    on_bad_record: str, benchmark: str, target_normalization: str,
) -> dict[str, float]:
    textvqa = benchmark == "textvqa"  # LLaVA's TextVQA file repeats ids (the image id): keyed by (id, question)
    questions, matched = _load(question_file, answer_file, image_root, on_bad_record, key_by_text=textvqa)
    path = _require_annotation(annotation, benchmark)
    if textvqa:
        texts = read_textvqa_annotations(path)
        find = lambda q: texts.find(q.question_id, q.text)  # noqa: E731
    else:
        truth = read_vqa_annotations(path)
        find = lambda q: truth.get(str(q.question_id))  # noqa: E731
    bad = BadRecords(path, on_bad_record)
    rows = lookup_annotations(matched.pairs, find, bad, f"{benchmark} annotation")
    bad.finish()
    _check_scored(rows, question_file)
    typed = all(gt.answer_type in VQAV2_ANSWER_TYPES for *_, gt in rows)
    metric = VQASoftAccuracy(
        categories=VQAV2_ANSWER_TYPES if typed else None, target_normalization=target_normalization
    )
    metric.update(
        [a.text for _, a, _ in rows], [list(gt.answers) for *_, gt in rows],
        [gt.answer_type for *_, gt in rows] if typed else None,
    )
    return _result(metric.compute(), len(rows), questions.num_read)


def score_vqav2(
    question_file: PathLike, answer_file: PathLike, annotation: PathLike | None = None,
    image_root: PathLike | None = None, on_bad_record: str = "error",
) -> dict[str, float]:
    """VQAv2 soft accuracy (official script: human answers get the punctuation step only), per answer type when
    the annotations have them. `annotation`: `{"annotations": [...]}` (the val split; test-dev is scored by the
    server, see `write_vqav2_submission`)."""
    return _score_vqa(question_file, answer_file, annotation, image_root, on_bad_record, "vqav2", "punctuation")


def score_textvqa(
    question_file: PathLike, answer_file: PathLike, annotation: PathLike | None = None,
    image_root: PathLike | None = None, on_bad_record: str = "error",
) -> dict[str, float]:
    """TextVQA soft accuracy (m4c evaluator: both sides fully normalised); answers matched to questions by (question
    id, prompt) and questions to annotations by (image id, question) as LLaVA's evaluation does (its question file's
    ids are image ids), or by TextVQA's question id; `annotation`: `TextVQA_0.5.1_val.json` (`{"data": [...]}`)."""
    return _score_vqa(question_file, answer_file, annotation, image_root, on_bad_record, "textvqa", "full")


def score_mmbench(
    question_file: PathLike, answer_file: PathLike, annotation: PathLike | None = None,
    image_root: PathLike | None = None, on_bad_record: str = "error",
) -> dict[str, float]:
    """MMBench circular accuracy. The question file is the MMBench tsv (answers live in it; `annotation` and
    `image_root` are unused, images are embedded); answers' `question_id` is the tsv `index`."""
    questions = read_mmbench_tsv(question_file, on_bad_record=on_bad_record)
    answers = read_answers(answer_file, on_bad_record=on_bad_record)
    matched = match_answers(questions, answers, on_bad_record=on_bad_record)
    bad = BadRecords(question_file, on_bad_record)
    rows = lookup_annotations(matched.pairs, lambda q: q.answer, bad, "ground-truth answer")
    bad.finish()
    _check_scored(rows, question_file)
    categorised = all(q.category is not None for q, _, _ in rows)
    metric = MMBenchCircularAccuracy(categories=sorted({q.category for q, _, _ in rows}) if categorised else None)
    metric.update(
        [a.text for _, a, _ in rows], [gt for *_, gt in rows], [q.index for q, _, _ in rows],
        [q.options for q, _, _ in rows], [q.category for q, _, _ in rows] if categorised else None,
    )
    return _result(metric.compute(), len(rows), questions.num_read)


def score_flickr30k(
    question_file: PathLike, answer_file: PathLike, annotation: PathLike | None = None,
    image_root: PathLike | None = None, on_bad_record: str = "error",
) -> dict[str, float]:
    """Flickr30k captioning CIDEr-D (coco-caption scale). `annotation`: COCO-style captions (matched by question
    id = image id) or Karpathy `dataset_flickr30k.json` (matched by image file name). Document frequencies run
    over the references of the scored images, as coco-caption does."""
    questions, matched = _load(question_file, answer_file, image_root, on_bad_record)
    path = _require_annotation(annotation, "flickr30k")
    references = read_caption_references(path)

    def image_key(q: QuestionRecord) -> str | None:
        for key in (str(q.question_id), os.path.basename(q.image or "")):
            if key in references:
                return key
        return None

    bad = BadRecords(path, on_bad_record)
    rows = lookup_annotations(matched.pairs, image_key, bad, "reference captions")
    seen: set[str] = set()
    unique_rows = []
    for question, answer, key in rows:
        if key in seen:
            bad.report(f"image {key!r} is captioned twice (question {question.question_id!r})")
            continue
        seen.add(key)
        unique_rows.append((question, answer, key))
    bad.finish()
    _check_scored(unique_rows, question_file)
    metric = CIDErD({key: references[key] for *_, key in unique_rows})
    metric.update([a.text for _, a, _ in unique_rows], [key for *_, key in unique_rows])
    return _result(metric.compute(), len(unique_rows), questions.num_read)


BENCHMARK_SCORERS: dict[str, Scorer] = {
    "gqa": score_gqa,
    "pope": score_pope,
    "mme": score_mme,
    "scienceqa": score_scienceqa,
    "vqav2": score_vqav2,
    "textvqa": score_textvqa,
    "mmbench": score_mmbench,
    "flickr30k": score_flickr30k,
}


def score_answer_file(
    benchmark: str,
    question_file: PathLike,
    answer_file: PathLike,
    annotation: PathLike | None = None,
    image_root: PathLike | None = None,
    on_bad_record: str = "error",
) -> dict[str, float]:
    """Score a LLaVA answer file with the benchmark's official protocol.

    Args:
        benchmark: a key of `BENCHMARK_SCORERS`.
        question_file: the LLaVA question file (MMBench: its tsv).
        answer_file: the LLaVA answer `.jsonl`.
        annotation: the benchmark's ground truth (see each `score_<benchmark>`).
        image_root: folder of the question file's images, to check they exist and decode; None skips that.
        on_bad_record: "error" raises on the first bad record, missing answer or missing annotation;
            "skip" leaves it out, logs the count and reports it as "num_skipped".
    """
    if benchmark not in BENCHMARK_SCORERS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {sorted(BENCHMARK_SCORERS)}")
    return BENCHMARK_SCORERS[benchmark](
        question_file, answer_file, annotation, image_root=image_root, on_bad_record=on_bad_record
    )
