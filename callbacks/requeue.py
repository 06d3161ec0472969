"""SLURM requeue that checkpoints between training batches, not inside the signal handler."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def slurm_job_id() -> str:
    """`scontrol`'s name of this job: `<array job>_<task>` for an array task, else `SLURM_JOB_ID`."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    return job


def _inside_accumulation_window(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended leaves gradients to accumulate: Lightning's own test. Under DeepSpeed,
    which accumulates itself and saves no micro-step count, a checkpoint at a window's end is where a resumed
    engine's count (0) agrees with Lightning's, as long as each epoch's batch count is a multiple of
    `accumulate_grad_batches`: Lightning counts windows from each epoch's start, DeepSpeed across epochs."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


class SlurmRequeue(L.Callback):
    """Checkpoints and requeues a SLURM job on its requeue signal (`--signal=SIGUSR1@90`), at a batch boundary.

    Lightning's own auto-requeue saves the checkpoint inside the signal handler, wherever each rank's main thread
    happens to be: with several ranks the checkpoint's collectives can meet another rank's gradient all-reduce and
    hang, and even one rank can be caught between the optimiser step and the data order's bookkeeping, so the
    resumed run repeats a batch. Here the handler only notes the signal; after each training batch (after
    `ResumableDataOrder` has counted it) the ranks agree whether any of them got it, and if so, once the batch
    closes a gradient-accumulation window (`accumulate_grad_batches`: a checkpoint inside one would lose the
    gradients summed so far), all of them write
    `<default_root_dir>/hpc_ckpt_<n>.ckpt`, the file `--ckpt_path auto` looks for, and rank 0 runs
    `scontrol requeue <job id>`. Training then goes on until SLURM ends the tasks (as with Lightning's handler).

    Inert outside SLURM and when the run's `SLURMEnvironment` has `auto_requeue=False`; its requeue signal is the
    environment's.
    """

    def __init__(self) -> None:
        self._signal: signal.Signals | None = None
        self._previous_handler: Any = None
        self._installed = False
        self._received = False
        self._done = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if stage != "fit" or not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        if environment.requeue_signal is None:  # Windows
            return
        environment.auto_requeue = False  # Lightning registers its handler after setup: it finds this off
        self._signal = environment.requeue_signal
        self._received = self._done = False
        # here, before the fit loop forks its DataLoader workers: they inherit the handler. SLURM signals every
        # process of the step, and a worker left with the default action dies, which ends training with no
        # requeue checkpoint
        self._previous_handler = signal.signal(self._signal, self._note)
        self._installed = True

    def _note(self, signum: int, frame: Any) -> None:
        self._received = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._signal is None or self._done:
            return
        if not trainer.strategy.reduce_boolean_decision(self._received, all=False):
            return
        if _inside_accumulation_window(trainer):
            return  # the gradients summed so far are in no checkpoint: write after the window's last batch
        self._done = True
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        if not trainer.is_global_zero:
            return
        job = slurm_job_id()
        result = subprocess.run(["scontrol", "requeue", job], check=False)
        if result.returncode == 0:
            log.info("requeue signal: wrote %s at step %d and requeued SLURM job %s", path, trainer.global_step, job)
        else:
            log.warning("requeue signal: wrote %s, but `scontrol requeue %s` failed with code %d", path, job,
                        result.returncode)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._installed:
            # None: the previous handler was not installed from Python; the default action is the best restore
            signal.signal(self._signal, signal.SIG_DFL if self._previous_handler is None else self._previous_handler)
            self._installed, self._previous_handler = False, None
