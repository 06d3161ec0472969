"""Writes test predictions as a LLaVA answer `.jsonl` (one file, from rank 0, all ranks' records)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch.distributed as dist

from lvlm_prune.evaluation.export import answer_id_for


class AnswerFileWriter(L.Callback):
    """After `test`, writes `pl_module.test_predictions` (a list of dicts with `question_id`, `prompt`,
    `text`, `model_id`, ...) as LLaVA answer records.

    Args:
        filename: file name inside the logger's directory (or `dirpath`).
        dirpath: directory to write to; default: the logger's log_dir, else the trainer's root dir.
    """

    def __init__(self, filename: str = "answers_test.jsonl", dirpath: str | None = None):
        self.filename = filename
        self.dirpath = dirpath
        self.last_path: Path | None = None

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = list(getattr(pl_module, "test_predictions", []))
        if dist.is_available() and dist.is_initialized():
            gathered: list[list[dict]] = [None] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        seen: set[tuple[str, str]] = set()
        unique = []
        for record in records:  # a distributed sampler repeats samples to even out ranks
            key = (str(record["question_id"]), record.get("prompt", ""))  # MME: one id, two questions
            if key not in seen:
                seen.add(key)
                unique.append(record)
        directory = Path(self.dirpath or (trainer.logger.log_dir if trainer.logger else trainer.default_root_dir))
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.filename
        with open(path, "w") as handle:
            for record in unique:
                record = dict(record)
                record.setdefault("answer_id", answer_id_for(record["question_id"], record.get("prompt", "")))
                handle.write(json.dumps(record) + "\n")
        self.last_path = path
