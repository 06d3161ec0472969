"""A run killed between checkpoints and resumed from its last one ends exactly as the uninterrupted run: same
plug-in weights (bitwise) and the same logged metrics, step by step; the data order, the Gumbel noise, and the
temperature, sparsity and learning-rate schedules all continue where the checkpoint was written."""

import pytest
import torch
from safetensors.torch import load_file

from ops_helpers import metric_rows, run_cli, tiny_experiment

pytestmark = pytest.mark.slow

MAX_STEPS = 10  # 4 batches per epoch: the runs cross two epoch boundaries


GROUPED = ["--data.init_args.group_by_length", "true"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_base_dir, tmp_path_factory):
    """The uninterrupted run's directory for a data setting (made once per setting)."""
    runs = {}

    def run(data_args: tuple[str, ...]):
        if data_args not in runs:
            run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
            config = tiny_experiment(run_dir, tiny_base_dir, max_steps=MAX_STEPS, val_check_interval=5)
            run_cli(["fit", "--config", str(config), "--checkpoint.every_n_train_steps", "2", *data_args])
            runs[data_args] = run_dir
        return runs[data_args]

    return run


@pytest.mark.parametrize("signal_name, kill_step, data_args", [
    ("SIGKILL", 7, ()),   # last checkpoint at step 6, in the middle of the second epoch
    ("SIGTERM", 5, ()),   # last checkpoint at step 4, written at the last batch of the first epoch
    ("SIGKILL", 7, tuple(GROUPED)),  # length-grouped batches (LengthGroupedSampler) resume mid-epoch too
], ids=["SIGKILL", "SIGTERM", "SIGKILL-length-grouped"])
def test_killed_and_resumed_run_matches_the_uninterrupted_one(uninterrupted, tiny_base_dir, tmp_path, signal_name,
                                                               kill_step, data_args):
    reference_dir = uninterrupted(data_args)
    run_dir = tmp_path / "run"
    config = tiny_experiment(run_dir, tiny_base_dir, max_steps=MAX_STEPS, val_check_interval=5)
    common = ["fit", "--config", str(config), "--checkpoint.every_n_train_steps", "2", *data_args]
    run_cli(common + ["--trainer.callbacks+=ops_helpers.KillAt", f"--trainer.callbacks.init_args.step={kill_step}",
                      f"--trainer.callbacks.init_args.signal_name={signal_name}"], expect_success=False)
    assert not (run_dir / "plugin.safetensors").exists(), "the run was not interrupted"
    saved = torch.load(run_dir / "logs" / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert saved == kill_step - 1

    output = run_cli(common + ["--ckpt_path", "auto"])
    assert "--ckpt_path auto: resuming from" in output and "not resumable" not in output
    assert "leaves the training loader unchanged" not in output

    expected, resumed = load_file(reference_dir / "plugin.safetensors"), load_file(run_dir / "plugin.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    reference = metric_rows(reference_dir)
    rows = metric_rows(run_dir)  # the resumed run's log: steps from the checkpoint on, validations included
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(range(saved, MAX_STEPS))
    assert any(r["val/avg_visual_tokens"] for r in rows)
    for row in rows:
        assert row in reference, f"step {row['step']} differs from the uninterrupted run"


def test_a_run_resumed_twice_first_at_an_epoch_end_then_mid_epoch_matches_the_uninterrupted_one(
        uninterrupted, tiny_base_dir, tmp_path):
    """After a resume from the last batch of an epoch Lightning's epoch count runs one ahead of the data epoch; a
    second, mid-epoch resume must still continue the data epoch's permutation."""
    reference_dir = uninterrupted(())
    run_dir = tmp_path / "run"
    config = tiny_experiment(run_dir, tiny_base_dir, max_steps=MAX_STEPS, val_check_interval=5)
    common = ["fit", "--config", str(config), "--checkpoint.every_n_train_steps", "2"]
    kill = ["--trainer.callbacks+=ops_helpers.KillAt", "--trainer.callbacks.init_args.signal_name=SIGKILL"]
    run_cli(common + kill + ["--trainer.callbacks.init_args.step=5"], expect_success=False)  # checkpoint: step 4
    run_cli(common + ["--ckpt_path", "auto"] + kill + ["--trainer.callbacks.init_args.step=7"],  # checkpoint: step 6
            expect_success=False)
    saved = torch.load(run_dir / "logs" / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert saved == 6 and not (run_dir / "plugin.safetensors").exists()
    run_cli(common + ["--ckpt_path", "auto"])
    expected, resumed = load_file(reference_dir / "plugin.safetensors"), load_file(run_dir / "plugin.safetensors")
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
