"""Writing predictions: LLaVA answer `.jsonl`, GQA's predictions file, the VQAv2 submission.

`score_answer_file` and the benchmark registry live in `scoring.py` and are re-exported here, so answer
export and scoring share one import.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from lvlm_prune.evaluation.normalize import gqa_prediction, m4c_normalize_answer
from lvlm_prune.evaluation.readers import AnswerRecord, BadRecords, QuestionRecord
from lvlm_prune.evaluation.scoring import BENCHMARK_SCORERS, score_answer_file

__all__ = [
    "BENCHMARK_SCORERS",
    "GQA_PREDICTIONS_FILENAME",
    "answer_id_for",
    "build_answer_records",
    "score_answer_file",
    "write_answers_jsonl",
    "write_gqa_predictions",
    "write_llava_answers",
    "write_vqav2_submission",
]

logger = logging.getLogger(__name__)

GQA_PREDICTIONS_FILENAME = "testdev_balanced_predictions.json"
_ANSWER_ID_NAMESPACE = uuid.UUID("6f1c2a52-2b1e-4f0e-9a57-5d2f3c0b7e41")


def answer_id_for(question_id: int | str, prompt: str = "") -> str:
    """A deterministic uuid-like answer id (32 hex digits) from the question id and its prompt (ids may repeat
    with different prompts, as in LLaVA's MME file)."""
    return uuid.uuid5(_ANSWER_ID_NAMESPACE, f"{question_id}\x00{prompt}").hex


def build_answer_records(
    questions: Sequence[QuestionRecord], predictions: Sequence[str], model_id: str
) -> list[AnswerRecord]:
    """One answer per question (same order): prompt = the question text, text = the prediction."""
    if len(questions) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(questions)} questions")
    return [
        AnswerRecord(
            question_id=q.question_id, text=p, prompt=q.text,
            answer_id=answer_id_for(q.question_id, q.text), model_id=model_id,
        )
        for q, p in zip(questions, predictions)
    ]


def write_answers_jsonl(path: str | Path, answers: Iterable[AnswerRecord]) -> Path:
    """Write LLaVA's answer format, one JSON object a line:
    {question_id, prompt, text, answer_id, model_id, metadata} (plus the records' extra fields).

    A (question id, prompt) pair twice raises a ValueError naming the id.
    """
    path = Path(path)
    seen: set[tuple[str, str]] = set()
    lines = []
    for answer in answers:
        key = (str(answer.question_id), answer.prompt)
        if key in seen:
            raise ValueError(f"answers: question id {answer.question_id!r} with prompt {answer.prompt!r} appears twice")
        seen.add(key)
        record = {
            "question_id": answer.question_id,
            "prompt": answer.prompt,
            "text": answer.text,
            "answer_id": answer.answer_id or answer_id_for(answer.question_id, answer.prompt),
            "model_id": answer.model_id,
            "metadata": {},
            **answer.extra,
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_llava_answers(
    path: str | Path, questions: Sequence[QuestionRecord], predictions: Sequence[str], model_id: str
) -> Path:
    """`build_answer_records` then `write_answers_jsonl`."""
    return write_answers_jsonl(path, build_answer_records(questions, predictions, model_id))


def write_gqa_predictions(path: str | Path, answers: Iterable[AnswerRecord]) -> Path:
    """GQA's predictions file for the official eval script: [{"questionId": str, "prediction": str}].

    Predictions through `gqa_prediction` (trailing periods removed, lowercased: as LLaVA converts them). A folder path gets
    `testdev_balanced_predictions.json` inside it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / GQA_PREDICTIONS_FILENAME
    entries, seen = [], set()
    for answer in answers:
        question_id = str(answer.question_id)
        if question_id in seen:
            raise ValueError(f"answers: question id {question_id!r} appears twice")
        seen.add(question_id)
        entries.append({"questionId": question_id, "prediction": gqa_prediction(answer.text)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def write_vqav2_submission(
    path: str | Path,
    questions: Sequence[QuestionRecord],
    answers: Iterable[AnswerRecord],
    on_bad_record: str = "error",
) -> Path:
    """The VQAv2 (EvalAI) upload as LLaVA's converter writes it: [{"question_id": int, "answer": str}] for every
    question of `questions`, the answer through `m4c_normalize_answer`, "" for a question without one (pass the
    whole test2015 question file, `llava_vqav2_mscoco_test2015.jsonl`, with the answers of a test-dev run: the
    server expects every test question; the count of empty answers is logged).

    An answer to a question not in `questions` is a bad record (on_bad_record: "error" raises, "skip" leaves it out
    and counts it in a warning); an id answered twice raises.
    """
    by_id: dict[str, AnswerRecord] = {}
    for answer in answers:
        if str(answer.question_id) in by_id:
            raise ValueError(f"answers: question id {answer.question_id!r} appears twice")
        by_id[str(answer.question_id)] = answer
    question_ids = {str(q.question_id) for q in questions}
    bad = BadRecords(f"VQAv2 submission {path}", on_bad_record)
    for question_id in by_id.keys() - question_ids:
        bad.report(f"answer to question {by_id[question_id].question_id!r}, which is not in the question list")
    bad.finish()
    entries, unanswered = [], 0
    for question in questions:
        answer = by_id.get(str(question.question_id))
        unanswered += answer is None
        try:
            question_id = int(question.question_id)
        except (TypeError, ValueError):
            where = f" (question file line {question.line})" if getattr(question, "line", None) else ""
            raise ValueError(f"VQAv2 submission {path}: question id {question.question_id!r}{where} is not an "
                             "integer, as the EvalAI server's ids are: is this VQAv2's question file?") from None
        entries.append({
            "question_id": question_id,
            "answer": "" if answer is None else m4c_normalize_answer(answer.text),
        })
    if unanswered:
        logger.info("VQAv2 submission %s: %d of %d questions have no answer and are written as ''", path,
                    unanswered, len(entries))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path
