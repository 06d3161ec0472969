"""What a resume takes from the checkpoint and what from the config, said as it is; a refused resume leaves the run's
records as they were; a DeepSpeed checkpoint given to another strategy is named."""

import warnings

import pytest

from cli import _checkpoint_archive, cli_main
from ops_helpers import tiny_experiment


def resume(config, *overrides):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(["fit", "--config", str(config), "--ckpt_path", "auto", *overrides])
    return cli, [str(w.message) for w in caught if "--ckpt_path" in str(w.message)]


def test_a_resumed_fit_keeps_the_checkpoints_learning_rate_and_says_so(tiny_base_dir, tmp_path):
    config = tiny_experiment(tmp_path / "run", tiny_base_dir, max_steps=2, limit_val_batches=0)
    cli_main(["fit", "--config", str(config)])
    cli, said = resume(config, "--trainer.max_steps", "3", "--model.init_args.learning_rate", "0.01",
                       "--model.init_args.max_new_tokens", "3")
    kept = [message for message in said if "restores the optimizer" in message]
    used = [message for message in said if "the config's values are used" in message]
    assert len(kept) == 1 and "['learning_rate']" in kept[0] and "checkpoint's values stay in force" in kept[0]
    assert len(used) == 1 and "['max_new_tokens']" in used[0]
    assert cli.trainer.global_step == 3
    assert cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1e-3)
    assert cli.model.hparams.max_new_tokens == 3


def test_a_refused_resume_leaves_the_runs_config_record_as_it_was(tiny_base_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_experiment(run_dir, tiny_base_dir, max_steps=2, limit_val_batches=0)
    cli_main(["fit", "--config", str(config)])
    record = run_dir / "logs" / "run" / "config.yaml"
    before = record.read_bytes()
    with pytest.raises(ValueError, match="does not fit the configured rcp plug-in"):
        resume(config, "--trainer.max_steps", "4", "--model.init_args.compensation.init_args.bottleneck", "8")
    assert record.read_bytes() == before
    # a resume that trains writes the new settings
    resume(config, "--trainer.max_steps", "3")
    assert record.read_bytes() != before and "max_steps: 3" in record.read_text()


def test_a_deepspeed_checkpoint_given_to_another_strategy_is_named(tiny_base_dir, tmp_path):
    config = tiny_experiment(tmp_path / "run", tiny_base_dir, max_steps=2)
    checkpoint = tmp_path / "zero2.ckpt"
    (checkpoint / "checkpoint").mkdir(parents=True)
    (checkpoint / "latest").write_text("checkpoint")
    with pytest.raises(ValueError, match=r"'.*zero2.ckpt' is a DeepSpeed checkpoint, which only the DeepSpeed "
                                         r"strategy reads, but this run's is SingleDeviceStrategy"):
        cli_main(["test", "--config", str(config), "--ckpt_path", str(checkpoint)])
    assert not (tmp_path / "run" / "logs").exists()


def test_the_hyperparameters_of_a_deepspeed_checkpoint_are_read_from_its_latest_tags_rank_0_states(tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    assert _checkpoint_archive(checkpoint) is None
    (checkpoint / "step7").mkdir(parents=True)
    (checkpoint / "latest").write_text("step7\n")
    assert _checkpoint_archive(checkpoint) is None
    for name in ("zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt",
                 "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (checkpoint / "step7" / name).write_bytes(b"")
    assert _checkpoint_archive(checkpoint) == checkpoint / "step7" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    single = tmp_path / "plain.ckpt"
    single.write_bytes(b"")
    assert _checkpoint_archive(single) == single
