"""Learning rate, gradient norm and training speed in the run's logs, beside the losses."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


def batch_samples(batch: Any) -> int:
    """Examples in a collated batch: its question ids (a packed batch holds several examples per row), else rows."""
    if isinstance(batch, dict):
        if isinstance(batch.get("question_ids"), (list, tuple)):
            return len(batch["question_ids"])
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return int(batch["input_ids"].shape[0])
    return 0


def batch_tokens(batch: Any) -> int:
    """The data's real sequence positions in a batch (prompt, visual and answer tokens; padding left out): the
    collator's count, else the 2-D attention mask's, else 0."""
    if not isinstance(batch, dict):
        return 0
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else 0


class TrainingMonitor(L.Callback):
    """Logs, every `trainer.log_every_n_steps` optimizer steps (Lightning's count: with manual optimisation every
    `optimizer.step()` call is one), the learning rate the last step used (`train/lr`; per parameter group,
    `train/lr/<group name or group<i>>`, when the groups' rates differ), that step's gradient norm and the training
    speed over the steps since the last log.

    - `train/grad_norm`: the L2 norm of the trainable gradients the optimizer stepped with, before clipping (after
      DDP's all-reduce; under DeepSpeed, which keeps gradients in its own partitions, the engine's global norm).
      NaN for a step that was skipped (no optimizer step: a non-finite loss or gradient).
    - `train/seconds_per_step` (mean over ranks), `train/samples_per_second` and `train/tokens_per_second` (summed
      over ranks). Tokens are the data's: the real positions of the batches' sequences (`num_tokens`), not the
      extra passes a plug-in's objective runs (RCP's teacher, ACCM's KL ranking). The data loader's and checkpoint
      saving's time count, validation's does not; an accumulation window is one step.

    Args:
        learning_rate: log the learning rates.
        speed: log the training speed (three scalar all-reduces per log under DDP / DeepSpeed).
        grad_norm: log the gradient norm.
    """

    def __init__(self, learning_rate: bool = True, speed: bool = True, grad_norm: bool = True):
        self.learning_rate = learning_rate
        self.speed = speed
        self.grad_norm = grad_norm
        self._grad_norm: torch.Tensor | None = None
        self._reset_window()
        self._paused_at: float | None = None
        self._rates: dict[str, float] = {}
        self._last_step = 0
        self._engine_steps: int | None = None

    def _reset_window(self) -> None:
        self._started = time.perf_counter()
        self._samples = 0
        self._tokens = 0
        self._steps = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_window()
        self._last_step = trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused_at is not None:
            self._started += time.perf_counter() - self._paused_at
            self._paused_at = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.learning_rate:  # the rates this batch's step uses (a scheduler steps right after it)
            self._rates = self.learning_rates(trainer)
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        self._engine_steps = getattr(engine, "global_steps", None)  # did this batch's step run? (DeepSpeed)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        every = trainer.log_every_n_steps
        if not self.grad_norm or not every or (trainer.global_step + 1) % every:
            return  # computed on the steps that are logged only
        norms = [torch.linalg.vector_norm(p.grad.detach().float()) for group in optimizer.param_groups
                 for p in group["params"] if p.grad is not None]
        self._grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._samples += batch_samples(batch)
        self._tokens += batch_tokens(batch)
        if trainer.global_step == self._last_step:  # inside an accumulation window (or a skipped step)
            return
        self._steps += trainer.global_step - self._last_step
        self._last_step = trainer.global_step
        if not trainer.log_every_n_steps or trainer.global_step % trainer.log_every_n_steps:
            return
        if self.learning_rate:
            for name, value in self._rates.items():
                pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
        if self.grad_norm:
            pl_module.log("train/grad_norm", self._logged_step_grad_norm(trainer), on_step=True, on_epoch=False,
                          batch_size=1)
        if self.speed:
            seconds = max(time.perf_counter() - self._started, 1e-9)
            pl_module.log("train/seconds_per_step", seconds / self._steps, on_step=True, on_epoch=False,
                          batch_size=1, sync_dist=True)
            for name, count in (("train/samples_per_second", self._samples), ("train/tokens_per_second", self._tokens)):
                pl_module.log(name, count / seconds, on_step=True, on_epoch=False, batch_size=1, sync_dist=True,
                              reduce_fx="sum")
        self._reset_window()

    def _logged_step_grad_norm(self, trainer: L.Trainer) -> torch.Tensor:
        norm, self._grad_norm = self._grad_norm, None
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if norm is None and engine is not None and getattr(engine, "global_steps", None) != self._engine_steps:
            engine_norm = engine.get_global_grad_norm()
            norm = None if engine_norm is None else torch.as_tensor(float(engine_norm))
        # a skipped step logs NaN: Lightning would otherwise repeat the last logged value in this step's row
        return norm if norm is not None else torch.tensor(float("nan"))

    @staticmethod
    def learning_rates(trainer: L.Trainer) -> dict[str, float]:
        """The current learning rates: one per optimizer whose groups share it (weight decay and no-decay groups
        on one schedule), else one per group, named by the group's 'name' when it has one."""
        rates: dict[str, float] = {}
        optimizers = trainer.optimizers
        for k, optimizer in enumerate(optimizers):
            prefix = "train/lr" + (f"/optimizer{k}" if len(optimizers) > 1 else "")
            groups = optimizer.param_groups
            if len({float(group["lr"]) for group in groups}) <= 1:
                if groups:
                    rates[prefix] = float(groups[0]["lr"])
                continue
            for i, group in enumerate(groups):
                rates[f"{prefix}/{group.get('name', f'group{i}')}"] = float(group["lr"])
        return rates
