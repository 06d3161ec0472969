"""AnswerFileWriter: answers reach the file batch by batch, a rerun starts a fresh file, ids keep their type, and
several processes still give one file with every answer once."""

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.answer_writer import AnswerFileWriter
from lvlm_prune.evaluation.export import answer_id_for

IDS = list(range(20000, 20010))


class Answering(L.LightningModule):
    """Answers "yes" to question ids; fails at batch `fail_at` (an out-of-memory, a bad image ...)."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.fail_at = fail_at
        self.test_predictions: list[dict] = []

    def on_test_epoch_start(self) -> None:
        self.test_predictions = []

    def test_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError(f"failed at batch {batch_idx}")
        self.test_predictions.extend({"question_id": int(q), "prompt": f"question {int(q)}", "text": "yes",
                                      "model_id": "m"} for q in batch)


def run_test(tmp_path, module, ids=IDS, **trainer_args):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[AnswerFileWriter(dirpath=str(tmp_path))], **trainer_args)
    trainer.test(module, DataLoader(ids, batch_size=4))


def read(tmp_path):
    return [json.loads(line) for line in (tmp_path / "answers_test.jsonl").read_text().splitlines()]


def test_answers_of_finished_batches_survive_a_crash(tmp_path):
    with pytest.raises(RuntimeError, match="failed at batch 2"):
        run_test(tmp_path, Answering(fail_at=2))
    assert [a["question_id"] for a in read(tmp_path)] == IDS[:8]


def test_a_rerun_replaces_the_file_and_ids_keep_their_type(tmp_path):
    (tmp_path / "answers_test.jsonl").write_text('{"question_id": 1, "text": "from an older run"}\n')
    run_test(tmp_path, Answering(), ids=IDS + IDS[:2])  # a repeated question is written once
    answers = read(tmp_path)
    assert [a["question_id"] for a in answers] == IDS  # ints, as in the question file
    assert answers[0] == {"question_id": 20000, "prompt": "question 20000", "text": "yes", "model_id": "m",
                          "answer_id": answer_id_for(20000, "question 20000"), "metadata": {}}


class ScienceQAData(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters({"benchmark": "scienceqa"})

    def test_dataloader(self):
        return DataLoader(IDS[:4], batch_size=4)


def test_scienceqa_prompts_carry_the_image_placeholder_as_llava_writes_them(tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[AnswerFileWriter(dirpath=str(tmp_path))])
    trainer.test(Answering(), datamodule=ScienceQAData())
    assert [a["prompt"] for a in read(tmp_path)] == [f"<image>\nquestion {q}" for q in IDS[:4]]


@pytest.mark.slow
def test_several_processes_write_one_file_with_every_answer_once(tmp_path):
    run_test(tmp_path, Answering(), ids=IDS[:9], strategy="ddp_spawn", devices=2)  # 9 ids: the sampler repeats one
    assert sorted(a["question_id"] for a in read(tmp_path)) == IDS[:9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers_test.jsonl"]  # the rank files are gone
