"""`callbacks/requeue.py` edges its other tests leave loose, with stand-in trainers: a signal that reached another
rank, the handler restored when none was installed from Python, rank zero alone requeueing, a failed scontrol, and
environments without a requeue signal."""

from __future__ import annotations

import logging
import signal
from types import SimpleNamespace

import pytest
from lightning.pytorch.plugins.environments import SLURMEnvironment

import callbacks.requeue as requeue_module
from callbacks.requeue import SlurmRequeue


def trainer_for(tmp_path, saved, is_global_zero=True, environment=None, others_received=False):
    """A stand-in trainer of a run where the other ranks got the signal (`others_received`) or not."""
    def reduce_boolean_decision(decision, all=True):
        return (decision and others_received) if all else (decision or others_received)

    return SimpleNamespace(
        strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision),
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_should_accumulate=lambda: False)),
        _checkpoint_connector=SimpleNamespace(hpc_save_path=lambda root: str(tmp_path / "hpc_ckpt_1.ckpt")),
        default_root_dir=str(tmp_path), save_checkpoint=saved.append, is_global_zero=is_global_zero, global_step=4,
        _accelerator_connector=SimpleNamespace(cluster_environment=environment),
    )


@pytest.fixture
def scontrol(monkeypatch):
    """Records scontrol's command lines; `returncode` sets its exit status."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    calls = SimpleNamespace(commands=[], returncode=0)
    monkeypatch.setattr(requeue_module.subprocess, "run", lambda command, check: calls.commands.append(
        list(command)) or SimpleNamespace(returncode=calls.returncode))
    return calls


def test_a_signal_that_reached_another_rank_checkpoints_here_too(tmp_path, scontrol):
    saved = []
    callback = SlurmRequeue()
    callback._signal = signal.SIGUSR1  # this rank got nothing
    callback.on_train_batch_end(trainer_for(tmp_path, saved, others_received=True), None, None, None, 0)
    assert saved == [str(tmp_path / "hpc_ckpt_1.ckpt")] and scontrol.commands == [["scontrol", "requeue", "4242"]]
    callback = SlurmRequeue()
    callback._signal = signal.SIGUSR1
    callback.on_train_batch_end(trainer_for(tmp_path, saved, others_received=False), None, None, None, 0)
    assert len(saved) == 1  # no rank got it: nothing written


def test_only_rank_zero_requeues_but_every_rank_checkpoints(tmp_path, scontrol):
    saved = []
    callback = SlurmRequeue()
    callback._signal = signal.SIGUSR1
    callback._note(signal.SIGUSR1, None)
    callback.on_train_batch_end(trainer_for(tmp_path, saved, is_global_zero=False), None, None, None, 0)
    assert saved == [str(tmp_path / "hpc_ckpt_1.ckpt")] and scontrol.commands == []


def test_a_failed_scontrol_is_reported_with_its_exit_code(tmp_path, scontrol, caplog):
    for code, level, message in ((3, logging.WARNING, "`scontrol requeue 4242` failed with code 3"),
                                 (0, logging.INFO, "requeued SLURM job 4242")):
        scontrol.returncode = code
        callback = SlurmRequeue()
        callback._signal = signal.SIGUSR1
        callback._note(signal.SIGUSR1, None)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="callbacks.requeue"):
            callback.on_train_batch_end(trainer_for(tmp_path, []), None, None, None, 0)
        assert [r.levelno for r in caplog.records] == [level]
        assert message in caplog.records[0].getMessage()


def test_teardown_restores_the_default_action_where_no_python_handler_was_installed(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGUSR1)
    try:
        monkeypatch.setattr(requeue_module.signal, "signal", _signal_returning_none(signal.signal))
        environment = SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)
        callback = SlurmRequeue()
        callback.setup(trainer_for(tmp_path, [], environment=environment), None, "fit")
        assert signal.getsignal(signal.SIGUSR1) == callback._note and not environment.auto_requeue
        callback.teardown(None, None, "fit")
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        callback.teardown(None, None, "fit")  # a second teardown leaves the handler alone
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, before)


def _signal_returning_none(original):
    """`signal.signal` as for a handler that was not installed from Python: the previous handler reads None."""
    def install(signum, handler):
        original(signum, handler)
        return None

    return install


def test_an_environment_without_a_requeue_signal_leaves_everything_alone(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    environment = SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)
    environment.requeue_signal = None  # as on Windows
    callback = SlurmRequeue()
    callback.setup(trainer_for(tmp_path, [], environment=environment), None, "fit")
    assert callback._signal is None and environment.auto_requeue and signal.getsignal(signal.SIGUSR1) == before
    callback.teardown(None, None, "fit")
    assert signal.getsignal(signal.SIGUSR1) == before
