"""The pruning sweep on the tiny base: finished rows survive a failing pair (which is named, out-of-memory advice
kept), a split without data fails before training, no sweep after a fit of zero steps, and a realised ratio far
from the requested one is not recorded as meeting the budget."""

import csv
import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from callbacks.sweep import PruningSweep
from conftest import TINY_DATA_ARGS
from datamodules.llava import LlavaInstructionDataModule
from datamodules.synthetic import SyntheticVQADataModule
from lightning_modules.compensation import CompensationModule
from lightning_modules.frozen_base import FrozenBaseModule
from lvlm_prune.evaluation.normalize import normalize_answer
from lvlm_prune.rcp.compensation import RCPCompensation


@pytest.fixture(scope="module")
def data(tiny_base_dir):
    return SyntheticVQADataModule(processor_path=str(tiny_base_dir), **TINY_DATA_ARGS)


@pytest.fixture(scope="module")
def train_only_data(tiny_base_dir, data, tmp_path_factory):
    """LLaVA instruction data with neither a validation nor a test question file."""
    exported = data.export_llava_format("train", tmp_path_factory.mktemp("llava_train"))
    return LlavaInstructionDataModule(train_file=str(exported / "instructions.json"), image_root=str(exported / "images"),
                                      processor_path=str(tiny_base_dir), template="tiny", batch_size=8, num_workers=0)


def trainer(tmp_path, sweep, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, callbacks=[sweep],
                     default_root_dir=tmp_path, **kwargs)


def frozen_base(tiny_base_dir, data) -> FrozenBaseModule:
    return FrozenBaseModule(str(tiny_base_dir), processor=data.processor, categories=data.categories, max_new_tokens=2)


def rcp_module(tiny_base_dir, data) -> CompensationModule:
    plugin = RCPCompensation(target_prune_ratio=0.75, pruning_layers=[0], bottleneck=16, num_queries=4,
                             context_dim=16, adapter_bottleneck=8)
    return CompensationModule(str(tiny_base_dir), plugin, processor=data.processor, categories=data.categories,
                              learning_rate=1e-3, max_new_tokens=2)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def stub_trainer(datamodule, directory) -> SimpleNamespace:
    """What `PruningSweep.run` reads of a trainer: sweeps without Lightning's test loop in front."""
    return SimpleNamespace(datamodule=datamodule, is_global_zero=True, logger=None, default_root_dir=directory,
                           global_step=0)


def test_a_failing_pair_keeps_the_finished_rows_on_disk_and_is_named(tiny_base_dir, data, tmp_path):
    module = frozen_base(tiny_base_dir, data)
    original = module.run_method
    on_disk_at_start = {}

    def run_method(batch, name, ratio):
        partial = tmp_path / "sweep.partial.csv"
        on_disk_at_start.setdefault(name, [r["method"] for r in read_rows(partial)] if partial.exists() else [])
        if name == "fastv":
            raise RuntimeError("boom")
        return original(batch, name, ratio)

    module.run_method = run_method
    sweep = PruningSweep(methods=["full", "random", "fastv"], prune_ratios=[0.5], dirpath=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"^boom\nsweep stopped at fastv r=0\.5: the 2 finished pair\(s\) are in "
                                           r".*sweep\.partial\.csv"):
        trainer(tmp_path, sweep).test(module, datamodule=data)

    assert on_disk_at_start == {"full": [], "random": ["full"], "fastv": ["full", "random"]}
    rows = read_rows(tmp_path / "sweep.partial.csv")
    assert [(r["method"], r["status"]) for r in rows] == [("full", "ok"), ("random", "ok"),
                                                          ("fastv", "failed: RuntimeError: boom")]
    assert int(rows[1]["num_samples"]) == TINY_DATA_ARGS["num_test"]
    # the accuracy is the exact-match rate of the method's own answers over the whole split
    matches = 0
    for batch in data.test_dataloader():
        predictions, _, _ = original(batch, "random", 0.5)
        matches += sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, batch["answers"]))
    assert float(rows[1]["accuracy"]) == pytest.approx(matches / TINY_DATA_ARGS["num_test"], abs=1e-9)
    assert [r["method"] for r in json.loads((tmp_path / "sweep.partial.json").read_text())["rows"]] == [
        "full", "random", "fastv"]
    assert not (tmp_path / "sweep.csv").exists()  # its presence means "done" to scripts/demo.py
    assert not module.training  # test mode as Lightning left it, not the sweep's


def test_out_of_memory_in_a_pair_keeps_the_type_and_the_advice(tiny_base_dir, data, tmp_path, monkeypatch):
    module = frozen_base(tiny_base_dir, data)
    original = module.run_method

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def run_method(batch, name, ratio):
        if name == "random":  # from here on, through the module's own out-of-memory advice
            monkeypatch.setattr(module.engine, "generate", out_of_memory)
        return original(batch, name, ratio)

    module.run_method = run_method
    sweep = PruningSweep(methods=["full", "random"], prune_ratios=[0.5], dirpath=str(tmp_path))
    with pytest.raises(torch.OutOfMemoryError, match=r"^out of memory in generation\. Lower data\.init_args\."
                                                     r"eval_batch_size(.|\n)*\nsweep stopped at random r=0\.5: the 1 "):
        sweep.run(stub_trainer(data, tmp_path), module)
    rows = read_rows(tmp_path / "sweep.partial.csv")
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"].startswith("failed: OutOfMemoryError: out of memory in generation. Lower")


class _Accuracy:
    def compute(self):
        return {"acc": torch.tensor(0.5)}


@pytest.mark.parametrize("kept, status", [(18.0, "ok"), (23.0, "ok"), (25.0, "unreachable"), (46.0, "unreachable")])
def test_at_high_r_the_kept_token_count_is_checked_against_the_budget(kept, status):
    # 576 visual tokens at r = 0.969 keep 17.9: 46 kept realises r = 0.920, within the absolute ratio tolerance (0.05)
    # but 2.6x the budget; the kept-token tolerance (25 % of the budget, plus one token) catches it
    samples, inputs = 4, 576.0
    sums = torch.zeros(10, dtype=torch.float64)
    sums[0], sums[7], sums[9] = samples, samples * kept / inputs, samples * inputs
    row = PruningSweep(methods=["random"], prune_ratios=[0.969])._row(_Accuracy(), sums, "random", 0.969)
    assert row["status"].split(":")[0] == status
    if status != "ok":
        assert f"keeps {kept:.1f} visual tokens where r=0.969 keeps 17.9 (kept_tolerance 0.25" in row["status"]


def test_a_complete_sweep_writes_its_files_and_drops_the_partial_ones(tiny_base_dir, data, tmp_path):
    sweep = PruningSweep(methods=["full", "pool", "random"], prune_ratios=[0.1, 0.5], dirpath=str(tmp_path))
    trainer(tmp_path, sweep).test(frozen_base(tiny_base_dir, data), datamodule=data)

    assert {p.name for p in tmp_path.iterdir()} >= {"sweep.csv", "sweep.json", "accuracy_vs_flops.png"}
    assert not list(tmp_path.glob("*partial*")) and not list(tmp_path.glob(".*.tmp"))
    rows = {(r["method"], float(r["prune_ratio"])): r for r in read_rows(tmp_path / "sweep.csv")}
    # 16 visual tokens: no pooling grid keeps 90% of a 4 x 4 grid, so pool at r = 0.1 keeps them all
    assert float(rows["pool", 0.1]["realised_prune_ratio"]) == 0.0
    assert rows["pool", 0.1]["status"] == ("unreachable: realised r=0.000 is 0.100 from the requested 0.1 "
                                           "(ratio_tolerance 0.05)")
    assert rows["pool", 0.1]["accuracy"] != ""  # the measurements are kept
    assert float(rows["random", 0.1]["realised_prune_ratio"]) == 0.125  # 14 of 16 tokens: within the tolerance
    assert [rows[k]["status"] for k in (("full", 0.0), ("random", 0.1), ("pool", 0.5), ("random", 0.5))] == ["ok"] * 4
    # the total is in one unit: the exact LLM count plus the (exact) vision tower and projector, not the FastV number
    from lvlm_prune.flops import llava_prefill_report

    full = rows["full", 0.0]
    config = frozen_base(tiny_base_dir, data).base.config
    visual = [float(full["avg_visual_tokens"])] * config.text_config.num_hidden_layers
    report = llava_prefill_report(config, float(full["text_tokens"]), visual, convention="exact")
    # (per-sample counts averaged: quadratic in the text length, so near the count at the average length)
    assert float(full["tflops_llm_exact"]) == pytest.approx(report.llm_prefill / 1e12, rel=0.01)
    assert float(full["tflops_total"]) == pytest.approx(
        float(full["tflops_llm_exact"]) + (report.vision + report.projector) / 1e12, rel=1e-4)
    assert float(full["tflops"]) < float(full["tflops_llm_exact"])  # FastV counts a multiply-add once
    # training-free methods add no module of their own: the vision tower and projector are not a plug-in's
    assert {float(row["tflops_plugins"]) for row in rows.values()} == {0.0}


def test_a_row_reports_the_mean_latency_per_sample():
    sums = torch.zeros(10, dtype=torch.float64)
    sums[0], sums[6], sums[7], sums[9] = 4, 200.0, 4, 4 * 16.0  # 4 samples, 200 ms of generation, every token kept
    row = PruningSweep(methods=["full"], prune_ratios=[])._row(_Accuracy(), sums, "full", 0.0)
    assert row["latency_ms"] == 50.0 and row["status"] == "ok"


def test_a_sweep_logs_its_scalars_and_figure_to_tensorboard(tiny_base_dir, data, tmp_path):
    """With the configs' TensorBoard logger and no dirpath, the files go to the logger's directory and the event file
    holds an accuracy and a TFLOPs scalar per (method, ratio), equal to the table's, and the accuracy-vs-FLOPs
    figure."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="run")
    sweep = PruningSweep(methods=["full", "random"], prune_ratios=[0.5, 0.75], limit_batches=1)
    L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, callbacks=[sweep], default_root_dir=tmp_path).test(
        frozen_base(tiny_base_dir, data), datamodule=data)
    logger.experiment.flush()
    log_dir = tmp_path / "tb" / "run"
    rows = read_rows(log_dir / "sweep.csv")
    assert [(r["method"], float(r["prune_ratio"]), r["status"]) for r in rows] == [
        ("full", 0.0, "ok"), ("random", 0.5, "ok"), ("random", 0.75, "ok")]
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for row in rows:
        for column, name in (("accuracy", "acc"), ("tflops", "tflops")):
            tag = f"sweep/{row['method']}/{name}@r={float(row['prune_ratio'])}"
            assert tag in scalars, (tag, sorted(scalars))
            (event,) = events.Scalars(tag)
            assert event.value == pytest.approx(float(row[column]), rel=1e-6, abs=1e-12)
    assert events.Tags()["images"] == ["sweep/accuracy_vs_flops"]
    (image,) = events.Images("sweep/accuracy_vs_flops")
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 100 and image.height > 100


@pytest.mark.parametrize("split, names", [("val", r"data\.val_question_file, data\.val_image_root, data\.val_size"),
                                          ("test", r"data\.test_question_file")])
def test_a_split_without_data_fails_before_training(tiny_base_dir, train_only_data, tmp_path, split, names):
    module = rcp_module(tiny_base_dir, train_only_data)
    fit = trainer(tmp_path, PruningSweep(methods=["full", "rcp"], prune_ratios=[0.5], split=split,
                                         dirpath=str(tmp_path)), max_steps=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=rf"the sweep's split='{split}' \(PruningSweep init_args\.split\).*{names}"):
        fit.fit(module, datamodule=train_only_data)
    assert fit.global_step == 0
    assert not list(tmp_path.glob("sweep*"))


def test_a_pair_evaluated_on_no_sample_is_not_recorded(tiny_base_dir, data, tmp_path):
    """A loader without a length passes the setup check; the pair that finds it empty is refused."""
    empty = SimpleNamespace(test_dataloader=lambda: iter(()), hparams={})
    sweep = PruningSweep(methods=["full", "random"], prune_ratios=[0.5], dirpath=str(tmp_path))
    with pytest.raises(ValueError, match=r"full at r=0\.0 evaluated 0 samples of the test split"):
        sweep.run(stub_trainer(empty, tmp_path), frozen_base(tiny_base_dir, data))
    assert [r["status"] for r in read_rows(tmp_path / "sweep.partial.csv")] == [
        "failed: ValueError: sweep: full at r=0.0 evaluated 0 samples of the test split (PruningSweep "
        "init_args.split, batches limited to None); not recording it"]


def test_no_sweep_after_a_fit_of_zero_training_steps(tiny_base_dir, data, tmp_path):
    module = rcp_module(tiny_base_dir, data)
    fit = trainer(tmp_path, PruningSweep(methods=["full", "rcp"], prune_ratios=[0.5], dirpath=str(tmp_path)),
                  max_steps=2, limit_train_batches=0, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"the sweep after fit did not run: fit ran 0 training steps .*untrained "
                                         r"plug-ins.*data\.batch_size"):
        fit.fit(module, datamodule=data)
    assert not list(tmp_path.glob("sweep*"))


@pytest.mark.parametrize("split, trainer_limit, own_limit, samples", [
    ("test", 1, None, 8), ("test", 0.5, None, 8), ("test", 1.0, None, 16), ("test", 0, None, 16), ("test", 1, 2, 16),
    ("val", 1, None, 16)])
def test_the_sweep_of_the_test_split_takes_the_trainers_test_batch_limit_unless_it_sets_its_own(
        tiny_base_dir, data, tmp_path, split, trainer_limit, own_limit, samples):
    """16 questions per split in batches of 8: `limit_test_batches` (a count or a fraction, as Lightning's test loop
    takes it) limits a sweep of the test split too, so a debug preset's limit reaches the sweep after fit; 0 (test
    loop off) does not. `limit_val_batches` never limits the sweep: it keeps the checks during training cheap (the
    7B RCP config sweeps the validation split with it at 8)."""
    stub = stub_trainer(data, tmp_path)
    stub.limit_test_batches = stub.limit_val_batches = trainer_limit
    sweep = PruningSweep(methods=["full"], prune_ratios=[0.5], dirpath=str(tmp_path), limit_batches=own_limit,
                         split=split)
    (row,) = sweep.run(stub, frozen_base(tiny_base_dir, data))
    assert row["num_samples"] == samples


def test_a_count_of_test_batches_covers_what_every_rank_of_lightnings_test_loop_takes():
    from types import SimpleNamespace

    sweep = PruningSweep(methods=["full"], prune_ratios=[0.5])
    loader = list(range(10))  # the sweep's loader is the unsharded split
    for world_size, limit, batches in ((1, 3, 3), (4, 3, 12), (4, 0.5, 5), (4, 1.0, None)):
        trainer = SimpleNamespace(limit_test_batches=limit, world_size=world_size)
        assert sweep._batch_limit(trainer, loader) == batches


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"limit_batches=0 must be at least 1"):
        PruningSweep(limit_batches=0)
    with pytest.raises(ValueError, match=r"ratio_tolerance=-0\.1 must be in \[0, 1\)"):
        PruningSweep(ratio_tolerance=-0.1)


def test_the_sweep_after_fit_runs_before_teardown_on_the_exported_plugin(tiny_base_dir, data, tmp_path, monkeypatch):
    """Lightning moves the module to the CPU in its teardown, before on_fit_end: the sweep runs earlier, in the
    precision's context, and after the trained plug-in is on disk (a failing sweep loses none of the training)."""
    module = rcp_module(tiny_base_dir, data)
    module.hparams.plugin_export_path = str(tmp_path / "plugin.safetensors")
    fit = trainer(tmp_path, PruningSweep(methods=["rcp"], prune_ratios=[0.5], dirpath=str(tmp_path), limit_batches=1),
                  max_steps=1, limit_val_batches=0)
    seen, torn_down = [], []
    teardown, run_method = fit.strategy.teardown, module.run_method
    monkeypatch.setattr(fit.strategy, "teardown", lambda: torn_down.append(1) or teardown())
    entered = fit.precision_plugin.forward_context

    def counting_context():
        seen.append("context")
        return entered()

    monkeypatch.setattr(fit.precision_plugin, "forward_context", counting_context)

    def run(*args, **kwargs):
        seen.append((bool(torn_down), (tmp_path / "plugin.safetensors").exists()))
        return run_method(*args, **kwargs)

    monkeypatch.setattr(module, "run_method", run)
    fit.fit(module, datamodule=data)
    assert (False, True) in seen and (True, True) not in seen and "context" in seen
    assert read_rows(tmp_path / "sweep.csv")[0]["method"] == "rcp"


def _pair_on_two_ranks(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        sweep = PruningSweep(methods=["random"], prune_ratios=[0.5])

        def batches(*args, **kwargs):
            if rank == 1:
                raise MemoryError("rank 1 ran out of memory")
            return 1, None  # its one batch of the two

        sweep._evaluate_batches = batches
        module = SimpleNamespace(categories=[], device=torch.device("cpu"))
        try:
            sweep._evaluate_pair(module, [{}, {}], "random", 0.5, rank, 2)
            results[rank] = "no error"
        except Exception as error:  # noqa: BLE001
            results[rank] = f"{type(error).__name__}: {error}"
    finally:
        dist.destroy_process_group()


def test_a_pair_that_fails_on_one_rank_stops_every_rank():
    """The other ranks learn of the failure before they wait in a reduction (DDP: they would hang)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_pair_on_two_ranks, args=(port, results), nprocs=2, join=True)
    assert results[1] == "MemoryError: rank 1 ran out of memory"
    assert results[0] == "RuntimeError: sweep: random at r=0.5 failed on another rank; its log names the error"


def test_each_method_runs_one_untimed_batch_before_its_first_timed_pair(tiny_base_dir, data, tmp_path):
    module = frozen_base(tiny_base_dir, data)
    calls, original = [], module.run_method
    module.run_method = lambda batch, name, ratio: calls.append((name, ratio, len(batch["answers"]))) or original(
        batch, name, ratio)
    rows = PruningSweep(methods=["full", "random"], prune_ratios=[0.5, 0.75], dirpath=str(tmp_path)).run(
        stub_trainer(data, tmp_path), module)
    batches = len(data.test_dataloader())
    first = TINY_DATA_ARGS["eval_batch_size"]
    # full (1 ratio) and random (2 ratios): one warm-up per method, at its first ratio, none for random's second
    assert calls[0] == ("full", 0.0, first) and calls[1 + batches] == ("random", 0.5, first)
    assert len(calls) == 2 + 3 * batches
    assert [call[:2] for call in calls].count(("random", 0.5)) == batches + 1
    assert [call[:2] for call in calls].count(("random", 0.75)) == batches
    assert [row["num_samples"] for row in rows] == [TINY_DATA_ARGS["num_test"]] * 3  # warm-ups are not counted
