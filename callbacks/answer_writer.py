"""Writes test and predict answers as a LLaVA answer `.jsonl` (one file, from rank 0, all ranks' records), batch by
batch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist

from lvlm_prune.evaluation.export import answer_id_for


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def answer_key(record: dict[str, Any]) -> tuple[str, str]:
    # str: a repeated id is the same question whatever its type; MME: one id, two questions
    return str(record["question_id"]), record.get("prompt", "")


def answer_line(record: dict[str, Any]) -> str:
    """One LLaVA answer-file line of an answer record (`prediction_records`' dicts)."""
    record = {key: value for key, value in record.items() if key != "dataset_index"}  # for ordering only
    record.setdefault("answer_id", answer_id_for(record["question_id"], record.get("prompt", "")))
    record.setdefault("metadata", {})  # LLaVA's model_vqa*.py write it (empty)
    return json.dumps(record) + "\n"


def image_prompts(trainer: L.Trainer) -> bool:
    """Whether answer records' prompts get LLaVA's "<image>\\n" prefix: ScienceQA's scorer counts the IMG problems by
    it (the datamodule's `benchmark`; its text-only problems are left out)."""
    hparams = getattr(trainer.datamodule, "hparams", None) or {}
    return hparams.get("benchmark") == "scienceqa"


def as_written(record: dict[str, Any], with_image_prompt: bool) -> dict[str, Any]:
    return {**record, "prompt": f"<image>\n{record.get('prompt', '')}"} if with_image_prompt else record


def merged_answer_lines(records: list[dict[str, Any]]) -> list[str]:
    """All ranks' records as answer-file lines: in `dataset_index` order when every record has one (a distributed
    sampler deals questions out rank by rank), each (question id, prompt) once (it also repeats samples to even
    out the ranks)."""
    if all("dataset_index" in record for record in records):
        records = sorted(records, key=lambda record: record["dataset_index"])
    seen: set[tuple[str, str]] = set()
    lines = []
    for record in records:
        if answer_key(record) not in seen:
            seen.add(answer_key(record))
            lines.append(answer_line(record))
    return lines


class AnswerFileWriter(L.Callback):
    """Writes answer records (dicts with `question_id`, `prompt`, `text`, `model_id`, ...) as LLaVA answer records:
    while `test` runs those of `pl_module.test_predictions`, while `predict` runs the list each `predict_step`
    returns. The records of each batch are appended and flushed when the batch ends, so a run that stops mid-test
    keeps the answers of every finished batch. The file is emptied when the epoch starts (a rerun never appends to
    an old file). A (question id, prompt) pair is written once (a distributed sampler repeats samples to even out
    ranks).

    ScienceQA (the datamodule's `benchmark`): the prompt is written as LLaVA's `model_vqa_science.py` writes it for
    a problem with an image, "<image>\n" + question; LLaVA's `eval_science_qa.py` counts the IMG problems by it.

    With several processes each rank appends to its own `<stem>.rank<k><suffix>` while running; at the end rank 0
    writes all ranks' records to the answer file and the rank files are removed (after a crash they hold the
    finished batches). The distributed sampler deals the questions out rank by rank, so rank 0 writes them in the
    order of their `dataset_index` (their position in the question file; LLaVA's POPE evaluation pairs answers with
    labels by position), when every record has one (`dataset_index` itself is not written).

    Args:
        filename: file name inside the logger's directory (or `dirpath`); default `answers_test.jsonl` for `test`
            and `answers_predict.jsonl` for `predict`, so that one does not replace the other's file.
        dirpath: directory to write to; default: the logger's log_dir, else the trainer's root dir.
    """

    def __init__(self, filename: str | None = None, dirpath: str | None = None):
        self.filename = filename
        self.dirpath = dirpath
        self.last_path: Path | None = None
        self._part: Path | None = None  # where this process appends
        self._written = 0  # records of `test_predictions` already appended
        self._records: list[dict[str, Any]] = []  # this process's records of the epoch, as written (DDP only)
        self._seen: set[tuple[str, str]] = set()
        self._image_prompts = False  # prefix "<image>\n" to prompts (ScienceQA)

    def _path(self, trainer: L.Trainer) -> Path:
        directory = Path(self.dirpath or (trainer.logger.log_dir if trainer.logger else trainer.default_root_dir))
        stage = "predict" if trainer.predicting else "test"
        return directory / (self.filename or f"answers_{stage}.jsonl")

    def _rank_path(self, path: Path, rank: int) -> Path:
        return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer)

    def _start(self, trainer: L.Trainer) -> None:
        # rank 0's directory: a logger may resolve its version directory differently on other ranks
        path = Path(trainer.strategy.broadcast(str(self._path(trainer))))
        path.parent.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            path.write_text("")
        self._part = self._rank_path(path, dist.get_rank()) if _distributed() else path
        self._part.write_text("")
        self._written, self._seen, self._records = 0, set(), []
        self.last_path = path
        self._image_prompts = image_prompts(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._append_test_predictions(pl_module)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, list) or not all(isinstance(record, dict) for record in outputs):
            raise TypeError(f"AnswerFileWriter: {type(pl_module).__name__}.predict_step returned "
                            f"{type(outputs).__name__}; the answer file needs a list of answer records (dicts with "
                            "question_id, prompt and text)")
        self._append(outputs)

    def _append_test_predictions(self, pl_module: L.LightningModule) -> None:
        records = getattr(pl_module, "test_predictions", [])
        new, self._written = records[self._written:], len(records)  # a slice: copying all every batch is quadratic
        self._append(new)

    def _append(self, new: list[dict[str, Any]]) -> None:
        if self._part is None:
            return
        lines = []
        gather = _distributed()  # rank 0 merges every rank's records at the end; one process has its file already
        for record in (as_written(record, self._image_prompts) for record in new):
            if gather:
                self._records.append(record)
            key = answer_key(record)
            if key not in self._seen:
                self._seen.add(key)
                lines.append(answer_line(record))
        if lines:
            with open(self._part, "a") as handle:  # closed, so flushed, every batch
                handle.writelines(lines)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._append_test_predictions(pl_module)
        self._merge(trainer)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._merge(trainer)

    def _merge(self, trainer: L.Trainer) -> None:
        if not _distributed():
            return
        gathered: list[list[dict]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, self._records)
        path = self.last_path
        assert path is not None and self._part is not None
        if trainer.is_global_zero:
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w") as handle:
                handle.writelines(merged_answer_lines([record for part in gathered for record in part]))
            os.replace(tmp, path)
        dist.barrier()  # the answer file is complete before any rank file goes
        self._part.unlink(missing_ok=True)
