"""SlurmRequeue in-process, with the trainer replaced by a stand-in: the job id it requeues, the scontrol call after
the checkpoint, when it stays inert, and that it restores the signal handler it replaced and works in a second fit."""

import os
import signal
from types import SimpleNamespace

import pytest
from lightning.pytorch.plugins.environments import SLURMEnvironment

import callbacks.requeue as requeue_module
from callbacks.requeue import SlurmRequeue, slurm_job_id


def test_an_array_task_is_requeued_by_its_array_name_and_odd_ids_are_refused(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "105")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "100_3"
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    assert slurm_job_id() == "105"
    monkeypatch.setenv("SLURM_JOB_ID", "105 --all")
    with pytest.raises(ValueError, match="unexpected SLURM job id"):
        slurm_job_id()


def trainer_for(tmp_path, saved, is_global_zero=True, environment=None):
    return SimpleNamespace(
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_should_accumulate=lambda: False)),
        _checkpoint_connector=SimpleNamespace(hpc_save_path=lambda root: str(tmp_path / "hpc_ckpt_1.ckpt")),
        default_root_dir=str(tmp_path), save_checkpoint=saved.append, is_global_zero=is_global_zero, global_step=4,
        _accelerator_connector=SimpleNamespace(cluster_environment=environment),
    )


def test_rank_zero_saves_then_runs_scontrol_requeue(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    saved, commands = [], []
    monkeypatch.setattr(requeue_module.subprocess, "run", lambda command, check: commands.append(
        (list(command), list(saved))) or SimpleNamespace(returncode=0))
    callback = SlurmRequeue()
    callback._signal = signal.SIGUSR1
    callback._note(signal.SIGUSR1, None)
    callback.on_train_batch_end(trainer_for(tmp_path, saved), None, None, None, 0)
    assert commands == [(["scontrol", "requeue", "4242"], [str(tmp_path / "hpc_ckpt_1.ckpt")])]
    callback.on_train_batch_end(trainer_for(tmp_path, saved), None, None, None, 1)  # requeued once only
    assert len(commands) == 1 and saved == [str(tmp_path / "hpc_ckpt_1.ckpt")]
    # another rank takes part in the save (a collective under sharding) but leaves the requeue to rank zero
    other, other_saved = SlurmRequeue(), []
    other._signal = signal.SIGUSR1
    other._note(signal.SIGUSR1, None)
    other.on_train_batch_end(trainer_for(tmp_path, other_saved, is_global_zero=False), None, None, None, 0)
    assert other_saved == [str(tmp_path / "hpc_ckpt_1.ckpt")] and len(commands) == 1


def test_a_real_signal_is_noted_and_the_callback_is_inert_outside_fit_or_without_auto_requeue(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    for stage, auto in (("validate", True), ("fit", False)):
        environment = SLURMEnvironment(auto_requeue=auto, requeue_signal=signal.SIGUSR1)
        callback = SlurmRequeue()
        callback.setup(trainer_for(tmp_path, [], environment=environment), None, stage)
        assert callback._signal is None and environment.auto_requeue == auto
        assert signal.getsignal(signal.SIGUSR1) == before
    environment = SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)
    callback = SlurmRequeue()
    callback.setup(trainer_for(tmp_path, [], environment=environment), None, "fit")
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert callback._received
    finally:
        callback.teardown(None, None, "fit")


def test_teardown_restores_a_python_handler_and_a_second_fit_can_requeue_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(requeue_module.subprocess, "run", lambda command, check: SimpleNamespace(returncode=0))
    own = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGUSR1, own)
    try:
        callback, saved = SlurmRequeue(), []
        for _ in range(2):  # the same callback in two fits (e.g. a requeued job run in one process)
            environment = SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)
            trainer = trainer_for(tmp_path, saved, environment=environment)
            callback.setup(trainer, None, "fit")
            callback._note(signal.SIGUSR1, None)
            callback.on_train_batch_end(trainer, None, None, None, 0)
            callback.teardown(trainer, None, "fit")
            assert signal.getsignal(signal.SIGUSR1) is own
        assert len(saved) == 2
        callback.setup(trainer_for(tmp_path, saved, environment=SLURMEnvironment(
            auto_requeue=True, requeue_signal=signal.SIGUSR1)), None, "fit")
        callback.on_train_batch_end(trainer, None, None, None, 1)  # no signal in this fit
        callback.teardown(trainer, None, "fit")
        assert len(saved) == 2
    finally:
        signal.signal(signal.SIGUSR1, previous)
