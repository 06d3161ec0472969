"""TrainingMonitor: the learning rates and the training speed in the logs, every log_every_n_steps optimizer steps,
validation time left out, accumulation windows counted as one step."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callbacks import training_monitor
from callbacks.training_monitor import TrainingMonitor, batch_samples, batch_tokens

BATCH = 4
LENGTH = 6  # real tokens per example; one padding position each


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Batches(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.full((2,), float(i))


def collate(rows):
    mask = torch.ones(len(rows), LENGTH + 1, dtype=torch.long)
    mask[:, -1] = 0
    return {"x": torch.stack(rows), "question_ids": list(range(len(rows))), "attention_mask": mask}


class Tiny(L.LightningModule):
    def __init__(self, clock):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.clock = clock

    def training_step(self, batch, batch_idx):
        self.clock.now += 1.0  # one second per training batch
        return self.layer(batch["x"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.clock.now += 100.0  # validation must not count

    def configure_optimizers(self):
        optimizer = torch.optim.SGD([{"params": [self.layer.weight], "lr": 0.1},
                                     {"params": [self.layer.bias], "lr": 0.05}])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        return torch.utils.data.DataLoader(Batches(), batch_size=BATCH, collate_fn=collate)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(Batches(), batch_size=BATCH, collate_fn=collate)


def logged_rows(tmp_path, monkeypatch, monitor=None, **trainer_args):
    clock = FakeClock()
    monkeypatch.setattr(training_monitor.time, "perf_counter", clock)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path, name="run", version=0),
                        callbacks=[monitor or TrainingMonitor()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, **trainer_args)
    trainer.fit(Tiny(clock))
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_learning_rates_and_speed_every_log_interval_without_validation_time(tmp_path, monkeypatch):
    rows = logged_rows(tmp_path, monkeypatch, max_steps=6, log_every_n_steps=2, val_check_interval=3,
                       limit_val_batches=2)
    rows = [r for r in rows if "train/seconds_per_step" in r]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # global steps 2, 4, 6 (Lightning's rows count from 0)
    for row, step in zip(rows, (2, 4, 6)):
        # the learning rate the logged step used (the scheduler had stepped step - 1 times), each group its own
        assert float(row["train/lr/group0"]) == pytest.approx(0.1 / step)
        assert float(row["train/lr/group1"]) == pytest.approx(0.05 / step)
        assert float(row["train/seconds_per_step"]) == pytest.approx(1.0)
        assert float(row["train/samples_per_second"]) == pytest.approx(BATCH)
        assert float(row["train/tokens_per_second"]) == pytest.approx(BATCH * LENGTH)


def test_an_accumulation_window_is_one_step(tmp_path, monkeypatch):
    rows = logged_rows(tmp_path, monkeypatch, max_steps=4, log_every_n_steps=2, accumulate_grad_batches=2,
                       limit_val_batches=0)
    rows = [r for r in rows if "train/seconds_per_step" in r]
    assert len(rows) == 2
    for row in rows:
        assert float(row["train/seconds_per_step"]) == pytest.approx(2.0)
        assert float(row["train/samples_per_second"]) == pytest.approx(BATCH)
        assert float(row["train/lr/group0"]) > 0


@pytest.mark.parametrize("learning_rate", [True, False])
def test_settings_turn_each_part_off(tmp_path, monkeypatch, learning_rate):
    monitor = TrainingMonitor(learning_rate=learning_rate, speed=not learning_rate, grad_norm=not learning_rate)
    rows = logged_rows(tmp_path, monkeypatch, monitor, max_steps=2, log_every_n_steps=1, limit_val_batches=0)
    columns = {k for row in rows for k in row}
    assert ("train/lr/group0" in columns) == learning_rate
    assert ("train/samples_per_second" in columns) == ("train/grad_norm" in columns) == (not learning_rate)


def test_groups_sharing_a_rate_log_one_and_several_optimizers_are_named():
    def parameter():
        return torch.nn.Parameter(torch.zeros(1))

    class Trainer:
        optimizers = [torch.optim.SGD([{"params": [parameter()], "weight_decay": 0.1},
                                       {"params": [parameter()], "weight_decay": 0.0}], lr=0.3)]

    assert TrainingMonitor.learning_rates(Trainer()) == {"train/lr": 0.3}
    Trainer.optimizers = Trainer.optimizers * 2
    assert TrainingMonitor.learning_rates(Trainer()) == {"train/lr/optimizer0": 0.3, "train/lr/optimizer1": 0.3}
    Trainer.optimizers = [torch.optim.SGD([{"params": [parameter()], "lr": 0.1, "name": "adapter"},
                                           {"params": [parameter()], "lr": 0.2}], lr=0.3)]
    assert TrainingMonitor.learning_rates(Trainer()) == {"train/lr/adapter": 0.1, "train/lr/group1": 0.2}


def test_batch_counts_read_question_ids_and_the_collators_token_count():
    packed = {"question_ids": ["a", "b", "c"], "input_ids": torch.zeros(1, 8), "num_tokens": 7,
              "attention_mask": torch.ones(1, 1, 8, 8, dtype=torch.bool)}
    assert batch_samples(packed) == 3 and batch_tokens(packed) == 7
    padded = {"input_ids": torch.zeros(2, 3), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    assert batch_samples(padded) == 2 and batch_tokens(padded) == 5
    assert batch_samples([1, 2]) == 0 and batch_tokens([1, 2]) == 0


def test_the_cli_logs_them_for_the_bases_packed_batches(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cli import cli_main
    from test_cli import TINY_BASE_ARGS, run_dir_args

    cli = cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                    "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0"])
    assert cli.datamodule.hparams.pack_length is not None  # the stage's batches are packed rows
    events = EventAccumulator(str(tmp_path / "base_describe" / "run"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert len(scalars["train/lr"]) == len(scalars["train/samples_per_second"]) == 2
    assert all(v > 0 for v in scalars["train/samples_per_second"] + scalars["train/seconds_per_step"])
    # more tokens per example than its 16 visual ones, fewer than a packed row holds
    per_example = [t / s for t, s in zip(scalars["train/tokens_per_second"], scalars["train/samples_per_second"])]
    assert all(16 < n < cli.datamodule.hparams.pack_length for n in per_example)


class KnownGradient(Tiny):
    """Loss (s + 1) ((3, 4) . w + 12 v) at step s: that step's gradient has norm 13 (s + 1), over two parameters."""

    def __init__(self, clock):
        super().__init__(clock)
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.other = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        self.clock.now += 1.0
        linear = (self.weight * torch.tensor([3.0, 4.0])).sum() + 12.0 * self.other.sum()
        return (self.global_step + 1) * linear + 0.0 * self.layer(batch["x"]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_gradient_norm_is_the_logged_steps_before_clipping(tmp_path, monkeypatch, accumulate):
    clock = FakeClock()
    monkeypatch.setattr(training_monitor.time, "perf_counter", clock)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path, name="run", version=0),
                        callbacks=[TrainingMonitor()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_steps=4, log_every_n_steps=2, limit_val_batches=0,
                        gradient_clip_val=0.5, accumulate_grad_batches=accumulate)
    trainer.fit(KnownGradient(clock))
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        norms = [float(row["train/grad_norm"]) for row in csv.DictReader(f) if row.get("train/grad_norm")]
    # logged after steps 2 and 4, which ran at s = 1 and 3; Lightning divides each micro-batch's loss by the
    # window's length, so a window's gradient is one micro-batch's
    assert norms == [pytest.approx(26.0), pytest.approx(52.0)]


class SkipsStepOne(KnownGradient):
    """Runs the closure but no optimizer step at step 1, as the compensation module does for a non-finite loss."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.global_step == 1:
            optimizer_closure()
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


def test_a_skipped_step_logs_a_nan_gradient_norm_not_the_last_one(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(training_monitor.time, "perf_counter", clock)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path, name="run", version=0),
                        callbacks=[TrainingMonitor()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_steps=3, log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(SkipsStepOne(clock))
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        norms = [float(row["train/grad_norm"]) for row in csv.DictReader(f) if row.get("train/grad_norm")]
    assert len(norms) == 3 and math.isnan(norms[1])
    assert norms[0] == pytest.approx(13.0) and norms[2] == pytest.approx(39.0)
