"""AnswerFileWriter: answers reach the file batch by batch, a rerun starts a fresh file, ids keep their type,
`predict` writes the same file as `test`, and several processes still give one file with every answer once, in the
question file's order."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.answer_writer import AnswerFileWriter
from lvlm_prune.evaluation.export import answer_id_for

IDS = list(range(20000, 20010))


class Answering(L.LightningModule):
    """Answers "yes" to (position in the question file, question id) batches; fails at batch `fail_at` (an
    out-of-memory, a bad image ...)."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.fail_at = fail_at
        self.test_predictions: list[dict] = []

    def on_test_epoch_start(self) -> None:
        self.test_predictions = []

    def predict_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError(f"failed at batch {batch_idx}")
        return [{"question_id": int(q), "prompt": f"question {int(q)}", "text": "yes", "model_id": "m",
                 "dataset_index": int(index)} for index, q in zip(*batch)]

    def test_step(self, batch, batch_idx):
        self.test_predictions.extend(self.predict_step(batch, batch_idx))


def questions(ids):
    return DataLoader(list(enumerate(ids)), batch_size=4)


def run_test(tmp_path, module, ids=IDS, loop="test", **trainer_args):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[AnswerFileWriter(dirpath=str(tmp_path))], **trainer_args)
    getattr(trainer, loop)(module, questions(ids))


def read(tmp_path, name="answers_test.jsonl"):
    return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]


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


def test_predict_writes_the_same_answers_as_test_to_its_own_file(tmp_path):
    run_test(tmp_path, Answering())
    tested = (tmp_path / "answers_test.jsonl").read_text()
    run_test(tmp_path, Answering(), loop="predict")
    assert (tmp_path / "answers_predict.jsonl").read_text() == tested
    assert (tmp_path / "answers_test.jsonl").read_text() == tested  # test's file is left alone
    with pytest.raises(RuntimeError, match="failed at batch 1"):
        run_test(tmp_path, Answering(fail_at=1), loop="predict")
    assert [a["question_id"] for a in read(tmp_path, "answers_predict.jsonl")] == IDS[:4]  # fresh, the finished batch


class Untyped(Answering):
    def predict_step(self, batch, batch_idx):
        return batch[1]


def test_predict_outputs_that_are_not_answer_records_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"Untyped.predict_step returned Tensor; the answer file needs a list"):
        run_test(tmp_path, Untyped(), loop="predict")


class ScienceQAData(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters({"benchmark": "scienceqa"})

    def test_dataloader(self):
        return questions(IDS[:4])


def test_scienceqa_prompts_carry_the_image_placeholder_as_llava_writes_them(tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[AnswerFileWriter(dirpath=str(tmp_path))])
    trainer.test(Answering(), datamodule=ScienceQAData())
    assert [a["prompt"] for a in read(tmp_path)] == [f"<image>\nquestion {q}" for q in IDS[:4]]


def _answer_on_two_ranks(rank: int, port: int, dirpath: str, loop: str) -> None:
    """One of two processes launched the way torchrun or SLURM launch them (Lightning only joins them). The
    process group is destroyed before the process exits: a gloo group left to the interpreter's exit aborted
    one process in about one run of seven under `ddp_spawn` ("terminate called without an active exception")."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", NODE_RANK="0")
    try:
        run_test(Path(dirpath), Answering(), ids=IDS[:9], loop=loop, strategy="ddp", devices=2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["test", "predict"])
def test_several_processes_write_one_file_with_every_answer_once_in_file_order(loop, tmp_path):
    # 9 ids: the test sampler repeats one; ranks get ids 0, 2, 4, ... and 1, 3, 5, ...
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_answer_on_two_ranks, args=(port, str(tmp_path), loop), nprocs=2, join=True)
    name = f"answers_{loop}.jsonl"
    assert [a["question_id"] for a in read(tmp_path, name)] == IDS[:9]  # LLaVA's POPE evaluation pairs answers by position
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # the rank files are gone


class TwoPerImage(Answering):
    """MME: each image id has two questions, so one id answers two prompts."""

    def predict_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError(f"failed at batch {batch_idx}")
        return [{"question_id": 7 + int(index) // 2, "prompt": f"part {int(index) % 2}", "text": "yes",
                 "model_id": "m", "dataset_index": int(index)} for index, _ in zip(*batch)]


def test_two_questions_of_one_id_are_both_written_and_a_reused_writer_writes_a_second_run(tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[AnswerFileWriter(dirpath=str(tmp_path))])
    for _ in range(2):  # e.g. a second test in one process: its file is whole, not empty
        trainer.test(TwoPerImage(), questions([0] * 6), verbose=False)
        assert [(a["question_id"], a["prompt"]) for a in read(tmp_path)] == [
            (q, f"part {p}") for q in (7, 8, 9) for p in (0, 1)]


def test_under_a_process_group_a_crashed_run_leaves_no_old_answers(tmp_path, one_process_group):
    (tmp_path / "answers_test.jsonl").write_text('{"question_id": 1, "text": "an older run"}\n')
    (tmp_path / "answers_test.rank0.jsonl").write_text('{"question_id": 2, "text": "an older crash"}\n')
    with pytest.raises(RuntimeError, match="failed at batch 1"):
        run_test(tmp_path, Answering(fail_at=1))
    assert (tmp_path / "answers_test.jsonl").read_text() == ""  # not the older run's, which would pass for this one's
    assert [a["question_id"] for a in read(tmp_path, "answers_test.rank0.jsonl")] == IDS[:4]
    run_test(tmp_path, Answering())
    assert [a["question_id"] for a in read(tmp_path)] == IDS
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".jsonl") == ["answers_test.jsonl"]
