"""Fit resumed from a checkpoint where training had already ended: Lightning runs no training loop (and no
`on_train_end`), so the work done there, the export and the sweep after fit, would silently not happen."""

import shutil

import pytest
import yaml

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
    plugin.unlink()  # as if the job was killed during the sweep after fit, after the final checkpoint
    shutil.rmtree(sweep.parent)
    last = run_dir / "logs" / "run" / "checkpoints" / "last.ckpt"

    with pytest.raises(FinishedRunNotSwept, match=r"at step 2, where training had already ended.*run_after_test true"):
        cli_main(["fit", "--config", str(config), "--ckpt_path", str(last)])
    assert plugin.exists() and not sweep.exists()
    cli_main(["test", "--config", str(config), "--ckpt_path", str(last),
              "--trainer.callbacks.init_args.run_after_test", "true"])  # what the message says to run
    assert sweep.exists()


def test_a_finished_base_run_resumed_exports_again(tmp_path):
    args = ["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
            "--trainer.limit_val_batches", "0", "--checkpoint.every_n_train_steps", "2", "--trainer.max_steps", "2"]
    cli_main(args)
    shutil.rmtree(tmp_path / "export")
    cli_main([*args, "--ckpt_path", str(tmp_path / "base_describe" / "run" / "checkpoints" / "last.ckpt")])
    assert (tmp_path / "export" / "config.json").exists() and (tmp_path / "export" / "tokenizer.json").exists()


def test_predict_on_the_synthetic_test_split_writes_its_own_answer_file(tiny_base_dir, tmp_path):
    from conftest import TINY_DATA_ARGS

    run_dir = tmp_path / "run"
    config = tiny_experiment(run_dir, tiny_base_dir, max_steps=1, limit_val_batches=0)
    cli_main(["predict", "--config", str(config), "--trainer.callbacks+=callbacks.answer_writer.AnswerFileWriter"])
    answers = (run_dir / "logs" / "run" / "answers_predict.jsonl").read_text().splitlines()
    assert len(answers) == TINY_DATA_ARGS["num_test"]
    assert not (run_dir / "logs" / "run" / "answers_test.jsonl").exists()
