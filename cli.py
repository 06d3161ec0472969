"""Command line: `python cli.py fit|validate|test|predict --config configs/<experiment>.yaml` (or `lvlm-prune ...`)."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback  # noqa: E402
from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn  # noqa: E402

from callbacks.requeue import SlurmRequeue  # noqa: E402
from callbacks.resume import ResumableDataOrder, resume_checkpoint  # noqa: E402
from callbacks.training_monitor import TrainingMonitor  # noqa: E402
from lightning_modules.strategies import AtomicCheckpointIO  # noqa: E402
from lvlm_prune.archives import deepspeed_model_states, torch_archive_problem  # noqa: E402


# --ckpt_path values that name no file: Lightning's (and its `registry:<name>...`), and `auto` (the newest
# checkpoint of the run)
CHECKPOINT_KEYWORDS = ("auto", "last", "best", "hpc", "registry")
# model settings a resumed fit takes from the checkpoint: Lightning restores the optimizer's parameter groups (rate,
# weight decay) and the LR scheduler (base rates and the schedule's own plan) over what configure_optimizers built
RESTORED_WITH_THE_OPTIMIZER = ("learning_rate", "weight_decay", "warmup_fraction", "final_lr_ratio", "warmup_steps",
                               "optimizer")


class RunConfigRecord(SaveConfigCallback):
    """Lightning's config saving, except that a fit stopped before its first training batch (a refused resume: another
    base, another plug-in shape, a damaged checkpoint) puts the run's earlier `config.yaml` back: the record describes
    the checkpoints and exports on disk, which `scripts/export_plugin.py` reads it for."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._earlier: tuple[Path, bytes] | None = None
        if stage == "fit" and self.save_to_log_dir and not self.already_saved:
            path = Path(trainer.log_dir) / self.config_filename  # log_dir is a collective: every rank asks
            if trainer.is_global_zero and path.is_file():
                self._earlier = (path, path.read_bytes())
        super().setup(trainer, pl_module, stage)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._earlier = None  # from here on the run trains with the new settings

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        earlier, self._earlier = getattr(self, "_earlier", None), None
        if earlier is not None:
            path, content = earlier
            staged = path.with_name(f".{path.name}.restore")
            staged.write_bytes(content)
            staged.replace(path)


class LVLMPruneCLI(LightningCLI):
    """LightningCLI with the project's links and defaults.

    - The datamodule owns the processor (tokenizer + image processor) and the question categories; the
      model receives them at instantiation, so a YAML names them once.
    - A `ModelCheckpoint` is always present (`--checkpoint.*`) and keeps `last.ckpt` for resuming; a new fit in
      the same run directory replaces it (no `last-v1.ckpt`).
    - A TQDM progress bar is always present (`--progress_bar.*`): it also prints progress when the output is a
      log file, which Rich's bar does not.
    - Resuming is exact and automatic: `ResumableDataOrder` (`--data_order.*`) continues the data order
      mid-epoch, checkpoint files are written atomically, and `fit --ckpt_path auto` resumes from the newest
      of the SLURM requeue checkpoint and `last.ckpt` (or starts fresh when there is none); `validate`, `test`
      and `predict` take `auto` too (and stop when there is none).
    - `TrainingMonitor` (`--monitor.*`) logs the learning rates, the gradient norm and the training speed (samples
      and tokens per second, seconds per step) every `log_every_n_steps` steps.
    - Under SLURM, `SlurmRequeue` takes over Lightning's auto-requeue: it checkpoints at a batch boundary after the
      requeue signal, not inside the signal handler.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.processor", "model.init_args.processor", apply_on="instantiate")
        parser.link_arguments("data.categories", "model.init_args.categories", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # run directories are fixed (version: run), so a new fit there replaces last.ckpt instead of writing
        # last-v1.ckpt beside it, which `--ckpt_path .../last.ckpt` and `make demo` would then pass over
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(TQDMProgressBar, "progress_bar")
        parser.set_defaults({"progress_bar.refresh_rate": 10})
        parser.add_lightning_class_args(ResumableDataOrder, "data_order")
        parser.add_lightning_class_args(TrainingMonitor, "monitor")

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the parsed model settings with the hyperparameters saved in a `--ckpt_path` file, so a
        command-line or config value (another eval ratio, a moved base) would be silently ignored. Here the config
        and command line decide; the checkpoint supplies weights and loop state, and differing settings are named
        (for `auto`, once `before_fit` has found the checkpoint)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if (ckpt_path and ckpt_path not in CHECKPOINT_KEYWORDS and not ckpt_path.startswith("registry:")
                and not Path(ckpt_path).exists()):
            # before anything is written (the run's config record, an emptied answer file)
            raise FileNotFoundError(f"--ckpt_path {ckpt_path!r} does not exist (give a checkpoint file, a DeepSpeed "
                                    f"checkpoint directory, or one of {', '.join(CHECKPOINT_KEYWORDS)})")
        if ckpt_path and Path(ckpt_path).is_dir() and not (Path(ckpt_path) / "latest").is_file():
            raise ValueError(f"--ckpt_path {ckpt_path!r} is a directory but not a DeepSpeed checkpoint (no 'latest' file "
                             "in it); give a checkpoint file such as last.ckpt, a DeepSpeed checkpoint directory, or auto")
        if ckpt_path and Path(ckpt_path).exists():
            self._name_settings_that_differ(ckpt_path)

    def _name_settings_that_differ(self, ckpt_path: str | Path) -> None:
        """Warns of model settings the config sets otherwise than the run that wrote the checkpoint: the config's
        values are used, except those a resumed fit restores with the optimizer (RESTORED_WITH_THE_OPTIMIZER)."""
        archive = _checkpoint_archive(Path(ckpt_path))
        if archive is None:  # a DeepSpeed directory whose layout is not known here: the trainer loads it
            return
        problem = torch_archive_problem(archive)  # torch.load's own errors suggest unsafe loading, or load garbage
        if problem is not None:
            raise ValueError(f"--ckpt_path {str(ckpt_path)!r} is not a readable Lightning checkpoint ({problem})")
        try:
            saved = torch.load(archive, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        except pickle.UnpicklingError:  # objects the safe loader refuses: nothing to compare, the trainer loads it
            return
        model = self.config[self.config["subcommand"]].get("model")
        current = dict(model.get("init_args") or {}) if model is not None else {}
        linked = ("processor", "categories")  # filled in from the datamodule at instantiation, not parsed
        # a setting left at None is derived by the module (eval_method: the plug-in's name), which saves the result
        differing = [key for key, value in saved.items() if key in current and not key.startswith("_")
                     and key not in linked and current[key] is not None and _plain(current[key]) != _plain(value)]
        kept = [key for key in differing if key in RESTORED_WITH_THE_OPTIMIZER and self.config["subcommand"] == "fit"]
        used = [key for key in differing if key not in kept]
        if used:
            rank_zero_warn(f"--ckpt_path {ckpt_path}: the config sets model.init_args {used} differently from the "
                           "run that wrote the checkpoint; the config's values are used")
        if kept:
            rank_zero_warn(f"--ckpt_path {ckpt_path}: the config sets model.init_args {kept} differently from the run "
                           "that wrote the checkpoint, but a resumed fit restores the optimizer and its learning-rate "
                           "schedule from the checkpoint, so the checkpoint's values stay in force; start a new run "
                           "(without --ckpt_path, or with the plug-in's weights as plugin_weights_path) to train "
                           "with these")

    def instantiate_classes(self) -> None:
        """A constructor's error reaches the user as itself: jsonargparse wraps it in a ValueError per subtype it tried,
        with the whole settings namespace (hundreds of lines around the one that names the file or setting)."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = _constructor_error(error)
            if cause is None:
                raise
            raise cause.with_traceback(cause.__traceback__) from None

    def _instantiate_trainer(self, config, callbacks):
        if self.subcommand not in (None, "fit"):
            # the run's config.yaml is fit's (scripts/export_plugin.py reads the plug-in's settings from it): a
            # validate / test / predict in the same run directory writes its own beside it
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config_{self.subcommand}.yaml"}
        if config.get("enable_progress_bar") is False:  # the forced bar would contradict the setting
            callbacks = [c for c in callbacks if not isinstance(c, TQDMProgressBar)]
        # after ResumableDataOrder: its count includes a batch the requeue checkpoint is written after
        callbacks = [*callbacks, SlurmRequeue()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own CheckpointIO is kept
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        self._resolve_auto_checkpoint()

    def before_validate(self) -> None:
        self._resolve_auto_checkpoint()

    def before_test(self) -> None:
        self._resolve_auto_checkpoint()

    def before_predict(self) -> None:
        self._resolve_auto_checkpoint()

    def _check_checkpoint_fits_the_strategy(self) -> None:
        """A DeepSpeed checkpoint is a directory that only the DeepSpeed strategy reads (others fail in torch.load
        with IsADirectoryError)."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_dir() and not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            raise ValueError(f"--ckpt_path {str(ckpt_path)!r} is a DeepSpeed checkpoint, which only the DeepSpeed "
                             f"strategy reads, but this run's is {type(self.trainer.strategy).__name__}: add the "
                             "preset it was trained with (--config configs/trainer/deepspeed_zero2.yaml or your own), "
                             "or export its plug-in (python scripts/export_plugin.py <checkpoint dir> <file>) and "
                             "evaluate that with model.init_args.plugin_weights_path")

    def _resolve_auto_checkpoint(self) -> None:
        """`--ckpt_path auto`: the newest checkpoint of the run; fit starts fresh without one, an evaluation stops."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "auto":
            self._check_checkpoint_fits_the_strategy()
            return
        config["ckpt_path"] = resume_checkpoint(self.trainer)
        if config["ckpt_path"] is None and self.subcommand != "fit":
            raise FileNotFoundError(f"--ckpt_path auto: this run has no checkpoint to {self.subcommand} (the run "
                                    "directory of the config's logger or checkpoint.dirpath); give the checkpoint's "
                                    "path, or leave --ckpt_path out to evaluate the configured weights")
        if config["ckpt_path"] is None:
            rank_zero_warn("--ckpt_path auto: no checkpoint of this run yet, starting from scratch (a requeued run "
                           "finds its checkpoints only under a fixed logger version or checkpoint.dirpath)")
        else:
            doing = "resuming from" if self.subcommand == "fit" else f"{self.subcommand} with"
            rank_zero_info(f"--ckpt_path auto: {doing} {config['ckpt_path']}")
            self._check_checkpoint_fits_the_strategy()
            self._name_settings_that_differ(config["ckpt_path"])


def _checkpoint_archive(path: Path) -> Path | None:
    """The file holding a checkpoint's hyperparameters: the file itself, or in a DeepSpeed checkpoint directory the
    model-states file of its 'latest' tag (rank 0's, where Lightning's client state goes); None when not found."""
    if path.is_file():
        return path
    states = deepspeed_model_states(path)
    return states[0] if states else None


def _constructor_error(error: BaseException) -> BaseException | None:
    """The exception under jsonargparse's instantiation wrappers, or None when `error` is not such a wrapper."""
    wrappers = ("Does not validate against any of the Union subtypes", "Problem with given class_path")
    cause = error
    while isinstance(cause, ValueError) and cause.__cause__ is not None and any(w in str(cause) for w in wrappers):
        cause = cause.__cause__
    return cause if cause is not error else None


def _plain(value: Any) -> Any:
    """A parsed config value as plain data, comparable with a checkpoint's saved hyperparameters."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_config_files(args: list[str]) -> None:
    """A YAML syntax error in a `--config` file, named by its path: jsonargparse reports it in "<unicode string>", so
    with several merged configs the broken one is not known."""
    paths = [value for flag, value in zip(args, args[1:]) if flag in ("--config", "-c")]
    paths += [arg.split("=", 1)[1] for arg in args if arg.startswith(("--config=", "-c="))]
    for path in paths:
        if not Path(path).is_file():
            continue  # jsonargparse names a missing file, and --config also takes inline YAML
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"--config {path}: not valid YAML: {error}") from error


def cli_main(args: list[str] | None = None, run: bool = True) -> LVLMPruneCLI:
    check_config_files(sys.argv[1:] if args is None else list(args))
    return LVLMPruneCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_callback=RunConfigRecord,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "runs", "name": "lvlm_prune"}},
        },
        args=args,
        run=run,
    )


def main() -> None:
    """The `lvlm-prune` console script: the wrapper passes the return value to sys.exit, so return nothing."""
    cli_main()


if __name__ == "__main__":
    main()
