"""`callbacks/resume.py` piece by piece, with stand-in trainers: the data order a resumed run continues (seeds,
shards, padding, epochs), the loaders it leaves alone, and where `--ckpt_path auto` looks for checkpoints."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler, WeightedRandomSampler

from callbacks.resume import (
    ResumableDataOrder,
    ResumableGroupedSampler,
    ResumableSampler,
    checkpoint_directory,
    resume_checkpoint,
)
from lvlm_prune.data import LengthGroupedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from test_ops_units import _AccumulatingModel, _Interrupted, _Numbers, _touch  # noqa: E402


def permutation(n: int, seed: int) -> list[int]:
    """The order `DistributedSampler` documents for one process: `randperm` seeded by seed + epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def data_order_trainer(limit=1.0, shards=None, datamodule=None):
    """What ResumableDataOrder reads of a trainer: its sampler shards, batch limit and datamodule."""
    return SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs=shards), limit_train_batches=limit,
                           datamodule=datamodule)


def order_of(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch]


def test_the_permutation_of_data_epoch_e_is_seeded_by_seed_plus_e():
    """Data epoch e reads DistributedSampler's documented order: randperm seeded by seed + e."""
    sampler = ResumableSampler(list(range(10)), num_replicas=1, rank=0, shuffle=True, seed=5)
    assert list(sampler) == permutation(10, 5)
    sampler.set_data_epoch(2)
    assert list(sampler) == permutation(10, 7)


def grouped_order(lengths, group_size, epoch=0):
    sampler = LengthGroupedSampler(lengths, group_size=group_size, seed=1, window_groups=2)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("samples, replicas", [(5, 2), (1, 3), (2, 5)])
def test_a_grouped_order_is_padded_with_its_first_indices_to_a_multiple_of_the_ranks(samples, replicas):
    """As Lightning's `DistributedSamplerWrapper`: every rank gets as many positions, the order repeated from its
    start (more than once when there are fewer samples than ranks)."""
    lengths = [3 * i % 7 for i in range(samples)]
    full = grouped_order(lengths, group_size=2)
    padded = (full * replicas)[: -(-samples // replicas) * replicas]
    for rank in range(replicas):
        sampler = ResumableGroupedSampler(LengthGroupedSampler(lengths, group_size=2, seed=1, window_groups=2),
                                          num_replicas=replicas, rank=rank)
        assert list(sampler) == padded[rank::replicas]


def test_a_grouped_shard_resumes_at_its_own_position():
    """start_index counts this rank's samples (batches done x batch size), not positions of the whole order."""
    lengths = [(5 * i) % 11 for i in range(24)]
    full = grouped_order(lengths, group_size=8, epoch=1)
    for rank in (0, 1):
        sampler = ResumableGroupedSampler(LengthGroupedSampler(lengths, group_size=8, seed=1, window_groups=2),
                                          num_replicas=2, rank=rank)
        sampler.set_data_epoch(1)
        sampler.start_index = 4
        assert list(sampler) == full[rank::2][4:]


class _Data:
    """A datamodule stand-in: its training loader as the data module builds it."""

    def __init__(self, loader):
        self.loader = loader

    def train_dataloader(self):
        return self.loader


def test_setup_wraps_the_training_loader_once_and_for_fit_only():
    """Only fit's loader is rebuilt, and a second setup does not wrap the rebuilt loader again."""
    data = _Data(DataLoader(list(range(16)), batch_size=4, shuffle=True))
    order = ResumableDataOrder(seed=0)
    original = data.train_dataloader
    order.setup(data_order_trainer(datamodule=data), None, "validate")
    assert data.train_dataloader == original
    trainer = data_order_trainer(datamodule=data)
    order.setup(trainer, None, "fit")
    order.setup(trainer, None, "fit")  # a second fit with the same datamodule and callback
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'leaves the training loader unchanged' about its own loader
        loader = data.train_dataloader()
    assert isinstance(loader.sampler, ResumableSampler) and order_of(loader) == permutation(16, 0)


@pytest.mark.parametrize("seed, global_seed, expected", [(None, "5", 5), (0, "5", 0), (3, None, 3), (None, None, 0)])
def test_the_seed_is_the_callback_s_else_the_run_s_seed_everything(seed, global_seed, expected, monkeypatch):
    """An explicit seed (0 included) wins; None takes PL_GLOBAL_SEED, else 0."""
    if global_seed is None:
        monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    else:
        monkeypatch.setenv("PL_GLOBAL_SEED", global_seed)
    loader = ResumableDataOrder(seed=seed).resumable(DataLoader(list(range(12)), batch_size=3, shuffle=True),
                                                     data_order_trainer())
    assert order_of(loader) == permutation(12, expected)


def test_each_rank_reads_its_own_shard_of_the_permutation():
    """Under DDP a rank reads positions rank, rank + W, ... of the shared permutation."""
    shards = {"num_replicas": 2, "rank": 1}
    loader = ResumableDataOrder(seed=4).resumable(DataLoader(list(range(20)), batch_size=5, shuffle=True),
                                                  data_order_trainer(shards=shards))
    assert order_of(loader) == permutation(20, 4)[1::2]


def test_an_unshuffled_loader_keeps_the_dataset_order_and_its_batching():
    """A sequential loader stays sequential; batch size, drop_last and collate_fn carry over."""
    loader = DataLoader(list(range(10)), batch_size=4, shuffle=False, drop_last=True, collate_fn=tuple)
    rebuilt = ResumableDataOrder(seed=0).resumable(loader, data_order_trainer())
    assert list(rebuilt) == [(0, 1, 2, 3), (4, 5, 6, 7)]  # the short last batch dropped, the collate_fn kept


def test_an_uninterrupted_run_reads_a_new_permutation_each_epoch():
    """The loader is built once per fit (Lightning does not rebuild it per epoch): the callback moves it on."""
    order = ResumableDataOrder(seed=2)
    trainer = data_order_trainer()
    loader = order.resumable(DataLoader(list(range(8)), batch_size=4, shuffle=True, drop_last=True), trainer)
    for epoch in range(3):
        order.on_train_epoch_start(trainer, None)
        assert order_of(loader) == permutation(8, 2 + epoch)
        for _ in range(2):
            order.on_train_batch_end(trainer, None, None, None, 0)
    assert order.state_dict() == {"epoch": 2, "batches_done": 2, "batch_size": 4, "num_replicas": 1}


def test_after_a_mid_epoch_resume_the_next_epoch_is_a_new_one():
    """Lightning calls no on_train_epoch_start for an epoch it resumes mid-way: the resumed epoch ends after its
    remaining batches, and the next one reads the next permutation."""
    order = ResumableDataOrder(seed=2)
    order.load_state_dict({"epoch": 0, "batches_done": 1})
    trainer = data_order_trainer()
    loader = order.resumable(DataLoader(list(range(8)), batch_size=4, shuffle=True, drop_last=True), trainer)
    assert order_of(loader) == permutation(8, 2)[4:]
    order.on_train_batch_end(trainer, None, None, None, 0)
    order.on_train_epoch_start(trainer, None)
    assert (order.epoch, order.batches_done) == (1, 0) and order_of(loader) == permutation(8, 3)


@pytest.mark.parametrize("recorded, warned", [
    ({}, False),  # a checkpoint of an older version records no layout
    ({"batch_size": 4, "num_replicas": 1}, False),
    ({"batch_size": 2, "num_replicas": 1}, True),
    ({"batch_size": 4, "num_replicas": 2}, True),
])
def test_a_mid_epoch_resume_with_another_batch_size_or_process_count_is_named(recorded, warned):
    order = ResumableDataOrder(seed=2)
    order.load_state_dict({"epoch": 0, "batches_done": 1, **recorded})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        order.resumable(DataLoader(list(range(8)), batch_size=4, shuffle=True), data_order_trainer())
    messages = [str(w.message) for w in caught if "middle of a data epoch" in str(w.message)]
    assert len(messages) == warned
    if warned:
        key = "batch_size (4; the checkpoint's run: 2)" if recorded["batch_size"] == 2 else \
            "num_replicas (1; the checkpoint's run: 2)"
        assert key in messages[0] and "epoch 0 skips 1 batches" in messages[0]
    # at an epoch boundary nothing is skipped, so nothing is said
    order = ResumableDataOrder(seed=2)
    order.load_state_dict({"epoch": 1, "batches_done": 0, "batch_size": 2, "num_replicas": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        order.resumable(DataLoader(list(range(8)), batch_size=4, shuffle=True), data_order_trainer())


def test_an_integer_batch_limit_above_the_epoch_ends_the_epoch_with_the_data():
    """limit_train_batches=100 on a 5-batch epoch: a checkpoint after 5 batches closed the epoch."""
    order = ResumableDataOrder(seed=0)
    order.load_state_dict({"epoch": 0, "batches_done": 5})  # all 5 batches of 40 samples in batches of 8
    loader = order.resumable(DataLoader(list(range(40)), batch_size=8, shuffle=True, drop_last=True),
                             data_order_trainer(limit=100))
    assert (order.epoch, order.batches_done, loader.sampler.start_index) == (1, 0, 0)


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(range(6))


class _Pairs(BatchSampler):
    pass


@pytest.mark.parametrize("make, reason", [
    (lambda: [[0, 1], [2, 3]], "not a DataLoader but list"),
    (lambda: DataLoader(_Stream(), batch_size=2), "iterable dataset"),
    (lambda: DataLoader(list(range(6)), batch_sampler=_Pairs(SequentialSampler(range(6)), 2, False)),
     "custom batch sampler"),
    (lambda: DataLoader(list(range(6)), batch_size=2, sampler=WeightedRandomSampler([1.0] * 6, 6)),
     "custom sampler WeightedRandomSampler"),
])
def test_a_loader_it_cannot_rebuild_is_left_unchanged_with_a_warning(make, reason):
    """Loaders whose order it cannot reproduce are returned as they are, with the reason named."""
    loader = make()
    with pytest.warns(UserWarning, match=rf"leaves the training loader unchanged \({reason}\)"):
        assert ResumableDataOrder(seed=0).resumable(loader, data_order_trainer()) is loader


def test_a_resume_at_step_one_does_not_save_again_inside_an_accumulation_window(tmp_path):
    """As the step-2 case in tests/ops/test_ops_units.py, with a checkpoint every step: resumed at step 1 and
    stopped after the first micro-batch of the next window, last.ckpt must stay the step-1 one."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(stop_after, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(default_root_dir=tmp_path, max_steps=4, accumulate_grad_batches=2, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[ResumableDataOrder(), ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1,
                                                                             save_top_k=0, save_last=True)])
        with pytest.raises(_Interrupted):
            trainer.fit(_AccumulatingModel(stop_after), datamodule=_Numbers(), ckpt_path=ckpt_path)

    def saved():
        checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
        return checkpoint["global_step"], checkpoint["callbacks"]["ResumableDataOrder"]["batches_done"]

    fit(stop_after=3)  # last.ckpt at step 1, after 2 batches
    assert saved() == (1, 2)
    fit(stop_after=1, ckpt_path=tmp_path / "last.ckpt")
    assert saved() == (1, 2)


def _trainer_for_checkpoints(root, dirpath=None):
    logger = SimpleNamespace(save_dir=str(root), name="logs", version="run")
    return SimpleNamespace(default_root_dir=str(root), loggers=[logger],
                           checkpoint_callbacks=[SimpleNamespace(dirpath=dirpath)])


def test_a_run_directory_that_does_not_exist_yet_has_no_checkpoint(tmp_path):
    """A first launch (no run directory yet) resumes from nothing instead of failing."""
    assert resume_checkpoint(_trainer_for_checkpoints(tmp_path / "not_yet")) is None


def test_a_versioned_last_checkpoint_is_a_candidate(tmp_path):
    """last-v<n>.ckpt counts as a last checkpoint; a top-k checkpoint does not."""
    directory = tmp_path / "logs" / "run" / "checkpoints"
    _touch(directory / "last.ckpt", 1000)
    _touch(directory / "last-v1.ckpt", 2000)
    _touch(directory / "epoch=0-step=4.ckpt", 3000)  # a top-k checkpoint is not what a restart continues
    assert resume_checkpoint(_trainer_for_checkpoints(tmp_path)) == str(directory / "last-v1.ckpt")


def test_the_previous_deepspeed_checkpoint_counts_only_when_the_one_that_replaced_it_is_missing(tmp_path):
    """`.last.ckpt.previous` is a fallback, never a rival of the last.ckpt that replaced it."""
    _touch(tmp_path / "ds" / "last.ckpt", 1000, directory=True)
    # the new save's rename finished, the old one is not removed yet: last.ckpt wins whatever the time stamps say
    _touch(tmp_path / "ds" / ".last.ckpt.previous", 2000, directory=True)
    trainer = _trainer_for_checkpoints(tmp_path, dirpath=str(tmp_path / "ds"))
    assert resume_checkpoint(trainer) == str(tmp_path / "ds" / "last.ckpt")


def test_a_deepspeed_checkpoint_is_as_new_as_its_latest_file(tmp_path):
    """The directory's own time stamp moves whenever a file is added to or removed from it: the `latest` file
    dates the save."""
    _touch(tmp_path / "ds" / "last.ckpt", 1000, directory=True)
    _touch(tmp_path / "hpc_ckpt_2.ckpt", 2000)
    trainer = _trainer_for_checkpoints(tmp_path, dirpath=str(tmp_path / "ds"))
    os.utime(tmp_path / "ds" / "last.ckpt", (5000, 5000))
    assert resume_checkpoint(trainer) == str(tmp_path / "hpc_ckpt_2.ckpt")


def test_the_checkpoint_directory_is_resolved_as_lightning_resolves_it(tmp_path):
    """dirpath, else the first logger's <save_dir or root>/<name>/<version_N or version>/checkpoints, else
    <root>/checkpoints."""
    def logger(save_dir, version):
        return SimpleNamespace(save_dir=save_dir, name="lvlm", version=version)

    callback = SimpleNamespace(dirpath=None)
    root = str(tmp_path / "root")

    def resolved(*loggers):
        return checkpoint_directory(SimpleNamespace(default_root_dir=root, loggers=list(loggers)), callback)

    assert resolved(logger(str(tmp_path / "logs"), 3)) == str(tmp_path / "logs" / "lvlm" / "version_3" / "checkpoints")
    assert resolved(logger(None, "run")) == os.path.join(root, "lvlm", "run", "checkpoints")
    assert resolved(logger("first", "a"), logger("second", "b")) == os.path.join("first", "lvlm", "a", "checkpoints")
    assert resolved() == os.path.join(root, "checkpoints")
    callback.dirpath = str(tmp_path / "mine")
    assert resolved(logger("first", "a")) == str(tmp_path / "mine")
