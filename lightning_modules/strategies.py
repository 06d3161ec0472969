"""Lightning strategy and checkpoint plug-ins for running at scale (DeepSpeed ZeRO, atomic checkpoint files)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.deepspeed import _validate_checkpoint_directory
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn


def _remove(path: Path) -> None:
    """Removes a checkpoint at `path` whichever kind it is: DeepSpeed's directory, or the single file another
    strategy wrote under the same name (a run directory that changed strategy)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy that also runs on CPU processes (gloo), for tests and CPU clusters.

    On a CUDA accelerator it trains as the stock `DeepSpeedStrategy` but for gradient accumulation (below). On CPU
    three stock steps assume a CUDA device and are replaced: the accelerator check, the device-index check (a CPU
    device has no index) and the device rank passed to `deepspeed.initialize` (for training and for validate / test
    / predict). Set `DS_ACCELERATOR=cpu` before launching so DeepSpeed itself picks its CPU accelerator. On every
    device, torchmetrics states keep their dtype when the module is cast to the training precision, and 0-dim
    parameters (which DeepSpeed cannot broadcast) are refused by name. With `exclude_frozen_parameters=True` (the
    presets) checkpoints hold no frozen weights, and loading one checks strictly that every trainable parameter is
    in it while the frozen ones come from the model as built. With gradient accumulation the loss is divided by the
    window's length once, as without DeepSpeed: Lightning's closure divides it and the stock strategy lets
    DeepSpeed's backward divide it again, which leaves gradients, their norm and the clipping threshold's effect at
    1/k of a DDP run's.
    Takes every argument of `DeepSpeedStrategy` (`stage`, `offload_optimizer`, `exclude_frozen_parameters`, ...).
    """

    @property
    def _on_cuda(self) -> bool:
        return isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if self._on_cuda:
            super().setup_environment()
        else:
            DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if self._on_cuda:
            super().setup_distributed()
            return
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def setup(self, trainer) -> None:
        self.precision_plugin.convert_module = _convert_module_keeping_metric_states(self.precision_plugin.precision)
        super().setup(trainer)

    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Lightning's closure has already divided the loss by accumulate_grad_batches (automatic optimisation)
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
        if scalars:
            raise ValueError(f"DeepSpeed cannot broadcast or partition 0-dim parameters {scalars[:5]}: give them shape (1,)")
        if self._on_cuda:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

    def _initialize_deepspeed_inference(self, model):
        # validate / test / predict: the stock path passes `root_device.index` as the device rank, None on CPU
        # (DeepSpeed then compares None >= 0); the rank of this process goes in its place
        if self._on_cuda:
            return super()._initialize_deepspeed_inference(model)
        import deepspeed

        stock_initialize = deepspeed.initialize

        def initialize(*args, **kwargs):
            kwargs["args"] = argparse.Namespace(device_rank=self.local_rank)
            return stock_initialize(*args, **kwargs)

        deepspeed.initialize = initialize
        try:
            return super()._initialize_deepspeed_inference(model)
        finally:
            deepspeed.initialize = stock_initialize

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any = None) -> None:
        """DeepSpeed writes its shards into the checkpoint directory in place, under a fixed tag, and its `latest`
        file stays from the previous save: a run killed mid-save left `last.ckpt` with shards of two steps that
        look whole. The shards go to `.<name>.saving` beside it, and once every rank has written its part the
        directory replaces the old one (two renames; the old one is removed after)."""
        target = Path(self.broadcast(str(filepath)))
        staging = target.with_name(f".{target.name}.saving")
        previous = target.with_name(f".{target.name}.previous")
        # with node-local storage every node holds its own copy of the directory
        node_local = bool(self.config.get("checkpoint", {}).get("use_node_local_storage", False))
        renames = self.local_rank == 0 if node_local else self.is_global_zero
        if renames:
            _remove(staging)
        self.barrier("checkpoint_staging")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("checkpoint_written")
        if renames:
            # the last whole checkpoint stays until the new one is in place: `target`, or `previous` when an
            # earlier save was killed between the renames (and the run resumed from it)
            if target.exists():
                _remove(previous)
                target.rename(previous)
            staging.rename(target)
            _remove(previous)
        self.barrier("checkpoint_renamed")

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        if not self.exclude_frozen_parameters or (self.load_full_weights and self.zero_stage_3):
            return super().load_checkpoint(checkpoint_path, weights_only)
        _validate_checkpoint_directory(checkpoint_path)
        module = self.lightning_module
        frozen = {name for name, p in module.named_parameters() if not p.requires_grad}

        def load_trainable(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
            # strict on what trains, whatever `strict_loading` says (the plug-in modules turn it off because their
            # lean checkpoints leave the frozen base out, which `frozen` accounts for here): a trainable weight
            # missing from the checkpoint would silently keep its initial value
            result = dst.load_state_dict(src, strict=False)
            missing = sorted(set(result.missing_keys) - frozen)
            if missing or result.unexpected_keys:
                raise RuntimeError(f"the DeepSpeed checkpoint {str(checkpoint_path)!r} does not fit this model: "
                                   f"missing {missing[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
            check_frozen_weights_loaded(module, result.missing_keys, checkpoint_path)

        _, client_state = self.deepspeed_engine.load_checkpoint(
            checkpoint_path,
            load_optimizer_states=module.trainer.state.fn == TrainerFn.FITTING,
            load_lr_scheduler_states=False,
            custom_load_fn=load_trainable,
        )
        if client_state is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {str(checkpoint_path)!r}")
        return client_state


def check_frozen_weights_loaded(module: torch.nn.Module, missing_keys: list[str], checkpoint_path) -> None:
    """Frozen plug-in weights whose values matter (after the load: the plug-in's own state says which) must not be
    among the checkpoint's missing keys. `exclude_frozen_parameters` leaves every frozen weight out, which suits the
    base but not, say, ACCM's DPO reference copied at its stage-2 start."""
    compensation = getattr(module, "compensation", None)
    if compensation is None:
        return
    needed = {f"compensation.{name}" for name in compensation.frozen_weights_needed()}
    lost = sorted(needed & set(missing_keys))
    if lost:
        raise RuntimeError(
            f"the DeepSpeed checkpoint {str(checkpoint_path)!r} lacks frozen plug-in weights the run needs "
            f"({len(lost)}, e.g. {lost[0]!r}): the strategy's exclude_frozen_parameters leaves frozen weights out of "
            "checkpoints, so ACCM's DPO reference is lost once stage 2 has started. Resume such a run from a "
            "checkpoint saved before its stage 2, or train it with DDP (Lightning checkpoints keep the reference), or "
            "set exclude_frozen_parameters: false in the strategy (the checkpoints then hold the base too)")


_CAST_METHODS = {"32-true": "float", "bf16-true": "bfloat16", "16-true": "half"}


def _convert_module_keeping_metric_states(precision: str):
    """The stock DeepSpeed precision casts with `module.to(dtype)`, which also casts torchmetrics states (float64
    sums become float32 or bf16); torchmetrics leaves its states alone under `.float()` / `.half()` / `.bfloat16()`."""

    def convert_module(module: torch.nn.Module) -> torch.nn.Module:
        method = _CAST_METHODS.get(precision)
        return getattr(module, method)() if method else module

    return convert_module


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temporary file beside the target, fsync, then `os.replace`: a crash while saving
    leaves the previous checkpoint whole. (Lightning's own save stages the bytes in the system temp
    directory and moves them, which is a copy, not a rename, when that is another file system.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(staging, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            previous = None
            if target.is_dir() and not target.is_symlink():
                # DeepSpeed's checkpoint directory under this name (the run changed strategy): a file cannot
                # replace it, so it moves aside and goes once the new file is in place
                previous = target.with_name(f".{target.name}.previous")
                _remove(previous)
                target.rename(previous)
            os.replace(staging, target)
            if previous is not None:
                _remove(previous)
        finally:
            staging.unlink(missing_ok=True)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
