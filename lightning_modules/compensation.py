"""Training a compensation plug-in (RCP, ACCM) on a frozen base LVLM."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file

from lightning_modules.common import (
    EVALUATION_MEMORY_SETTINGS,
    check_writable_directory,
    deepspeed_fp32_masters,
    gathered,
    generates_in_lockstep,
    out_of_memory_advice,
    under_every_name,
)
from lightning_modules.frozen_base import FrozenBaseModule
from lvlm_prune.archives import save_plugin_export
from lvlm_prune.compensation import Compensation, is_training_only
from lvlm_prune.rcp.schedules import warmup_cosine_lr_lambda
from lvlm_prune.runner import GenerationResult

log = logging.getLogger(__name__)

BASE_PREFIX = "base."


class CompensationModule(FrozenBaseModule):
    """A frozen base + a trainable compensation plug-in. Only the plug-in's parameters train, and only they
    are saved in checkpoints (a 7B base is never copied into every checkpoint); a checkpoint records the
    base's path and fingerprint and refuses to load onto a different base.

    Args:
        base_model_path: directory of the base model (Hugging Face layout).
        compensation: the plug-in (e.g. `lvlm_prune.rcp.compensation.RCPCompensation`).
        processor: linked from the datamodule.
        categories: linked from the datamodule.
        eval_method: method used by validate/test (default: the plug-in's name).
        eval_prune_ratio: ratio for validate/test.
        learning_rate: AdamW peak learning rate (paper: 5e-5 at 7B scale).
        weight_decay: AdamW weight decay.
        warmup_fraction: fraction of steps of linear warm-up before the cosine decay.
        final_lr_ratio: learning rate at the end, relative to the peak.
        plugin_weights_path: load plug-in weights exported by a previous run (safetensors) before anything else.
        plugin_export_path: where the trained plug-in weights are written at the end of fit.
        nonfinite_loss: 'skip' (drop the step, warn) or 'raise' when a loss is NaN/inf.
        dtype: base dtype. attn_implementation: base attention. quantization: None | 8bit | 4bit.
        max_new_tokens: longest generated answer.
        method_options: keyword arguments of training-free methods by name, for a sweep that runs them beside
            the plug-in (as `FrozenBaseModule`'s), e.g. `{pdrop: {stage_ends: [1, 4, 8]}}`.
    """

    def __init__(
        self,
        base_model_path: str,
        compensation: Compensation,
        processor: Any = None,
        categories: list[str] | None = None,
        eval_method: str | None = None,
        eval_prune_ratio: float | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        final_lr_ratio: float = 0.1,
        plugin_weights_path: str | None = None,
        plugin_export_path: str | None = None,
        nonfinite_loss: str = "skip",
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        quantization: str | None = None,
        max_new_tokens: int = 8,
        method_options: dict[str, dict[str, Any]] | None = None,
    ):
        if nonfinite_loss not in ("skip", "raise"):
            raise ValueError(f"model.nonfinite_loss={nonfinite_loss!r}; choose 'skip' or 'raise'")
        if not learning_rate > 0:
            raise ValueError(f"model.init_args.learning_rate={learning_rate} must be > 0")
        if not 0.0 <= warmup_fraction < 1.0 or not 0.0 <= final_lr_ratio <= 1.0:
            raise ValueError(f"model.warmup_fraction={warmup_fraction} must be in [0, 1) and model.final_lr_ratio="
                             f"{final_lr_ratio} in [0, 1]")
        target = getattr(compensation, "target_prune_ratio", 0.0)
        super().__init__(
            base_model_path, processor, categories,
            eval_method=eval_method or compensation.name,
            eval_prune_ratio=target if eval_prune_ratio is None else eval_prune_ratio,
            dtype=dtype, attn_implementation=attn_implementation, quantization=quantization,
            max_new_tokens=max_new_tokens, method_options=method_options,
        )
        self.save_hyperparameters(ignore=["processor", "compensation"])
        self.hparams.eval_method = eval_method or compensation.name
        self.hparams.eval_prune_ratio = target if eval_prune_ratio is None else eval_prune_ratio
        self.compensation = compensation
        self.compensation.attach(self.engine, self.tokenizer)
        self._base_fingerprints = fingerprints(self.base)
        self.base_fingerprint = self._base_fingerprints[0]
        if plugin_weights_path:
            load_plugin_weights(self.compensation, plugin_weights_path, base_fingerprints=self._base_fingerprints)
        # base weights are not in lean checkpoints; on_load_checkpoint checks the plug-in's keys itself
        self.strict_loading = False
        self.skipped_steps = 0
        self._skip_step = False
        self._exported_at_step: int | None = None

    @property
    def compensation_name(self) -> str:
        return self.compensation.name

    def plugin_method_names(self) -> list[str]:
        """Method names the plug-in answers: its name, plus its `variants()` when it has some (ACCM)."""
        variants = getattr(self.compensation, "variants", None)
        return list(variants()) if callable(variants) else [self.compensation_name]

    # the base stays in eval mode (no dropout) whatever Lightning asks of the module
    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()
        return self

    # ------------------------------------------------------------------ methods
    def method_names(self) -> list[str]:
        return sorted({*super().method_names(), *self.plugin_method_names()})

    def make_method(self, name: str, prune_ratio: float):
        if name not in self.plugin_method_names():
            return super().make_method(name, prune_ratio)
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"prune_ratio={prune_ratio} must be in [0, 1)")
        return self.engine.bind(self.compensation.inference_method(prune_ratio))

    def _generate(self, batch: dict[str, Any], name: str, prune_ratio: float, eos: int | None,
                  pad: int) -> GenerationResult:
        if name not in self.plugin_method_names():
            return super()._generate(batch, name, prune_ratio, eos, pad)
        self.compensation.lockstep = generates_in_lockstep(self)  # ACCM's caption decoding keeps step as well
        variant = {} if name == self.compensation_name else {"variant": name}
        return self.compensation.generate(self.engine, batch, prune_ratio, self.hparams.max_new_tokens, eos, pad,
                                          **variant)

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        self._train_ended = False
        ddp = self.trainer.strategy.model if isinstance(self.trainer.strategy, DDPStrategy) else None
        if (self.compensation.leaves_parameters_unused and ddp is not None
                and not getattr(ddp, "find_unused_parameters", True)):
            raise ValueError(f"{self.compensation_name} leaves some plug-in parameters without a gradient in some "
                             "training steps, which plain DDP (trainer.strategy: ddp) cannot reduce: use "
                             "--trainer.strategy ddp_find_unused_parameters_true")
        if self.hparams.plugin_export_path and self.trainer.is_global_zero:
            if Path(self.hparams.plugin_export_path).is_dir():
                raise ValueError(f"model.init_args.plugin_export_path {self.hparams.plugin_export_path!r} is a directory; "
                                 "give the weights file to write, such as <run dir>/plugin.safetensors")
            check_writable_directory(Path(self.hparams.plugin_export_path).parent, "model.init_args.plugin_export_path")
        trainable = sum(_numel(p) for p in self.parameters() if p.requires_grad)
        frozen = sum(_numel(p) for p in self.parameters() if not p.requires_grad)
        message = (f"{self.compensation_name}: {trainable:,} trainable plug-in parameters, {frozen:,} frozen base "
                   f"parameters ({100 * trainable / max(1, trainable + frozen):.2f}% trainable)")
        log.info(message)
        if self.trainer.is_global_zero:
            print(message, flush=True)
        if self.logger is not None:
            self.logger.log_hyperparams({"params/trainable": trainable, "params/frozen": frozen})

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        if "packed_rows" in batch:
            raise ValueError("the training batches are packed (data.pack_length is set), but the pruning engine masks "
                             "tokens per padded row: set data.init_args.pack_length to null for RCP and ACCM training")
        progress = min(1.0, self.global_step / self._planned_steps())
        # The plug-in's random draws (RCP's Gumbel noise) use the global generator reseeded from (seed, rank,
        # step, batch) inside fork_rng: a resumed run draws what the uninterrupted run drew at the same step.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), out_of_memory_advice("the training step"):
            torch.manual_seed(self._step_seed(batch_idx))
            self.compensation.lockstep = generates_in_lockstep(self)
            losses = self.compensation.training_losses(self.engine, batch, progress)
        loss = losses["loss"]
        # every rank skips together: a rank without backward would leave the others waiting in the all-reduce
        finite = bool(torch.isfinite(loss))
        self._skip_step = not self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if self._skip_step:
            message = (f"non-finite loss{'' if not finite else ' on another rank'} at step {self.global_step} "
                       f"(this rank: { {k: float(v.detach()) for k, v in losses.items() if v.numel() == 1} }); ")
            if self.hparams.nonfinite_loss == "raise":
                raise FloatingPointError(message + "set model.nonfinite_loss=skip to skip such steps")
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps))
            # this step's own terms (non-finite ones included): a term not logged now would show the last step's value
            size = batch["input_ids"].shape[0]
            self.log_dict({f"train/{k}": v.detach().float() for k, v in losses.items() if k != "loss"}, batch_size=size)
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
            zero = sum((p * 0.0).sum() for p in self.compensation.parameters() if p.requires_grad)
            if self.trainer.accumulate_grad_batches > 1:
                # One rule for every strategy: DeepSpeed counts its accumulation window in engine.step(), called
                # after every micro-batch, so a micro-batch without backward and step would shift every later
                # window; and a skip flag set here would only reach optimizer_step from the window's last
                # micro-batch. This one contributes a zero gradient instead, and the window updates from the others.
                self._skip_step = False
                log.warning(message + "micro-batch dropped from its accumulation window (model.nonfinite_loss=skip)")
                return zero
            log.warning(message + "step skipped: no weight or optimiser-state update (model.nonfinite_loss=skip)")
            if self.trainer.world_size == 1:
                return None
            # Lightning needs a loss from every rank under DDP/DeepSpeed: a zero one whose backward completes the
            # gradient all-reduce; optimizer_step then skips the update itself.
            return zero
        size = batch["input_ids"].shape[0]
        self.log_dict({f"train/{k}": v.float() for k, v in losses.items() if k != "loss"}, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        # The closure runs first so a skipped step (non-finite loss) never reaches optimizer.step: AdamW would
        # still decay the weights and move its moments, and DeepSpeed refuses a step without backward.
        with out_of_memory_advice("the training step or its backward pass"):
            loss = optimizer_closure() if optimizer_closure is not None else None
        if self._skip_step:
            return
        if not self._gradients_finite():
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps))
            log.warning(f"non-finite gradient at step {self.global_step} (finite loss): step skipped, no weight or "
                        "optimiser-state update (model.nonfinite_loss=skip)")
            if self.hparams.nonfinite_loss == "raise":
                raise FloatingPointError(f"non-finite gradient at step {self.global_step}; set "
                                         "model.nonfinite_loss=skip to skip such steps")
            return
        optimizer.step(closure=lambda: loss)

    def _gradients_finite(self) -> bool:
        """Whether every plug-in gradient is finite on every rank (checked before clipping, which would spread a NaN
        norm to every weight). DeepSpeed keeps gradients in its own partitioned buffers: not checked there."""
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return True
        checks = [torch.isfinite(p.grad).all() for p in self.compensation.parameters()
                  if p.requires_grad and p.grad is not None]
        finite = bool(torch.stack(checks).all()) if checks else True  # one device sync, not one per parameter
        return self.trainer.strategy.reduce_boolean_decision(finite, all=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with out_of_memory_advice("the validation step", EVALUATION_MEMORY_SETTINGS):
            super().validation_step(batch, batch_idx)

    def _step_seed(self, batch_idx: int) -> int:
        key = f"{os.environ.get('PL_GLOBAL_SEED', 0)}/{self.global_rank}/{self.global_step}/{batch_idx}"
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1

    def _planned_steps(self) -> int:
        """Optimiser steps the run's schedules span: the LR schedule's, which a checkpoint restores. A run resumed
        with another length thus keeps one plan for the LR and the plug-in's schedules (RCP's temperature and noise,
        ACCM's stages): the checkpoint's, each schedule staying at its end value past it."""
        configs = getattr(self.trainer, "lr_scheduler_configs", None) or []
        scheduler = configs[0].scheduler if configs else None
        planned = getattr(getattr(scheduler, "lr_lambdas", [None])[0], "total_steps", None)
        estimated = self.trainer.estimated_stepping_batches
        if planned is None:
            return max(1, int(estimated))
        if planned != estimated and not getattr(self, "_warned_plan", False):
            self._warned_plan = True
            rank_zero_warn(f"the schedules (learning rate, {self.compensation_name}'s own) keep the plan of {planned} "
                           f"steps restored from the checkpoint; this run now ends after {estimated}")
        return max(1, int(planned))

    def configure_optimizers(self):
        parameters = [p for p in self.compensation.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        if self.trainer.estimated_stepping_batches == float("inf"):
            raise ValueError("the run has no length (trainer.max_steps and trainer.max_epochs are both -1): the "
                             "plug-in's schedules need one; set trainer.max_steps or trainer.max_epochs")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine_lr_lambda(total, self.hparams.warmup_fraction, self.hparams.final_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_end(self) -> None:
        self._train_ended = True
        self.export_plugin()

    def on_fit_end(self) -> None:
        if not self._train_ended and self.global_step > 0 and self.trainer.fit_loop.done:
            self.export_after_finished_resume()

    def export_after_finished_resume(self) -> None:
        """Fit resumed from a checkpoint where training had ended (max_steps / max_epochs) runs no training loop, so
        `on_train_end` and the export in it never run. The restored plug-in is exported from `on_fit_end` instead,
        after the strategy's teardown; DeepSpeed's engine is gone by then, so there the checkpoint is exported."""
        if not self.hparams.plugin_export_path or self._exported_at_step == self.global_step:
            return
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            raise ValueError(f"fit resumed from a checkpoint at step {self.global_step}, where training had already "
                             "ended, so the plug-in export did not run; export it from the checkpoint: python "
                             f"scripts/export_plugin.py <checkpoint dir> {self.hparams.plugin_export_path}")
        self.export_plugin()

    def export_plugin(self) -> None:
        """Write the trained plug-in to `plugin_export_path` (once per training step count: the sweep after fit
        calls this before it starts, and `on_train_end` after it). Every rank calls it (ZeRO-3 gathers)."""
        if not self.hparams.plugin_export_path or self._exported_at_step == self.global_step:
            return
        # both collectives under ZeRO-3: every rank
        masters = deepspeed_fp32_masters(self.trainer.strategy, self.compensation, keep=self.trainer.is_global_zero)
        with gathered(self.compensation.parameters()):  # ZeRO-3: every rank takes part in the gather
            if self.trainer.is_global_zero:
                export_plugin_weights(self.compensation, self.hparams.plugin_export_path,
                                      {"base_model_path": self.hparams.base_model_path,
                                       "base_fingerprint": self.base_fingerprint}, overrides=masters)
        self._exported_at_step = self.global_step

    # ------------------------------------------------------------------ lean checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(BASE_PREFIX)]:
            del state[key]
        checkpoint["base_model"] = {"path": self.hparams.base_model_path, "fingerprint": self.base_fingerprint}
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["plugin"] = self.compensation.name
        # the settings the weights were trained with, for scripts/export_plugin.py (a run's config.yaml may be another
        # command's, or not beside the checkpoint: a SLURM requeue checkpoint sits in the run's root)
        plugin_class = type(self.compensation)
        checkpoint["plugin_class"] = f"{plugin_class.__module__}.{plugin_class.__qualname__}"
        checkpoint["plugin_config"] = self.compensation.export_config()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get("base_model")
        if recorded is not None and recorded["fingerprint"] not in self._base_fingerprints:
            raise ValueError(
                f"this checkpoint belongs to the base model at {recorded['path']!r} (fingerprint "
                f"{recorded['fingerprint']}), but the loaded base {self.hparams.base_model_path!r} has fingerprint "
                f"{self.base_fingerprint}; point model.init_args.base_model_path at the original base, loaded with "
                "the same model.init_args.dtype and quantization (the fingerprint covers both). To evaluate on the "
                "base loaded another way (e.g. quantised), export the plug-in (python scripts/export_plugin.py "
                "<checkpoint> plugin.safetensors) and pass --model.init_args.plugin_weights_path plugin.safetensors"
            )
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        saved_plugin = checkpoint.get("plugin")
        if saved_plugin is not None and saved_plugin != self.compensation.name:
            raise ValueError(f"this checkpoint holds the {saved_plugin!r} plug-in, but the config builds "
                             f"{self.compensation.name!r} (model.init_args.compensation): another experiment's "
                             "checkpoint, e.g. from a run directory two experiments share")
        # The base's own state is not filled in from the live model: a 4-bit base's state dict holds quantisation
        # state (absmax, quant_map) that load_state_dict refuses as unexpected keys.
        state = checkpoint.get("state_dict")
        if state is None:  # DeepSpeed: its engine loads the module's weights itself
            return
        own = {key: value for key, value in self.state_dict().items() if not key.startswith(BASE_PREFIX)}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(key for key in state if key not in own and not key.startswith(BASE_PREFIX))
        reshaped = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}" for key in sorted(own)
                    if key in state and state[key].shape != own[key].shape]
        if missing or unexpected or reshaped:
            raise ValueError(f"this checkpoint does not fit the configured {self.compensation.name} plug-in: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}, other shape (checkpoint vs configured) "
                             f"{reshaped[:5]}; model.compensation's settings differ from the run that wrote it")
        nonfinite = _nonfinite(state, own)
        if nonfinite:
            where = f" {str(self.trainer.ckpt_path)!r}" if self._trainer is not None and self.trainer.ckpt_path else ""
            raise ValueError(f"checkpoint{where}: its plug-in weights {nonfinite[:5]} hold NaN or infinite values: it "
                             "is corrupt, or training diverged before it was written; resume from an earlier "
                             "checkpoint")


def _nonfinite(state: dict[str, torch.Tensor], names) -> list[str]:
    """The floating-point entries of `state` among `names` with a NaN or an infinity."""
    return [key for key in sorted(names) if key in state and state[key].is_floating_point()
            and not bool(torch.isfinite(state[key]).all())]


def _numel(parameter: torch.nn.Parameter) -> int:
    return getattr(parameter, "ds_numel", parameter.numel())  # a ZeRO-3 partitioned parameter has numel 0


def fingerprints(model: torch.nn.Module) -> tuple[str, str]:
    """Short hashes of the base's config and a sample of its weights (first/last values of every tensor): the
    current one, whose config leaves out `_name_or_path` (the directory it was loaded from, so a moved or copied base
    keeps its fingerprint), and the earlier, path-dependent one that older checkpoints record."""
    current = hashlib.sha256(json.dumps(_without_load_paths(model.config.to_dict()), sort_keys=True,
                                        default=str).encode())
    with_path = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():  # one pass over the weights feeds both
        flat = tensor.detach().flatten()
        sample = torch.cat([flat[:4], flat[-4:]]).float().cpu() if flat.numel() else flat.float().cpu()
        for digest in (current, with_path):
            digest.update(name.encode())
            digest.update(sample.numpy().tobytes())
    return current.hexdigest()[:16], with_path.hexdigest()[:16]


def export_plugin_weights(plugin: Compensation, path: str | Path, metadata: dict[str, Any],
                          overrides: dict[str, torch.Tensor] | None = None) -> Path:
    """The plug-in alone: `<path>` (safetensors) + `<path>.json` (its constructor arguments + the base it fits).
    `overrides` replace entries of its state dict (DeepSpeed's fp32 masters of bf16-cast weights), under every name
    a tied weight has."""
    state = {k: v for k, v in {**plugin.state_dict(), **under_every_name(plugin, overrides)}.items()
             if not is_training_only(plugin, k)}
    # clone: tied weights (e.g. a GPT-2 caption model's wte and lm_head) share memory, which safetensors refuses
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    return save_plugin_export(tensors, path, {"plugin": plugin.name, "config": plugin.export_config(), **metadata})


def _without_load_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_load_paths(v) for k, v in value.items() if k != "_name_or_path"}
    return value


def load_plugin_weights(plugin: Compensation, path: str | Path, base_fingerprints: tuple[str, ...] = ()) -> None:
    """Loads exported plug-in weights. With `base_fingerprints` (the loaded base's, current first), warns when the
    `.json` beside them names another base (the same model in another dtype or quantisation also differs, so it is
    not an error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plug-in weights {str(path)!r} do not exist (model.plugin_weights_path)")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"plug-in weights {str(path)!r} (model.plugin_weights_path) are not a readable "
                         f"safetensors file: {error}") from error
    info_path = Path(str(path) + ".json")
    try:
        recorded = json.loads(info_path.read_text()) if info_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(info_path)!r}, the record beside the plug-in weights, is not readable JSON ({error}); "
                         "restore it, or delete it to load the weights without the base check") from error
    if base_fingerprints and recorded.get("base_fingerprint") not in (None, *base_fingerprints):
        rank_zero_warn(f"plug-in weights {str(path)!r} were trained on the base at {recorded.get('base_model_path')!r} "
                       f"(fingerprint {recorded['base_fingerprint']}), not on the loaded base (fingerprint "
                       f"{base_fingerprints[0]}); they are only meaningful on the same model, e.g. in another dtype")
    own = plugin.state_dict()
    nonfinite = _nonfinite(state, own)
    if nonfinite:
        raise ValueError(f"plug-in weights {str(path)!r} (model.plugin_weights_path): {nonfinite[:5]} hold NaN or "
                         "infinite values; the file is corrupt or was exported from a diverged run")
    mismatched = [f"{key} {tuple(value.shape)} != {tuple(own[key].shape)}" for key, value in state.items()
                  if key in own and value.shape != own[key].shape]
    if mismatched:
        raise ValueError(f"plug-in weights {str(path)!r} (trained on the base at {recorded.get('base_model_path')!r}) "
                         f"do not fit this base or {plugin.name} configuration; shapes saved != expected: "
                         f"{mismatched[:3]}")
    missing, unexpected = plugin.load_state_dict(state, strict=False)
    missing = [key for key in missing if not is_training_only(plugin, key)]
    if missing or unexpected:
        raise ValueError(f"plug-in weights {str(path)!r} do not fit this {plugin.name} configuration: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
