"""Fit resumed from a checkpoint where training had already ended: Lightning runs no training loop (and no
`on_train_end`), so the work done there, the export and the sweep after fit, would silently not happen."""

import csv
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from callbacks.sweep import FinishedRunNotSwept
from cli import cli_main
from ops_helpers import tiny_experiment
from test_cli import TINY_BASE_ARGS, run_dir_args


def test_a_finished_plugin_run_resumed_exports_again_and_names_the_sweep_that_did_not_run(tiny_base_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_experiment(run_dir, tiny_base_dir, max_steps=2, limit_val_batches=0)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"] = [{"class_path": "callbacks.sweep.PruningSweep", "init_args": {
        "methods": ["full"], "split": "val", "limit_batches": 1, "run_after_test": False,
        "dirpath": str(run_dir / "sweep")}}]
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    cli_main(["fit", "--config", str(config)])
    plugin, sweep = run_dir / "plugin.safetensors", run_dir / "sweep" / "sweep.csv"
    assert plugin.exists() and sweep.exists()
    first_sweep = sweep.read_text()
    first = load_file(plugin)
    plugin.unlink()  # as if the job was killed during the sweep after fit, after the final checkpoint
    shutil.rmtree(sweep.parent)
    last = run_dir / "logs" / "run" / "checkpoints" / "last.ckpt"

    with pytest.raises(FinishedRunNotSwept, match=r"at step 2, where training had already ended.*run_after_test true"):
        cli_main(["fit", "--config", str(config), "--ckpt_path", str(last)])
    assert plugin.exists() and not sweep.exists()
    again = load_file(plugin)  # the finished run's plug-in, exported again
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    cli_main(["test", "--config", str(config), "--ckpt_path", str(last),
              "--trainer.callbacks.init_args.run_after_test", "true"])  # what the message says to run
    rows = list(csv.DictReader(sweep.open()))
    assert [(r["method"], r["status"]) for r in rows] == [("full", "ok")]
    # the sweep the interrupted fit would have written: the same measurements, timing aside
    timed = ("latency_ms",)
    assert [{k: v for k, v in r.items() if k not in timed} for r in rows] == [
        {k: v for k, v in r.items() if k not in timed} for r in csv.DictReader(first_sweep.splitlines())]


def test_a_finished_base_run_resumed_exports_again(tmp_path):
    args = ["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
            "--trainer.limit_val_batches", "0", "--checkpoint.every_n_train_steps", "2", "--trainer.max_steps", "2"]
    from lvlm_prune.archives import weights_digest

    cli_main(args)
    first = {name: (tmp_path / "export" / name).read_text() for name in ("config.json", "tokenizer.json")}
    digest = weights_digest(tmp_path / "export")
    shutil.rmtree(tmp_path / "export")
    cli_main([*args, "--ckpt_path", str(tmp_path / "base_describe" / "run" / "checkpoints" / "last.ckpt")])
    # the same finished model again: its weights byte for byte, its config and tokenizer
    assert list((tmp_path / "export").glob("*.safetensors")) and weights_digest(tmp_path / "export") == digest
    assert {name: (tmp_path / "export" / name).read_text() for name in first} == first


def test_predict_on_the_synthetic_test_split_writes_its_own_answer_file(tiny_base_dir, tmp_path):
    from conftest import TINY_DATA_ARGS

    run_dir = tmp_path / "run"
    config = tiny_experiment(run_dir, tiny_base_dir, max_steps=1, limit_val_batches=0)
    cli_main(["predict", "--config", str(config), "--trainer.callbacks+=callbacks.answer_writer.AnswerFileWriter"])
    answers = [json.loads(line) for line in (run_dir / "logs" / "run" / "answers_predict.jsonl").open()]
    # every test question once, in the split's order, answered by the configured evaluation (rcp at its ratio)
    assert [a["question_id"] for a in answers] == [f"test-{i:06d}" for i in range(TINY_DATA_ARGS["num_test"])]
    assert {a["model_id"] for a in answers} == {"rcp@r=0.75"} and all(a["prompt"] for a in answers)
    assert not (run_dir / "logs" / "run" / "answers_test.jsonl").exists()
