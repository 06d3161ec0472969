"""DDP on CPU (gloo, 2 processes) against 1 process on the same data: validation accuracy and the sweep's
accuracies are reduced over the processes (they equal the 1-process ones), the sweep writes its files once, and a
non-finite loss on one rank skips the step on both without moving the (still identical) plug-in weights; the logged
training speed sums the ranks'."""

import json
import statistics

import pytest
import yaml

from cli import cli_main
from ops_helpers import metric_rows, one_thread, run_cli, tiny_experiment  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# 15 validation questions: Lightning's distributed sampler pads the two ranks' shares to 8 + 8 by repeating
# val-000000, which must count once. The oracle answers val-000000, -003, ..., -012 right.
NUM_VAL = 15
EXPECTED_ACCURACY = 5 / 15


def oracle_experiment(run_dir, base_dir):
    config_path = tiny_experiment(run_dir, base_dir, max_steps=4)
    config = yaml.safe_load(config_path.read_text())
    config["model"]["class_path"] = "ops_helpers.OracleCompensationModule"
    config["data"]["init_args"]["num_val"] = NUM_VAL
    config["trainer"]["callbacks"] = [
        {"class_path": "ops_helpers.CountingSweep",
         "init_args": {"methods": ["full", "rcp"], "prune_ratios": [0.5], "split": "val", "run_after_fit": True,
                       "run_after_test": False, "dirpath": str(run_dir / "sweep")}},
        {"class_path": "ops_helpers.NaNAt",
         "init_args": {"step": 1, "rank": 1, "record": str(run_dir / "checksums")}},
    ]
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


def sweep_accuracies(run_dir):
    rows = json.loads((run_dir / "sweep" / "sweep.json").read_text())["rows"]
    return {(row["method"], row["prune_ratio"]): (row["accuracy"], row["num_samples"]) for row in rows}


def validation_accuracy(run_dir):
    return [float(row["val/acc"]) for row in metric_rows(run_dir) if row.get("val/acc")]


def samples_per_step(run_dir):
    """TrainingMonitor's samples per second (summed over ranks) times its seconds per step (their mean): the global
    batch when the ranks' steps take the same time, as DDP's gradient all-reduce makes them."""
    rows = [row for row in metric_rows(run_dir, speed=True) if row.get("train/samples_per_second")]
    return statistics.median(float(r["train/samples_per_second"]) * float(r["train/seconds_per_step"]) for r in rows)


def test_two_process_metrics_equal_one_process_metrics(tiny_base_dir, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    cli_main(["fit", "--config", str(oracle_experiment(single, tiny_base_dir))])
    output = run_cli(["fit", "--config", str(oracle_experiment(double, tiny_base_dir)), "--trainer.strategy", "ddp",
                      "--trainer.devices", "2"], timeout=180)
    assert "distributed_backend=gloo" in output

    assert validation_accuracy(single) == validation_accuracy(double) == [pytest.approx(EXPECTED_ACCURACY)]
    accuracies = sweep_accuracies(double)
    assert accuracies == sweep_accuracies(single)
    assert accuracies == {("full", 0.0): (EXPECTED_ACCURACY, NUM_VAL), ("rcp", 0.5): (EXPECTED_ACCURACY, NUM_VAL)}
    assert (double / "sweep" / "writes.txt").read_text().split() == ["0"]
    assert {p.name for p in (double / "sweep").iterdir()} >= {"sweep.csv", "sweep.json", "accuracy_vs_flops.png"}

    ranks = [[json.loads(line) for line in (tmp_path / "double" / f"checksums.{rank}.jsonl").read_text().splitlines()]
             for rank in (0, 1)]
    assert ranks[0] == ranks[1], "the ranks' plug-in weights diverged"
    checksums = {entry["step"]: entry["checksum"] for entry in ranks[0]}
    assert checksums[2] == checksums[1] != checksums[3]  # step 1 (NaN on rank 1 only) was skipped on both ranks
    assert "non-finite loss on another rank at step 1" in output and "non-finite loss at step 1" in output
    # the training speed is the two ranks' together
    assert samples_per_step(single) == pytest.approx(8)
    assert samples_per_step(double) == pytest.approx(16, rel=0.25)
