"""Pieces of the operations tests: a tiny RCP experiment YAML, a CLI launcher for subprocess runs, and the
callbacks and module those runs load (`--trainer.callbacks+=ops_helpers.X`; tests/ops is on their PYTHONPATH)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from callbacks.sweep import PruningSweep
from lightning_modules.common import gathered
from lightning_modules.compensation import CompensationModule

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def plugin_checksum(module: L.LightningModule) -> float:
    with gathered(module.compensation.parameters()):  # ZeRO-3: whole on every rank for the sum
        return float(sum(p.detach().double().sum() for p in module.compensation.parameters()))


class KillAt(L.Callback):
    """Sends `signal_name` to its own process after the training batch that makes `global_step == step`."""

    def __init__(self, step: int, signal_name: str = "SIGKILL"):
        self.step, self.signal_name = step, signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class NaNAt(L.Callback):
    """Makes the loss of training step `step` NaN on rank `rank`, and records (step, plug-in checksum) after every
    batch in `<record>.<rank>.jsonl`."""

    def __init__(self, step: int, rank: int, record: str):
        self.step, self.rank, self.record = step, rank, record

    def setup(self, trainer, pl_module, stage) -> None:
        original = pl_module.compensation.training_losses

        def training_losses(*args, **kwargs):
            losses = original(*args, **kwargs)
            if trainer.global_step == self.step and trainer.global_rank == self.rank:
                losses["loss"] = losses["loss"] * float("nan")
            return losses

        pl_module.compensation.training_losses = training_losses

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(f"{self.record}.{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "checksum": plugin_checksum(pl_module)}) + "\n")


class ChecksumAtStart(L.Callback):
    """Writes the plug-in checksum to `<record>.<rank>.json` when training starts (after a resume: what was
    restored)."""

    def __init__(self, record: str):
        self.record = record

    def on_train_start(self, trainer, pl_module) -> None:
        checksum = plugin_checksum(pl_module)  # every rank: a ZeRO-3 gather
        Path(f"{self.record}.{trainer.global_rank}.json").write_text(
            json.dumps({"step": trainer.global_step, "checksum": checksum}))


class EndGenerationEarly(L.Callback):
    """On rank `rank`, makes EOS by far the likeliest token of the base's and the ACCM caption model's heads, so
    that rank's generations end long before the other ranks' (a rank that stops calling a ZeRO-3 partitioned module
    early leaves the others waiting in the weight gather)."""

    def __init__(self, rank: int):
        self.rank = rank

    def setup(self, trainer, pl_module, stage) -> None:
        if trainer.global_rank != self.rank:
            return
        eos = pl_module.tokenizer.eos_token_id

        def boost(module, args, output):
            output[..., eos] += 1e4
            return output

        pl_module.base.lm_head.register_forward_hook(boost)
        pl_module.compensation.caption_model.decoder.lm_head.register_forward_hook(boost)


class PartitionProbe(L.Callback):
    """After the first training step, writes to `<record>.<rank>.json` how many values of the frozen base this rank
    holds and how many the base has (ZeRO-3 keeps a 1/world_size shard per rank)."""

    def __init__(self, record: str):
        self.record = record

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != 1:
            return
        base = list(pl_module.base.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in base)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in base)
        Path(f"{self.record}.{trainer.global_rank}.json").write_text(json.dumps({"held": held, "total": total}))


class OracleCompensationModule(CompensationModule):
    """Answers correctly exactly the questions whose number is a multiple of 3 (whatever the rank or the batch),
    so an accuracy computed over several processes can be compared with a one-process one."""

    def run_method(self, batch, name, prune_ratio):
        predictions, result, seconds = super().run_method(batch, name, prune_ratio)
        predictions = [answer if int(str(qid).rsplit("-", 1)[-1]) % 3 == 0 else "wrong"
                       for qid, answer in zip(batch["question_ids"], batch["answers"])]
        return predictions, result, seconds


class CountingSweep(PruningSweep):
    """A `PruningSweep` that appends the writing rank to `<dirpath>/writes.txt` each time it writes its files."""

    def _write(self, trainer) -> None:
        super()._write(trainer)
        with open(Path(self.dirpath) / "writes.txt", "a") as handle:
            handle.write(f"{trainer.global_rank}\n")


def tiny_experiment(run_dir: Path, base_dir: Path, max_steps: int = 6, **trainer) -> Path:
    """Write a tiny RCP experiment (the tiny base, 4 training batches per epoch, CSV logs under `run_dir`, a
    checkpoint every step, plug-in export at the end) and return its path."""
    from conftest import TINY_DATA_ARGS

    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "limit_val_batches": 1.0,
            "num_sanity_val_steps": 0, "val_check_interval": max_steps, "check_val_every_n_epoch": None,
            "log_every_n_steps": 1, "enable_model_summary": False, "default_root_dir": str(run_dir),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "logs", "version": "run"}},
            **trainer,
        },
        "checkpoint": {"every_n_train_steps": 1},
        "progress_bar": {"refresh_rate": 0},
        "model": {
            "class_path": "lightning_modules.compensation.CompensationModule",
            "init_args": {
                "base_model_path": str(base_dir), "learning_rate": 1e-3, "max_new_tokens": 2,
                "plugin_export_path": str(run_dir / "plugin.safetensors"),
                "compensation": {"class_path": "lvlm_prune.rcp.compensation.RCPCompensation",
                                 "init_args": {"target_prune_ratio": 0.75, "pruning_layers": [0, 1, 2],
                                               "repair_layers": [2, 3], "bottleneck": 16, "num_queries": 4,
                                               "context_dim": 16, "adapter_bottleneck": 8}},
            },
        },
        "data": {"class_path": "datamodules.synthetic.SyntheticVQADataModule",
                 "init_args": {"processor_path": str(base_dir), **TINY_DATA_ARGS}},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.with_name(run_dir.name + ".yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"),
               PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]), TOKENIZERS_PARALLELISM="false", **extra)
    for name in [k for k in env if k.startswith("SLURM_")]:
        if name not in extra:
            del env[name]
    return env


def launch(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python cli.py <args>` in its own process group (DDP/DeepSpeed ranks included), output captured."""
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for a launched run; on timeout kill its whole process group and fail with its output."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"cli.py did not finish within {timeout} s:\n{output[-4000:]}")
    return process.returncode, output


def run_cli(args: list[str], timeout: float = 120, env: dict[str, str] | None = None, expect_success: bool = True) -> str:
    code, output = finish(launch(args, env), timeout)
    if expect_success and code != 0:
        pytest.fail(f"cli.py {' '.join(args)} failed with {code}:\n{output[-4000:]}")
    return output


# TrainingMonitor's wall-clock measures: the only logged values two runs of the same steps do not share
SPEED_COLUMNS = ("train/seconds_per_step", "train/samples_per_second", "train/tokens_per_second")


def metric_rows(run_dir: Path, speed: bool = False) -> list[dict[str, str]]:
    """Rows of the CSV logger's metrics file, without Lightning's epoch column (a resumed run counts epochs
    differently when it resumes from an epoch's last batch) and, unless `speed`, without the training speed."""
    left_out = {"epoch"} | (set() if speed else set(SPEED_COLUMNS))
    with open(run_dir / "logs" / "run" / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k not in left_out} for row in csv.DictReader(handle)]


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory):
    """A second tiny base of the same shape and vocabulary as `tiny_base_dir`, with different random weights."""
    from conftest import save_tiny_base  # imported here: subprocess runs load this module without tests/ on the path

    return save_tiny_base(tmp_path_factory.mktemp("other_base"), seed=1)


@pytest.fixture
def one_thread():
    """In-process training on one thread (tests/conftest.py sets two): on a shared 2-core machine two threads
    fighting other processes run this tiny model tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
