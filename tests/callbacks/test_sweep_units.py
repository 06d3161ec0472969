"""Units of the pruning sweep, the answer-file writer and the answer exports, pinned without the tiny model's
generation: a scripted module stands in where the sweep needs one (its batches carry their answers, visual-token
counts, text tokens and seconds), so every number of a row is known by hand."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.answer_writer import AnswerFileWriter
from callbacks.sweep import SUM_FIELDS, PruningSweep, accuracy_vs_flops_figure, sweep_batch_count, with_context
from lvlm_prune.evaluation.export import (
    answer_id_for,
    build_answer_records,
    write_answers_jsonl,
    write_gqa_predictions,
    write_vqav2_submission,
)
from lvlm_prune.evaluation.readers import AnswerRecord, QuestionRecord
from lvlm_prune.runner import GenerationResult
from test_sweep import _Accuracy, read_rows, stub_trainer

IMAGE = 63  # the tiny base's image token id


# ----------------------------------------------------------------------------------------------------------------
# the sweep's settings, pairs and batch limits


def test_settings_outside_their_ranges_are_refused_and_their_edges_accepted():
    """The split is 'val' or 'test'; ratios lie in [0, 1); ratio_tolerance in [0, 1); kept_tolerance >= 0."""
    with pytest.raises(ValueError, match=r"^sweep split='train'; choose 'val' or 'test'$"):
        PruningSweep(split="train")
    for ratio in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"sweep prune ratio {ratio} must be in \[0, 1\)"):
            PruningSweep(prune_ratios=[0.5, ratio])
    with pytest.raises(ValueError, match=r"ratio_tolerance=1\.0 must be in \[0, 1\)"):
        PruningSweep(ratio_tolerance=1.0)
    for tolerance in (-0.5, math.nan):
        with pytest.raises(ValueError, match=r"kept_tolerance=.* must be >= 0"):
            PruningSweep(kept_tolerance=tolerance)
    edges = PruningSweep(methods=["random"], prune_ratios=[0.0, 0.5], ratio_tolerance=0.0, kept_tolerance=0.0)
    assert edges.pairs() == [("random", 0.0), ("random", 0.5)]
    assert (edges.ratio_tolerance, edges.kept_tolerance) == (0.0, 0.0)


def test_pairs_run_full_once_first_then_each_method_over_its_ratios_in_order():
    sweep = PruningSweep(methods=["random", "full", "fastv"], prune_ratios=[0.75, 0.5])
    assert sweep.pairs() == [("full", 0.0), ("random", 0.75), ("random", 0.5), ("fastv", 0.75), ("fastv", 0.5)]
    assert PruningSweep(methods=["random"], prune_ratios=[0.5]).pairs() == [("random", 0.5)]  # no 'full' asked


def test_the_test_batch_limit_edge_cases():
    """A boolean limit is not a count; a small fraction still takes one batch; a fraction of a loader without a
    length is unknown (all of it); a limit beyond the loader's length counts the batches there are."""
    sweep = PruningSweep(methods=["full"], prune_ratios=[0.5])
    loader = list(range(10))
    assert sweep._batch_limit(SimpleNamespace(limit_test_batches=True, world_size=2), loader) is None
    assert sweep._batch_limit(SimpleNamespace(limit_test_batches=0.01, world_size=1), loader) == 1
    assert sweep._batch_limit(SimpleNamespace(limit_test_batches=0.5, world_size=1), iter(loader)) is None
    assert sweep_batch_count(loader, 25) == 10 and sweep_batch_count(loader, 3) == 3
    assert sweep_batch_count(loader, None) == 10


# ----------------------------------------------------------------------------------------------------------------
# a row from its sums


class _ByCategory:
    def compute(self):
        return {"acc": torch.tensor(0.75), "acc/colour": torch.tensor(0.5), "acc/shape": torch.tensor(1.0)}


def sums_of(**fields) -> torch.Tensor:
    return torch.tensor([float(fields.get(name, 0.0)) for name in SUM_FIELDS], dtype=torch.float64)


def test_a_row_divides_every_sum_by_the_sample_count():
    """4 samples of 16 input visual tokens keeping 12 on average (r = 0.25): every column a per-sample mean."""
    sums = sums_of(samples=4, visual_tokens=48, text_tokens=40, llm_flops=8e12, plugin_flops=2e12,
                   total_flops_exact=20e12, latency_ms=100, kept_fraction=3, llm_flops_exact=16e12,
                   input_visual_tokens=64)
    row = PruningSweep(methods=["random"], prune_ratios=[0.25])._row(_ByCategory(), sums, "random", 0.25)
    assert row == {
        "method": "random", "prune_ratio": 0.25, "realised_prune_ratio": 0.25, "avg_visual_tokens": 12.0,
        "text_tokens": 10.0, "tflops": 2.0, "tflops_llm": 2.0, "tflops_llm_exact": 4.0, "tflops_plugins": 0.5,
        "tflops_total": 5.0, "latency_ms": 25.0, "accuracy": 0.75, "num_samples": 4, "status": "ok",
        "accuracy_by_category": {"colour": 0.5, "shape": 1.0}}


def row_status(ratio: float, kept_fraction: float, inputs: float = 16.0, **tolerances) -> str:
    sums = sums_of(samples=1, kept_fraction=kept_fraction, input_visual_tokens=inputs)
    return PruningSweep(methods=["random"], prune_ratios=[ratio], **tolerances)._row(_Accuracy(), sums, "random",
                                                                                       ratio)["status"]


def test_the_tolerances_are_inclusive_bounds():
    """Exactly `ratio_tolerance` from the requested ratio, or exactly `kept_tolerance` x budget + 1 tokens from the
    budget's count, still meets the budget (binary fractions: no rounding)."""
    # r = 0.5 of 16 tokens: budget 8; 12 kept realises 0.25, 0.25 away; 4 tokens over, within 1.0 x 8 + 1
    assert row_status(0.5, 0.75, ratio_tolerance=0.25, kept_tolerance=1.0) == "ok"
    assert row_status(0.5, 0.76, ratio_tolerance=0.25, kept_tolerance=1.0).startswith("unreachable: realised r=0.240")
    # 13 kept: 5 over the budget of 8 = 0.5 x 8 + 1
    assert row_status(0.5, 0.8125, ratio_tolerance=0.5, kept_tolerance=0.5) == "ok"
    assert row_status(0.5, 0.875, ratio_tolerance=0.5, kept_tolerance=0.5).startswith(
        "unreachable: realised r=0.125 keeps 14.0 visual tokens where r=0.5 keeps 8.0")


def test_pruning_beyond_the_budget_is_as_unreachable_as_pruning_short_of_it():
    """Keeping too few tokens is a miss too: 16 of 576 at r = 0.969 (budget 17.9) is fine, 10 is not (within the
    ratio tolerance, 7.9 tokens under the budget); r = 0.4 realised for 0.3 is 0.1 off."""
    assert row_status(0.969, 16 / 576, inputs=576.0) == "ok"
    assert row_status(0.969, 10 / 576, inputs=576.0).startswith("unreachable: realised r=0.983 keeps 10.0 visual")
    assert row_status(0.3, 0.6) == ("unreachable: realised r=0.400 is 0.100 from the requested 0.3 "
                                    "(ratio_tolerance 0.05)")


def test_with_context_rebuilds_a_plain_error_and_notes_one_whose_message_it_cannot_rebuild():
    runtime = RuntimeError("boom")
    named = with_context(runtime, "sweep stopped at random r=0.5")
    assert type(named) is RuntimeError and named is not runtime and str(named) == "boom\nsweep stopped at random r=0.5"
    key = KeyError("colour")  # str(KeyError(message)) quotes the message: it keeps its own and gets a note
    assert with_context(key, "sweep stopped") is key
    assert str(key) == "'colour'" and key.__notes__ == ["sweep stopped"]
    decode = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")  # needs five arguments
    assert with_context(decode, "sweep stopped") is decode and decode.__notes__ == ["sweep stopped"]


# ----------------------------------------------------------------------------------------------------------------
# the figure and the logged scalars


ROWS = [
    {"method": "full", "prune_ratio": 0.0, "status": "ok", "tflops_total": 0.002, "tflops": 0.0009, "accuracy": 0.6},
    {"method": "random", "prune_ratio": 0.25, "status": "ok", "tflops_total": 0.0015, "tflops": 0.0006,
     "accuracy": 0.55},
    {"method": "random", "prune_ratio": 0.5, "status": "ok", "tflops_total": 0.001, "tflops": 0.0004, "accuracy": 0.5},
    {"method": "random", "prune_ratio": 0.9, "status": "unreachable: realised r=0.700 is 0.200 from the requested 0.9",
     "tflops_total": 0.0007, "tflops": 0.0003, "accuracy": 0.1},
    {"method": "fastv", "prune_ratio": 0.5, "status": "ok", "tflops_total": 0.0012, "tflops": 0.0005, "accuracy": 0.58},
    {"method": "pool", "prune_ratio": 0.5, "status": "unreachable: pool: no grid"},
]


def test_the_figure_draws_each_method_by_ascending_gflops_and_full_as_a_star_from_ok_rows_only():
    import matplotlib.pyplot as plt

    figure = accuracy_vs_flops_figure(ROWS)
    try:
        (axis,) = figure.axes
        lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axis.lines}
        assert lines == {"random": ([1.0, 1.5], [0.5, 0.55]), "fastv": ([1.2], [0.58])}
        (star,) = axis.collections
        assert star.get_label() == "full" and star.get_offsets().tolist() == [[2.0, 0.6]]
        assert axis.get_ylim() == (0.0, 1.02)
    finally:
        plt.close(figure)


class _Experiment:
    def __init__(self):
        self.scalars, self.figures = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_figure(self, tag, figure, step):
        self.figures.append((tag, step))


def test_only_rows_that_meet_their_budget_are_logged_at_the_trainers_step(tmp_path):
    """A measured 'unreachable' row stays in the table but gives no `acc@r` scalar (it did not meet the budget);
    the table's json names the convention and the split."""
    experiment = _Experiment()
    trainer = SimpleNamespace(logger=SimpleNamespace(experiment=experiment, log_dir=str(tmp_path)), global_step=7)
    sweep = PruningSweep(methods=["full", "random", "fastv", "pool"], prune_ratios=[0.5], split="val",
                         flops_convention="exact")
    sweep.rows = ROWS
    sweep._write(trainer)
    assert sorted(experiment.scalars) == sorted(
        (f"sweep/{r['method']}/{name}@r={r['prune_ratio']}", r[column], 7)
        for r in ROWS if r["status"] == "ok" for name, column in (("acc", "accuracy"), ("tflops", "tflops")))
    assert experiment.figures == [("sweep/accuracy_vs_flops", 7)]
    written = json.loads((tmp_path / "sweep.json").read_text())
    assert (written["flops_convention"], written["split"], written["rows"]) == ("exact", "val", ROWS)
    assert [r["method"] for r in read_rows(tmp_path / "sweep.csv")] == [r["method"] for r in ROWS]


# ----------------------------------------------------------------------------------------------------------------
# the sweep over a scripted module


@pytest.fixture(scope="module")
def config(tiny_base_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_base_dir)


class Scripted(torch.nn.Module):
    """Stands in for a module in the sweep: a batch carries its predictions, visual tokens per layer, text tokens
    and seconds; `make_method` refuses ratios above `reach`; `calls` records (method, ratio, training)."""

    def __init__(self, config, reach: float = 0.99):
        super().__init__()
        self.categories, self.device, self.reach, self.calls = ["colour", "shape"], torch.device("cpu"), reach, []
        self.base, self.engine = SimpleNamespace(config=config), SimpleNamespace(image_token_id=IMAGE)

    def method_names(self) -> list[str]:
        return ["full", "random"]

    def make_method(self, name: str, ratio: float) -> None:
        if ratio > self.reach:
            raise ValueError(f"{name}: prune_ratio={ratio} cannot be reached")

    def transfer_batch_to_device(self, batch, device, index):
        return batch

    def run_method(self, batch, name, ratio):
        self.calls.append((name, ratio, self.training))
        n = len(batch["answers"])
        result = GenerationResult(tokens=torch.zeros(n, 1, dtype=torch.long), visual_tokens_per_layer=batch["counts"],
                                  text_tokens=batch["text"], plugin_flops={"pruner": batch["plugin"]})
        return batch["predictions"], result, batch["seconds"]


def scripted_batch(predictions, answers, categories, inputs, counts, text, seconds, plugin) -> dict:
    ids = torch.zeros(len(inputs), max(inputs) + 3, dtype=torch.long)
    for row, count in enumerate(inputs):
        ids[row, 1:1 + count] = IMAGE
    return {"predictions": predictions, "answers": answers, "categories": categories, "prompt_input_ids": ids,
            "counts": torch.tensor(counts), "text": torch.tensor(text), "seconds": seconds,
            "plugin": torch.tensor(plugin, dtype=torch.float64)}


# two batches, three samples: 16 and 8 input visual tokens keeping 12 and 3 on average over the 4 layers, then 16
# keeping 4; 2 of 3 answers right (colour 1 of 2, shape 1 of 1)
BATCHES = [
    scripted_batch(["red", "blue"], ["red", "red"], ["colour", "colour"], [16, 8], [[16, 16, 8, 8], [4, 4, 2, 2]],
                   [10, 20], 0.5, [1e9, 2e9]),
    scripted_batch(["square"], ["square"], ["shape"], [16], [[4, 4, 4, 4]], [30], 0.25, [3e9]),
]


def scripted_data(batches=BATCHES, **fields) -> SimpleNamespace:
    return SimpleNamespace(test_dataloader=lambda: list(batches), hparams={}, **fields)


def test_a_rows_counts_are_per_sample_means_and_its_ratio_the_mean_of_each_samples_own(config, tmp_path):
    """Realised r = 1 - mean(kept / own input) = 1 - (12/16 + 3/8 + 4/16) / 3 (samples of different input counts,
    as LLaVA-NeXT's, are not pooled); the budget's count is on the mean input, 40/3 tokens; latency in milliseconds
    per sample; the module in eval mode while it sweeps, left in the mode it had."""
    module = Scripted(config).train()
    sweep = PruningSweep(methods=["random"], prune_ratios=[0.55, 0.4], dirpath=str(tmp_path), ratio_tolerance=0.2,
                         kept_tolerance=0.0)
    row, far = sweep.run(stub_trainer(scripted_data(), tmp_path), module)
    assert row["realised_prune_ratio"] == pytest.approx(1 - 1.375 / 3, abs=1e-12)
    assert row["avg_visual_tokens"] == pytest.approx(19 / 3, abs=1e-12)
    assert (row["text_tokens"], row["latency_ms"], row["num_samples"]) == (20.0, 250.0, 3)
    assert row["tflops_plugins"] == pytest.approx(2e-3, rel=1e-12)
    assert row["accuracy"] == pytest.approx(2 / 3) and row["accuracy_by_category"] == {"colour": 0.5, "shape": 1.0}
    assert row["status"] == "ok"  # keeps 40/3 x (1 - 0.542) = 6.1 tokens, 0.1 from the budget's 6.0
    assert far["status"] == ("unreachable: realised r=0.542 keeps 6.1 visual tokens where r=0.4 keeps 8.0 "
                             "(kept_tolerance 0.0, plus one token)")
    assert {training for _, _, training in module.calls} == {False} and module.training


def test_the_pairs_run_in_the_trainers_precision_context(config, tmp_path):
    import contextlib

    inside = []

    @contextlib.contextmanager
    def forward_context():
        inside.append(True)
        yield
        inside.append(False)

    module, seen = Scripted(config), []
    run_method = module.run_method
    module.run_method = lambda *args: seen.append(inside[-1:] == [True]) or run_method(*args)
    trainer = stub_trainer(scripted_data(), tmp_path)
    trainer.precision_plugin = SimpleNamespace(forward_context=forward_context)
    PruningSweep(methods=["random"], prune_ratios=[0.55], dirpath=str(tmp_path)).run(trainer, module)
    assert seen == [True] * 3  # the warm-up and the two batches


def test_a_rerun_of_the_same_sweep_starts_its_rows_over(config, tmp_path):
    sweep = PruningSweep(methods=["random"], prune_ratios=[0.55], dirpath=str(tmp_path))
    for _ in range(2):
        rows = sweep.run(stub_trainer(scripted_data(), tmp_path), Scripted(config))
    assert [row["method"] for row in rows] == ["random"] and len(read_rows(tmp_path / "sweep.csv")) == 1


def test_a_rank_runs_as_many_batches_as_the_busiest_and_its_row_sums_every_ranks_counts(config, monkeypatch):
    """Rank 1 of 2 over 3 batches: its own batch 1, then batch 0 again untimed (rank 0 runs 0 and 2). The row adds
    the ranks' sums (here a peer with the same counts: the reduction doubles them), so means are unchanged."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor.mul_(2))  # a peer rank with the same counts
    module = Scripted(config)
    loader = [BATCHES[0], BATCHES[1], BATCHES[0]]
    row = PruningSweep(methods=["random"], prune_ratios=[0.4])._evaluate_pair(module, loader, "random", 0.4, 1, 2)
    assert len(module.calls) == 2
    assert (row["num_samples"], row["avg_visual_tokens"], row["latency_ms"]) == (2, 4.0, 250.0)
    module.calls.clear()
    PruningSweep(methods=["random"], prune_ratios=[0.4])._evaluate_pair(module, loader, "random", 0.4, 0, 2)
    assert len(module.calls) == 2  # batches 0 and 2: no extra round


def test_setup_names_unknown_methods_and_checks_each_method_at_r_0_only(config):
    """A method that runs at r = 0 passes setup even when a listed ratio is beyond its reach (that pair becomes an
    'unreachable' row); a method the module does not know fails."""
    trainer = SimpleNamespace(datamodule=scripted_data())
    PruningSweep(methods=["full", "random"], prune_ratios=[0.5]).setup(trainer, Scripted(config, reach=0.3), "test")
    with pytest.raises(ValueError, match=r"^sweep methods \['fastvv'\] are unknown to Scripted; known: \['full', "
                                         r"'random'\]$"):
        PruningSweep(methods=["random", "fastvv"], prune_ratios=[0.5]).setup(trainer, Scripted(config), "test")


def no_data(error=ValueError("no test_question_file")) -> SimpleNamespace:
    def refuse():
        raise error

    return SimpleNamespace(test_dataloader=refuse, val_dataloader=refuse,
                           hparams={"test_question_file": None, "eval_batch_size": 8, "val_size": 4})


def test_setup_checks_the_split_only_for_a_stage_that_sweeps(config):
    module = Scripted(config)
    trainer = SimpleNamespace(datamodule=no_data())
    PruningSweep(methods=["full"], run_after_fit=False).setup(trainer, module, "fit")
    PruningSweep(methods=["full"], run_after_test=False).setup(trainer, module, "test")
    PruningSweep(methods=["full"]).setup(trainer, module, "validate")
    with pytest.raises(ValueError, match="has no test data"):
        PruningSweep(methods=["full"]).setup(trainer, module, "fit")


def test_a_split_without_data_names_only_its_own_settings_and_the_other_split():
    """'val' inside 'eval_batch_size' is not a validation setting; the advice offers the other split."""
    with pytest.raises(ValueError, match=r"SimpleNamespace has no test data \(no test_question_file\); give the test "
                                         r"split data \(data\.test_question_file\) or set the sweep's split to 'val'$"):
        PruningSweep(methods=["full"])._loader(SimpleNamespace(datamodule=no_data()))
    with pytest.raises(ValueError, match=r"give the val split data \(data\.val_size\) or set the sweep's split to "
                                         r"'test'$"):
        PruningSweep(methods=["full"], split="val")._loader(SimpleNamespace(datamodule=no_data()))


def test_an_empty_split_fails_at_setup_and_a_loader_without_length_is_left_to_the_pairs(config):
    empty = SimpleNamespace(test_dataloader=lambda: [], hparams={})
    with pytest.raises(ValueError, match=r"the test split of SimpleNamespace is empty; give the test split data"):
        PruningSweep(methods=["full"]).setup(SimpleNamespace(datamodule=empty), Scripted(config), "test")
    unsized = SimpleNamespace(test_dataloader=lambda: iter(BATCHES), hparams={})
    PruningSweep(methods=["full"]).setup(SimpleNamespace(datamodule=unsized), Scripted(config), "test")


def test_a_sweep_switched_off_for_a_stage_does_not_run_at_its_end(config):
    """No datamodule: a sweep that ran would fail on it."""
    trainer = SimpleNamespace(datamodule=None, sanity_checking=False, global_step=5,
                              fit_loop=SimpleNamespace(done=True))
    sweep = PruningSweep(methods=["full"], run_after_fit=False, run_after_test=False)
    sweep.on_train_end(trainer, Scripted(config))
    sweep.on_fit_end(trainer, Scripted(config))
    sweep.on_test_end(trainer, Scripted(config))
    assert sweep.rows == []


def test_a_resumed_fit_that_ran_no_training_batch_says_the_sweep_did_not_run(config):
    """Resumed mid-run with no training batch (limit_train_batches 0): Lightning skips the training loop and
    on_train_end, so the sweep after fit cannot run; fit ends with an error naming why, not in silence."""
    trainer = SimpleNamespace(datamodule=None, sanity_checking=False, global_step=5, num_training_batches=0,
                              fit_loop=SimpleNamespace(done=False))
    sweep = PruningSweep(methods=["full"])
    sweep.on_fit_start(trainer, Scripted(config))
    with pytest.raises(ValueError, match=r"resumed at step 5 but ran no training batch \(0 training batches"):
        sweep.on_fit_end(trainer, Scripted(config))
    sweep.on_fit_start(trainer, Scripted(config))
    sweep._swept_after_fit = True  # what on_train_end records after it swept
    sweep.on_fit_end(trainer, Scripted(config))


# ----------------------------------------------------------------------------------------------------------------
# the answer-file writer


class Replying(L.LightningModule):
    """Answers with the records its batches hold; `late`: test answers join `test_predictions` in the module's own
    `on_test_batch_end`, which Lightning calls after the callbacks' hook."""

    def __init__(self, late: bool = False):
        super().__init__()
        self.layer, self.late, self.test_predictions, self.pending = torch.nn.Linear(1, 1), late, [], []

    def predict_step(self, batch, batch_idx):
        return [dict(record) for record in batch]

    def test_step(self, batch, batch_idx):
        (self.pending if self.late else self.test_predictions).extend(self.predict_step(batch, batch_idx))

    def on_test_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        self.test_predictions.extend(self.pending)
        self.pending = []


def answers(ids, **fields) -> list[dict]:
    return [{"question_id": q, "prompt": f"question {q}", "text": "yes", **fields} for q in ids]


def write_answers(directory, module, records, loop="test", logger=False, **writer_args) -> None:
    writer = AnswerFileWriter(**writer_args) if writer_args else AnswerFileWriter(dirpath=str(directory))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[writer],
                        default_root_dir=directory)
    getattr(trainer, loop)(module, DataLoader(records, batch_size=2, collate_fn=list))


def read_answers(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_a_module_adds_after_the_writers_batch_hook_are_written_too(tmp_path):
    """The last batch's answers reach the file at the epoch's end."""
    write_answers(tmp_path, Replying(late=True), answers([1, 2, 3]))
    assert [a["question_id"] for a in read_answers(tmp_path / "answers_test.jsonl")] == [1, 2, 3]


def test_an_id_is_one_question_whatever_its_type_and_a_records_own_answer_id_is_kept(tmp_path):
    records = [{**answers([1])[0], "answer_id": "from-the-module"}, *answers(["1"]), *answers([2])]
    write_answers(tmp_path, Replying(), records, loop="predict")
    written = read_answers(tmp_path / "answers_predict.jsonl")
    assert [(a["question_id"], a["answer_id"]) for a in written] == [
        (1, "from-the-module"), (2, answer_id_for(2, "question 2"))]


def test_predict_outputs_with_a_record_that_is_not_a_dict_are_named(tmp_path):
    class HalfTyped(Replying):
        def predict_step(self, batch, batch_idx):
            return [dict(batch[0]), "yes"]

    with pytest.raises(TypeError, match=r"HalfTyped\.predict_step returned list; the answer file needs a list of "
                                        r"answer records"):
        write_answers(tmp_path, HalfTyped(), answers([1, 2]), loop="predict")


def test_the_file_goes_to_the_loggers_directory_under_its_own_name(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="run")
    write_answers(tmp_path, Replying(), answers([1]), logger=logger, filename="mine.jsonl")
    assert [a["question_id"] for a in read_answers(tmp_path / "csv" / "run" / "mine.jsonl")] == [1]
    write_answers(tmp_path, Replying(), answers([2]), dirpath=str(tmp_path / "new" / "folder"))
    assert [a["question_id"] for a in read_answers(tmp_path / "new" / "folder" / "answers_test.jsonl")] == [2]


def test_the_merged_file_is_in_question_file_order_with_each_answer_once(tmp_path, one_process_group):
    """Rank 0 orders by `dataset_index` when every record has one (not written), repeats dropped."""
    records = [{**record, "dataset_index": index} for index, record in zip([3, 2, 1, 0], answers([13, 12, 11, 10]))]
    write_answers(tmp_path, Replying(), records + records[:1])
    assert [a["question_id"] for a in read_answers(tmp_path / "answers_test.jsonl")] == [10, 11, 12, 13]
    assert "dataset_index" not in read_answers(tmp_path / "answers_test.jsonl")[0]


def test_the_merged_file_keeps_the_answer_order_when_a_record_has_no_index(tmp_path, one_process_group):
    records = [{**answers([13])[0], "dataset_index": 3}, *answers([12]), {**answers([11])[0], "dataset_index": 1}]
    write_answers(tmp_path, Replying(), records, loop="predict")
    assert [a["question_id"] for a in read_answers(tmp_path / "answers_predict.jsonl")] == [13, 12, 11]


# ----------------------------------------------------------------------------------------------------------------
# the answer exports


def test_answer_ids_separate_the_id_from_the_prompt_and_ignore_the_ids_type():
    assert answer_id_for(1, "2") != answer_id_for(12, "")
    assert answer_id_for(7, "q") == answer_id_for("7", "q")


def test_answer_records_keep_the_question_text_verbatim_and_need_one_prediction_each():
    questions = [QuestionRecord(question_id=3, text=" What colour?\n"), QuestionRecord(question_id=4, text="Shape?")]
    (first, second) = build_answer_records(questions, ["red", "round"], model_id="m")
    assert (first.prompt, first.text, first.model_id) == (" What colour?\n", "red", "m")
    assert second.answer_id == answer_id_for(4, "Shape?")
    with pytest.raises(ValueError, match=r"got 3 predictions for 2 questions"):
        build_answer_records(questions, ["red", "round", "extra"], model_id="m")


def test_an_answer_file_writes_each_records_fields_and_refuses_only_a_repeated_id_and_prompt(tmp_path):
    """MME: one id, two prompts, both written; an id repeated as int and str is the same question."""
    path = write_answers_jsonl(tmp_path / "new" / "answers.jsonl", [
        AnswerRecord(question_id=5, text="Yes", prompt="Is it red?", answer_id="mine", model_id="m",
                     extra={"category": "colour"}),
        AnswerRecord(question_id=5, text="No", prompt="Is it blue?", model_id="m")])
    assert read_answers(path) == [
        {"question_id": 5, "prompt": "Is it red?", "text": "Yes", "answer_id": "mine", "model_id": "m", "metadata": {},
         "category": "colour"},
        {"question_id": 5, "prompt": "Is it blue?", "text": "No", "answer_id": answer_id_for(5, "Is it blue?"),
         "model_id": "m", "metadata": {}}]
    with pytest.raises(ValueError, match=r"question id '5' with prompt 'Is it red\?' appears twice"):
        write_answers_jsonl(tmp_path / "a.jsonl", [AnswerRecord(question_id=5, text="Yes", prompt="Is it red?"),
                                                    AnswerRecord(question_id="5", text="No", prompt="Is it red?")])


def test_gqa_predictions_are_converted_keyed_by_string_ids_and_written_where_asked(tmp_path):
    path = write_gqa_predictions(tmp_path / "new" / "predictions", [AnswerRecord(question_id=201, text="Yes."),
                                                                   AnswerRecord(question_id="202", text="Left")])
    assert path == tmp_path / "new" / "predictions"  # not a folder: the file itself
    assert json.loads(path.read_text()) == [{"questionId": "201", "prediction": "yes"},
                                            {"questionId": "202", "prediction": "left"}]
    with pytest.raises(ValueError, match=r"question id '201' appears twice"):
        write_gqa_predictions(tmp_path / "p.json", [AnswerRecord(question_id=201, text="yes"),
                                                    AnswerRecord(question_id="201", text="no")])


def test_the_vqav2_submission_matches_answers_to_questions_by_string_id_and_refuses_repeats(tmp_path):
    questions = [QuestionRecord(question_id=5, text="How many?"), QuestionRecord(question_id=6, text="What?")]
    path = write_vqav2_submission(tmp_path / "new" / "submission.json", questions,
                                  [AnswerRecord(question_id="5", text="Two"), AnswerRecord(question_id=6, text="Dog.")])
    assert json.loads(path.read_text()) == [{"question_id": 5, "answer": "2"}, {"question_id": 6, "answer": "dog"}]
    with pytest.raises(ValueError, match=r"question id 5 appears twice"):
        write_vqav2_submission(tmp_path / "s.json", questions, [AnswerRecord(question_id="5", text="2"),
                                                                AnswerRecord(question_id=5, text="3")])


def test_a_rank_appends_to_its_own_rank_file_in_rank_zeros_directory(tmp_path, one_process_group, monkeypatch):
    """As rank 1 of a group sees it: its finished batches are in `answers_test.rank1.jsonl` after a crash, in the
    directory rank 0 broadcast (a logger may resolve its version directory differently on other ranks)."""
    import torch.distributed as dist

    from callbacks import answer_writer

    calls = ("is_available", "is_initialized", "get_world_size", "all_gather_object", "barrier")
    monkeypatch.setattr(answer_writer, "dist", SimpleNamespace(get_rank=lambda: 1, **{
        name: getattr(dist, name) for name in calls}))

    class Failing(Replying):
        def test_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("failed at batch 1")
            super().test_step(batch, batch_idx)

    writer = AnswerFileWriter(dirpath=str(tmp_path / "own"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[writer])
    monkeypatch.setattr(trainer.strategy, "broadcast", lambda obj, src=0: str(tmp_path / "zero" / "answers_test.jsonl"))
    with pytest.raises(RuntimeError, match="failed at batch 1"):
        trainer.test(Failing(), DataLoader(answers([1, 2, 3]), batch_size=2, collate_fn=list))
    assert [a["question_id"] for a in read_answers(tmp_path / "zero" / "answers_test.rank1.jsonl")] == [1, 2]
    assert not (tmp_path / "own").exists()
