"""Command line: `python cli.py fit|validate|test --config configs/<experiment>.yaml` (or `lvlm-prune ...`)."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402


class LVLMPruneCLI(LightningCLI):
    """LightningCLI with the project's links and defaults.

    - The datamodule owns the processor (tokenizer + image processor) and the question categories; the
      model receives them at instantiation, so a YAML names them once.
    - A `ModelCheckpoint` is always present (`--checkpoint.*`) and keeps `last.ckpt` for resuming.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.processor", "model.init_args.processor", apply_on="instantiate")
        parser.link_arguments("data.categories", "model.init_args.categories", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})


def cli_main(args: list[str] | None = None, run: bool = True) -> LVLMPruneCLI:
    return LVLMPruneCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "runs", "name": "lvlm_prune"}},
        },
        args=args,
        run=run,
    )


if __name__ == "__main__":
    cli_main()
