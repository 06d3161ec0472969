"""The sweep's answer files (`PruningSweep(answers=True)`): one LLaVA answer file per pair whose exact-match rate is
the row's accuracy, written to `answers.partial/` as pairs end and moved to `answers/` by a complete sweep only;
under several ranks rank 0 writes every rank's records once, in question-file order."""

from __future__ import annotations

import json

import pytest

from callbacks.sweep import PruningSweep
from lvlm_prune.evaluation.paired import score_answers_exact_match
from test_sweep import TINY_DATA_ARGS, data, frozen_base, read_rows, trainer  # noqa: F401


def test_a_complete_sweep_writes_one_answer_file_per_pair_matching_its_row(tiny_base_dir, data, tmp_path):  # noqa: F811
    sweep = PruningSweep(methods=["full", "random"], prune_ratios=[0.5, 0.75], dirpath=str(tmp_path), answers=True)
    trainer(tmp_path, sweep).test(frozen_base(tiny_base_dir, data), datamodule=data)

    answers = tmp_path / "answers"
    assert sorted(p.name for p in answers.iterdir()) == ["full_r0.jsonl", "random_r0.5.jsonl", "random_r0.75.jsonl"]
    assert not (tmp_path / "answers.partial").exists()
    for row in read_rows(tmp_path / "sweep.csv"):
        path = answers / f"{row['method']}_r{float(row['prune_ratio']):g}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == TINY_DATA_ARGS["num_test"] == int(row["num_samples"])
        assert {r["model_id"] for r in records} == {f"{row['method']}@r={float(row['prune_ratio'])}"}
        assert all(r["answer"] is not None and r["category"] for r in records)
        scored = score_answers_exact_match(path)
        assert sum(scored.correct.values()) / len(scored.correct) == pytest.approx(float(row["accuracy"]), abs=1e-9)
    first = [json.loads(line)["question_id"] for line in (answers / "full_r0.jsonl").read_text().splitlines()]
    assert first == [sample.question_id for sample in data.samples("test")]  # the split's order


def test_answers_are_off_by_default(tiny_base_dir, data, tmp_path):  # noqa: F811
    sweep = PruningSweep(methods=["full"], prune_ratios=[0.5], dirpath=str(tmp_path))
    trainer(tmp_path, sweep).test(frozen_base(tiny_base_dir, data), datamodule=data)
    assert not (tmp_path / "answers").exists() and not (tmp_path / "answers.partial").exists()


def test_a_failing_sweep_keeps_finished_pairs_in_the_partial_folder_and_the_last_whole_sweep(
        tiny_base_dir, data, tmp_path):  # noqa: F811
    module = frozen_base(tiny_base_dir, data)
    sweep = PruningSweep(methods=["full", "random"], prune_ratios=[0.5], dirpath=str(tmp_path), answers=True)
    trainer(tmp_path, sweep).test(module, datamodule=data)
    complete = {p.name: p.read_text() for p in (tmp_path / "answers").iterdir()}
    (tmp_path / "answers.partial").mkdir()
    (tmp_path / "answers.partial" / "stale_r0.3.jsonl").write_text("{}\n")  # an earlier sweep that stopped

    original = module.run_method

    def run_method(batch, name, ratio):
        if name == "random":
            raise RuntimeError("boom")
        return original(batch, name, ratio)

    module.run_method = run_method
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, sweep).test(module, datamodule=data)
    assert sorted(p.name for p in (tmp_path / "answers.partial").iterdir()) == ["full_r0.jsonl"]
    assert {p.name: p.read_text() for p in (tmp_path / "answers").iterdir()} == complete


def test_under_two_ranks_rank_0_writes_every_question_once_in_question_file_order(tmp_path, monkeypatch):
    """What the gather hands rank 0: a distributed sampler deals questions 0-4 out rank by rank and repeats
    question 0 to even the ranks out."""
    import torch.distributed as dist

    def record(i):
        return {"question_id": f"q{i}", "prompt": f"question {i}", "text": "yes", "answer": "yes", "category": "exist",
                "model_id": "random@r=0.5", "dataset_index": i}

    ranks = {0: [record(i) for i in (0, 2, 4)], 1: [record(i) for i in (1, 3, 0)]}

    def all_gather_object(gathered, mine):
        assert mine == ranks[0] and len(gathered) == 2
        gathered[:] = [ranks[0], ranks[1]]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    sweep = PruningSweep(methods=["random"], prune_ratios=[0.5], answers=True)
    sweep._answers_to, sweep._pair_records = tmp_path, list(ranks[0])
    sweep._write_answers("random", 0.5, 2)
    records = [json.loads(line) for line in (tmp_path / "random_r0.5.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in records] == ["q0", "q1", "q2", "q3", "q4"]
    assert all("dataset_index" not in r and r["answer_id"] and r["metadata"] == {} for r in records)
    assert sweep._pair_records == []


def test_a_later_complete_sweep_replaces_the_earlier_ones_answer_files(tiny_base_dir, data, tmp_path):  # noqa: F811
    module = frozen_base(tiny_base_dir, data)
    trainer(tmp_path, PruningSweep(methods=["full", "random"], prune_ratios=[0.5], dirpath=str(tmp_path),
                                   answers=True)).test(module, datamodule=data)
    trainer(tmp_path, PruningSweep(methods=["random"], prune_ratios=[0.75], dirpath=str(tmp_path),
                                   answers=True)).test(module, datamodule=data)
    assert sorted(p.name for p in (tmp_path / "answers").iterdir()) == ["random_r0.75.jsonl"]


def test_only_rank_0_writes_answer_files(tiny_base_dir, data, tmp_path):  # noqa: F811
    from test_sweep import stub_trainer

    data.setup("test")
    other_rank = stub_trainer(data, tmp_path)
    other_rank.is_global_zero = False
    PruningSweep(methods=["full"], prune_ratios=[0.5], dirpath=str(tmp_path), answers=True).run(
        other_rank, frozen_base(tiny_base_dir, data))
    assert list(tmp_path.iterdir()) == []
