"""The real CLI in process: fit, resume, test, config parsing, bad input."""

import json
import stat
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml

from cli import cli_main
from lightning_modules.base_lvlm import BaseLVLMModule
from lvlm_prune.evaluation.normalize import normalize_answer

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE_ARGS = [
    "--model.init_args.spec.image_size", "32", "--model.init_args.spec.patch_size", "8",
    "--model.init_args.spec.vision_hidden_size", "32", "--model.init_args.spec.hidden_size", "32",
    "--model.init_args.spec.intermediate_size", "64", "--model.init_args.spec.num_layers", "2",
    "--data.init_args.grid", "4", "--data.init_args.cell_size", "8", "--data.init_args.min_objects", "4", "--data.init_args.max_objects", "5",
    "--data.init_args.num_train", "32", "--data.init_args.num_val", "8", "--data.init_args.num_test", "8",
    "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "8",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]


def run_dir_args(tmp_path):
    return ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--model.init_args.export_dir", str(tmp_path / "export")]


def test_fast_dev_run_fit(tmp_path):
    cli = cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                    "--trainer.fast_dev_run", "1"])
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_the_console_script_returns_nothing_so_a_successful_run_exits_zero(tmp_path, monkeypatch):
    (script,) = [entry for entry in entry_points(group="console_scripts") if entry.name == "lvlm-prune"]
    main = script.load()
    monkeypatch.setattr(sys, "argv", ["lvlm-prune", "fit", "--config", "configs/synthetic/base_describe.yaml",
                                      *TINY_BASE_ARGS, *run_dir_args(tmp_path), "--trainer.fast_dev_run", "1"])
    import cli as cli_module

    runs, run_cli = [], cli_module.cli_main
    monkeypatch.setattr(cli_module, "cli_main",
                        lambda *args, **kwargs: runs.append(run_cli(*args, **kwargs)) or runs[-1])
    assert main() is None  # the generated wrapper calls sys.exit(main()): anything else exits 1
    # and that was the successful run sys.argv asked for, not a return before it
    (run,) = runs
    assert run.trainer.global_step == 1 and run.trainer.state.finished
    assert (tmp_path / "export" / "config.json").is_file()


def optimizer_moments(state_dict):
    """Per-parameter state of an optimiser's state dict; MuonWithAdamW's holds two inner ones."""
    return [state_dict["state"]] if "state" in state_dict else [inner["state"] for inner in state_dict.values()]


@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_resume_continues_the_step_count_and_exports(tmp_path, monkeypatch, optimizer_name):
    args = ["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
            "--model.init_args.optimizer", optimizer_name,
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--checkpoint.every_n_train_steps", "2"]
    cli_main([*args, "--trainer.max_steps", "2"])
    last = tmp_path / "base_describe" / "run" / "checkpoints" / "last.ckpt"
    assert last.exists()
    assert torch.load(last, weights_only=False)["global_step"] == 2
    saved = torch.load(last, weights_only=False)
    steps_at_start = []

    def on_train_start(module):  # the resumed run starts from the checkpoint's weights and optimiser state
        state = module.state_dict()
        assert state.keys() == saved["state_dict"].keys()
        for key, value in saved["state_dict"].items():
            assert torch.equal(state[key], value), key
        (expected,) = saved["optimizer_states"]
        expected_moments = optimizer_moments(expected)
        assert all(expected_moments)  # the optimiser's moments of the trained weights
        optimizer = module.trainer.optimizers[0]
        torch.testing.assert_close(optimizer_moments(optimizer.state_dict()), expected_moments, rtol=0, atol=0)
        inner = [optimizer.muon, optimizer.adamw] if optimizer_name == "muon" else [optimizer]
        groups = [group for o in inner for group in o.param_groups]
        assert all(a is b for a, b in zip(groups, optimizer.param_groups, strict=True))  # what the scheduler sets
        saved_groups = [g for o in ([expected["muon"], expected["adamw"]] if optimizer_name == "muon" else [expected])
                        for g in o["param_groups"]]
        assert [g["lr"] for g in groups] == [g["lr"] for g in saved_groups]
        steps_at_start.append(module.global_step)

    monkeypatch.setattr(BaseLVLMModule, "on_train_start", on_train_start, raising=False)
    cli = cli_main([*args, "--trainer.max_steps", "4", "--ckpt_path", str(last)])
    assert steps_at_start == [2] and cli.trainer.global_step == 4
    assert (tmp_path / "export" / "config.json").exists() and (tmp_path / "export" / "tokenizer.json").exists()
    # the weights as readable as the files beside them (safetensors alone writes 0600)
    assert stat.S_IMODE((tmp_path / "export" / "model.safetensors").stat().st_mode) == \
        stat.S_IMODE((tmp_path / "export" / "config.json").stat().st_mode)
    test = cli_main(["test", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                     "--model.init_args.optimizer", optimizer_name, "--ckpt_path", str(last),
                     "--trainer.callbacks+=callbacks.answer_writer.AnswerFileWriter"])
    run_dir = tmp_path / "base_describe" / "run"
    answers = [json.loads(line) for line in (run_dir / "answers_test.jsonl").open()]
    assert len(answers) == 8
    # fit's config.yaml stays fit's (the plug-in export reads it); the test run's config is written beside it
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 4
    assert yaml.safe_load((run_dir / "config_test.yaml").read_text())["trainer"]["max_steps"] != 4
    matched = sum(normalize_answer(a["text"]) == normalize_answer(a["answer"]) for a in answers) / len(answers)
    assert float(test.trainer.callback_metrics["test/acc"]) == pytest.approx(matched)
    # the command line wins over the settings saved in the checkpoint (Lightning's default is the reverse)
    with pytest.warns(UserWarning, match=r"\['learning_rate'\] differently .* the config's values are used"):
        test = cli_main(["test", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS,
                         *run_dir_args(tmp_path), "--model.init_args.optimizer", optimizer_name, "--ckpt_path", str(last),
                         "--model.init_args.learning_rate", "0.5"])
    assert test.model.hparams.learning_rate == 0.5


def test_a_new_fit_in_the_same_run_directory_replaces_last_ckpt(tmp_path):
    args = ["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path)]
    cli_main([*args, "--trainer.max_steps", "1"])
    cli_main([*args, "--trainer.max_steps", "2"])
    checkpoints = tmp_path / "base_describe" / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 2


def test_corrupt_checkpoint_is_named(tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.ckpt' is not a readable Lightning checkpoint \\(not a torch.save"):
        cli_main(["test", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                  "--ckpt_path", str(corrupt)])


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_config_starts_with_its_command_and_parses(path, capsys):
    text = (ROOT / path).read_text()
    assert text.startswith("# python cli.py ") or text.startswith("# lvlm-prune "), path
    yaml.safe_load(text)
    command = text.splitlines()[0].removeprefix("# python cli.py ").removeprefix("# lvlm-prune ").split()
    subcommand, args = command[0], command[1:]
    if "--config" not in args:
        pytest.skip("fragment without a --config of its own")
    assert path in args, f"{path}'s header command does not load {path}: {command}"
    with pytest.raises(SystemExit) as exit_info:
        cli_main([subcommand, *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    # DeepSpeed logs "[date] [WARNING] ... Setting accelerator to CPU" to stdout the first time a process imports it
    out = "\n".join(line for line in capsys.readouterr().out.splitlines() if not line.startswith("[20"))
    printed = yaml.safe_load(out)
    assert "model" in printed and "trainer" in printed


def test_the_base_stages_continue_each_other_and_the_last_grows_the_llm(tmp_path):
    """base_describe.yaml -> export -> base_stage1.yaml continues it at the same depth -> base.yaml grows it (2 -> 3
    LLM layers here), each on fresh scenes."""
    from lvlm_prune.modeling.loading import load_base_model

    stage0 = tmp_path / "stage0"
    cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(stage0),
              "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    stage1 = tmp_path / "stage1"
    cli = cli_main(["fit", "--config", "configs/synthetic/base_stage1.yaml", *TINY_BASE_ARGS, *run_dir_args(stage1),
                    "--model.init_args.init_from", str(stage0 / "export"), "--data.init_args.train_skip", "32",
                    "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    assert cli.datamodule.samples("train")[0].question_id == "train-000032"
    assert cli.model.model.training  # from_pretrained gives eval mode; the continued stage trains in training mode
    before, after = load_base_model(stage0 / "export"), load_base_model(stage1 / "export")
    torch.testing.assert_close(after.lm_head.weight, before.lm_head.weight, rtol=0, atol=1e-2)  # one step away
    assert not torch.equal(after.lm_head.weight, before.lm_head.weight)
    stage2 = tmp_path / "stage2"
    grown_args = [*TINY_BASE_ARGS, *run_dir_args(stage2), "--model.init_args.spec.num_layers", "3",
                  "--model.init_args.init_from", str(stage1 / "export"), "--trainer.limit_val_batches", "0"]
    cli = cli_main(["fit", "--config", "configs/synthetic/base.yaml", *grown_args, "--trainer.max_steps", "1"])
    assert cli.trainer.global_step == 1
    assert cli.datamodule.samples("train")[0].question_id == f"train-{cli.datamodule.hparams.train_skip:06d}"
    first, grown = load_base_model(stage1 / "export"), load_base_model(stage2 / "export")
    assert grown.config.text_config.num_hidden_layers == 3
    # stage 2 started from stage 1 (layers spread to 0 and 1, a new identity layer at 2), one small step away
    old_layers, new_layers = first.model.language_model.layers, grown.model.language_model.layers
    for old, new in ((0, 0), (1, 1)):
        torch.testing.assert_close(new_layers[new].self_attn.q_proj.weight, old_layers[old].self_attn.q_proj.weight,
                                   rtol=0, atol=1e-2)
    assert new_layers[2].mlp.down_proj.weight.abs().max() < 1e-2 < new_layers[2].mlp.up_proj.weight.abs().max()
    with pytest.raises(ValueError, match="text_config.hidden_size is 32, the spec gives 64"):
        cli_main(["fit", "--config", "configs/synthetic/base.yaml", *grown_args,
                  "--model.init_args.spec.hidden_size", "64", "--trainer.max_steps", "1"])
    with pytest.raises(ValueError, match="vision_feature_layer is -1, the spec gives -2"):  # a top-level setting
        cli_main(["fit", "--config", "configs/synthetic/base.yaml", *grown_args,
                  "--model.init_args.spec.vision_feature_layer", "-2", "--trainer.max_steps", "1"])
    with pytest.raises(ValueError, match="model.grow_placement='middle'"):
        cli_main(["fit", "--config", "configs/synthetic/base.yaml", *grown_args,
                  "--model.init_args.grow_placement", "middle", "--trainer.max_steps", "1"])
    with pytest.raises((FileNotFoundError, ValueError),
                       match="model.init_args.init_from=.*no_stage1.* is not a directory.*--model.init_args.init_from null"):
        cli_main(["fit", "--config", "configs/synthetic/base.yaml", *grown_args,
                  "--model.init_args.init_from", str(tmp_path / "no_stage1"), "--trainer.max_steps", "1"])


def test_evaluations_take_ckpt_path_auto_and_a_missing_checkpoint_writes_nothing(tmp_path):
    base = ["--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path)]
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path auto: this run has no checkpoint to test"):
        cli_main(["test", *base, "--ckpt_path", "auto"])
    cli_main(["fit", *base, "--trainer.max_steps", "1"])
    run_dir = tmp_path / "base_describe" / "run"
    by_path = cli_main(["test", *base, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    record = (run_dir / "config_test.yaml").read_text()
    automatic = cli_main(["test", *base, "--ckpt_path", "auto"])
    assert automatic.trainer.callback_metrics["test/acc"] == by_path.trainer.callback_metrics["test/acc"]
    # a mistyped path stops before the run's records are rewritten
    (run_dir / "config_test.yaml").write_text(record + "# the earlier evaluation's\n")
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path '.*lst.ckpt' does not exist"):
        cli_main(["test", *base, "--ckpt_path", str(run_dir / "checkpoints" / "lst.ckpt")])
    assert (run_dir / "config_test.yaml").read_text().endswith("# the earlier evaluation's\n")


def test_unknown_config_key_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", "configs/synthetic/base.yaml", "--model.init_args.learnig_rate", "1e-3"])
    assert exit_info.value.code == 2  # argparse's usage error, before anything runs
    # the parser's own complaint, not only the echo of the command line
    assert "Option 'learnig_rate' is not accepted" in capsys.readouterr().err


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                  "--trainer.max_steps", "1", "--ckpt_path", str(tmp_path / "nowhere.ckpt")])


def test_missing_base_model_directory_is_named(tmp_path, tiny_base_dir):
    # the constructor's own error, not jsonargparse's wrapping of it with the whole settings namespace
    with pytest.raises(FileNotFoundError, match=r"^data.init_args.processor_path: processor directory '.*no_base' does not exist \(a base is a local "):
        cli_main(["test", "--config", "configs/synthetic/sweep.yaml", "--model.init_args.base_model_path",
                  str(tmp_path / "no_base"), "--data.init_args.processor_path", str(tmp_path / "no_base")])
    with pytest.raises(FileNotFoundError, match=r"^model.init_args.base_model_path: base model directory '.*no_base' does not exist \(.*make demo"):
        cli_main(["test", "--config", "configs/synthetic/sweep.yaml", "--model.init_args.base_model_path",
                  str(tmp_path / "no_base"), "--data.init_args.processor_path", str(tiny_base_dir),
                  "--data.init_args.grid", "4"])  # the tiny base's 32-pixel images


def test_misspelt_sweep_method_fails_before_any_work(tiny_base_dir, tmp_path):
    with pytest.raises(ValueError, match=r"sweep methods \['fastvv'\] are unknown to FrozenBaseModule; known: .*'fastv'"):
        cli_main(["test", "--config", "configs/synthetic/sweep.yaml", "--model.init_args.base_model_path",
                  str(tiny_base_dir), "--data.init_args.processor_path", str(tiny_base_dir),
                  *[arg for key, value in (("grid", 4), ("cell_size", 8), ("min_objects", 4), ("max_objects", 5),
                                           ("num_test", 8), ("eval_batch_size", 8))
                    for arg in (f"--data.init_args.{key}", str(value))],
                  "--trainer.callbacks", '[{"class_path": "callbacks.sweep.PruningSweep", '
                  '"init_args": {"methods": ["random", "fastvv"]}}]', *run_dir_args(tmp_path)[:4]])
