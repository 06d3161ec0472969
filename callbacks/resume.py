"""Exact, automatic resumption: a training data order that continues mid-epoch, and `--ckpt_path auto`."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from lvlm_prune.data import LengthGroupedSampler


class ResumableSampler(DistributedSampler):
    """A `DistributedSampler` (permutation seeded by `seed + epoch`, one shard per rank) that can start its next
    epoch at `start_index`, so a run resumed mid-epoch sees exactly the samples it had not seen yet.

    Args:
        dataset: the map-style dataset.
        num_replicas: processes that share the data.
        rank: this process's shard.
        shuffle: permute (training) or keep the dataset order.
        seed: permutation seed (the same on every rank).
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        """Ignored: Lightning calls it with its own epoch count, which after a resume from an epoch's last batch
        runs one ahead of the data epoch; `ResumableDataOrder` sets the epoch through `set_data_epoch`."""

    def set_data_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)

    def __iter__(self):
        indices = list(super().__iter__())
        start, self.start_index = self.start_index, 0
        return iter(indices[start:])


class ResumableGroupedSampler(DistributedSampler):
    """A `LengthGroupedSampler`'s order for the epoch, dealt over ranks as Lightning's `DistributedSamplerWrapper`
    deals a custom sampler (positions r, r + W, ...; the order padded with its first indices to a multiple of W),
    that can start its next epoch at `start_index`. A `DistributedSampler`, so Lightning does not shard it again.

    Args:
        grouped: the data module's sampler (its seed and group size fix the order per epoch).
        num_replicas: processes that share the data.
        rank: this process's shard.
    """

    def __init__(self, grouped: LengthGroupedSampler, num_replicas: int, rank: int):
        super().__init__(range(len(grouped)), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.grouped = grouped
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        """Ignored, as `ResumableSampler.set_epoch`: the data epoch comes from `set_data_epoch`."""

    def set_data_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.grouped.set_epoch(epoch)

    def __iter__(self):
        order = [index for group in self.grouped.groups() for index in group]
        while order and len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        start, self.start_index = self.start_index, 0
        return iter(order[self.rank : self.total_size : self.num_replicas][start:])


class _ResumableDataLoader(DataLoader):
    """Marks the loader as resumable for Lightning (no 'dataloader is not resumable' warning on a mid-epoch
    resume); the position itself is `ResumableDataOrder`'s checkpointed state."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class ResumableDataOrder(L.Callback):
    """Makes the training batches a function of (seed, epoch, position) and resumes them mid-epoch.

    The datamodule's training DataLoader is rebuilt around a `ResumableSampler`; the callback's checkpointed
    state (data epoch, batches consumed) tells a resumed run where to start. The data epoch and the batches are
    counted here, not taken from Lightning, whose epoch counter skips one when a run resumes from a checkpoint
    written at the last batch of an epoch (and which, after such a resume, treats a later mid-epoch resume as a new
    epoch); the samplers ignore Lightning's `set_epoch`. Used with the compensation module's
    per-step random seed, a run killed between checkpoints and resumed from its last one ends with the same
    weights as an uninterrupted run. A length-grouped loader (`LengthGroupedSampler`) keeps its grouped order
    (`ResumableGroupedSampler`). Loaders it cannot rebuild (iterable datasets, other custom samplers or batch
    samplers) are left unchanged with a warning.

    Args:
        seed: permutation seed; None takes the run's `seed_everything` value.
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self.epoch = 0
        self.batches_done = 0
        self._sampler: ResumableSampler | ResumableGroupedSampler | None = None
        self._continuing = False  # the next epoch start continues a resumed epoch
        # per-process batch size and process count of the loader in use, and those a loaded checkpoint recorded
        self._layout: dict[str, int] = {}
        self._restored_layout: dict[str, int] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage != "fit" or datamodule is None or getattr(datamodule.train_dataloader, "resumable", False):
            return
        make_loader = datamodule.train_dataloader

        def train_dataloader() -> Any:
            return self.resumable(make_loader(), trainer)

        train_dataloader.resumable = True  # type: ignore[attr-defined]
        datamodule.train_dataloader = train_dataloader

    def resumable(self, loader: Any, trainer: L.Trainer) -> Any:
        """`loader` rebuilt around a `ResumableSampler` positioned for the current epoch."""
        reason = _not_rebuildable(loader)
        if reason:
            rank_zero_warn(f"ResumableDataOrder leaves the training loader unchanged ({reason}): a run resumed "
                           "mid-epoch will not see exactly the batches an uninterrupted run sees")
            return loader
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        shards = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        replicas, rank = shards.get("num_replicas", 1), shards.get("rank", 0)
        if isinstance(loader.sampler, LengthGroupedSampler):  # its own seed fixes the grouped order
            sampler: DistributedSampler = ResumableGroupedSampler(loader.sampler, replicas, rank)
        else:
            sampler = ResumableSampler(loader.dataset, num_replicas=replicas, rank=rank,
                                       shuffle=not isinstance(loader.sampler, SequentialSampler), seed=seed)
        if self.batches_done >= _batches_per_epoch(trainer, len(sampler), loader):
            # the checkpoint was written at an epoch's last batch: what comes next is the next data epoch, whether
            # or not Lightning calls on_train_epoch_start for it
            self.epoch, self.batches_done = self.epoch + 1, 0
        # a run resumed mid-epoch continues that epoch, even where Lightning's restart logic calls
        # on_train_epoch_start for it (it does after an earlier resume from an epoch's end)
        self._continuing = self.batches_done > 0
        self._layout = {"batch_size": int(loader.batch_size), "num_replicas": int(replicas)}
        changed = {key: (self._restored_layout[key], value) for key, value in self._layout.items()
                   if key in self._restored_layout and self._restored_layout[key] != value}
        if self._continuing and changed:
            rank_zero_warn("ResumableDataOrder: resumed in the middle of a data epoch with another "
                           + " and ".join(f"{key} ({new}; the checkpoint's run: {old})" for key, (old, new) in
                                          changed.items())
                           + f": the rest of epoch {self.epoch} skips {self.batches_done} batches of the new size "
                           "and shards, so it does not see exactly the samples the interrupted run had left; "
                           "later epochs are complete")
        sampler.set_data_epoch(self.epoch)
        sampler.start_index = self.batches_done * loader.batch_size
        self._sampler = sampler
        return _ResumableDataLoader(
            loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
            timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
            prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint does not checkpoint the step it last saved at: resumed at a step it saves at, it would save
        # again after the first micro-batch of an accumulation window (the step has not moved yet), a checkpoint
        # whose data position is inside the window and whose summed gradients are lost
        if trainer.global_step > 0:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    callback._last_global_step_saved = trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before the epoch's iterator is made
        if self._continuing:
            self._continuing = False
        elif self.batches_done > 0:
            self.epoch, self.batches_done = self.epoch + 1, 0
        if self._sampler is not None:
            self._sampler.set_data_epoch(self.epoch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Counted here, not taken from batch_idx, which restarts at 0 when Lightning treats a resumed epoch as a
        # new one. Lightning runs ModelCheckpoint's hooks after every other callback's, so a checkpoint written at
        # this batch already counts it.
        self.batches_done += 1
        self._continuing = False

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, **self._layout}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch, self.batches_done = int(state_dict["epoch"]), int(state_dict["batches_done"])
        self._restored_layout = {key: int(state_dict[key]) for key in ("batch_size", "num_replicas")
                                 if key in state_dict}


def _batches_per_epoch(trainer: L.Trainer, samples: int, loader: DataLoader) -> int:
    """Training batches in one epoch of this rank: its share of the samples, cut by `limit_train_batches`."""
    full = samples // loader.batch_size if loader.drop_last else -(-samples // loader.batch_size)
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        return min(full, limit)
    return full if limit >= 1.0 else int(full * limit)


def _not_rebuildable(loader: Any) -> str | None:
    if not isinstance(loader, DataLoader):
        return f"not a DataLoader but {type(loader).__name__}"
    if isinstance(loader.dataset, IterableDataset):
        return "iterable dataset"
    if type(loader.batch_sampler) is not BatchSampler or loader.batch_size is None:
        return "custom batch sampler"
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler, LengthGroupedSampler)):
        return f"custom sampler {type(loader.sampler).__name__}"
    return None


# What a killed requeue save leaves in the run directory: the DeepSpeed strategy's staging directory
# (`.hpc_ckpt_<n>.ckpt.saving`, `CPUDeepSpeedStrategy.save_checkpoint`) or `AtomicCheckpointIO`'s temporary file
# (`.hpc_ckpt_<n>.ckpt.<pid>.tmp`).
REQUEUE_STAGING = re.compile(r"\.hpc_ckpt_\d+\.ckpt\.(saving|\d+\.tmp)")


def remove_requeue_staging(directory: str | Path) -> None:
    """Removes the staging of killed requeue saves from `directory`. Fit under SLURM without a checkpoint resumes
    from `hpc_ckpt_<n>.ckpt`, n made of the digits of every name in the run directory that contains `hpc_ckpt_`
    (Lightning's `_hpc_resume_path`): a leftover made every later launch look for a checkpoint that does not exist."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if not REQUEUE_STAGING.fullmatch(path.name):
            continue
        rank_zero_warn(f"--ckpt_path auto: removing {str(path)!r}, left by a requeue checkpoint save that was killed")
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # every rank of the node may be removing it
        else:
            path.unlink(missing_ok=True)


def resume_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint a restarted run of this configuration should resume from, or None.

    Candidates: Lightning's SLURM requeue checkpoint (`<default_root_dir>/hpc_ckpt_<n>.ckpt`, written on the
    requeue signal) and `last*.ckpt` of every `ModelCheckpoint` (a file, or a DeepSpeed directory; its
    `.last*.ckpt.previous` when a save was killed between the two renames that replace it). The run directory must be
    stable across launches: a fixed logger `version` or a `checkpoint.dirpath`. The staging of killed requeue saves
    is removed first (`remove_requeue_staging`).
    """
    remove_requeue_staging(trainer.default_root_dir)
    candidates = list(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
    for callback in trainer.checkpoint_callbacks:
        directory = Path(checkpoint_directory(trainer, callback))
        if directory.is_dir():
            # a killed save's temporary file (AtomicCheckpointIO), which no later save would replace (its name
            # holds the process id): a base model's is gigabytes
            for leftover in [p for p in directory.iterdir() if re.fullmatch(r"\..+\.ckpt\.\d+\.tmp", p.name)]:
                rank_zero_warn(f"--ckpt_path auto: removing {str(leftover)!r}, left by a checkpoint save that was killed")
                leftover.unlink(missing_ok=True)
            candidates += [p for p in directory.iterdir() if re.fullmatch(r"last(-v\d+)?\.ckpt", p.name)]
            # a DeepSpeed save killed between its two renames left the previous checkpoint beside the missing one
            candidates += [p for p in directory.iterdir() if re.fullmatch(r"\.last(-v\d+)?\.ckpt\.previous", p.name)
                           and not (directory / p.name[1:-len(".previous")]).exists()]
    candidates = [p for p in candidates if p.is_file() or (p / "latest").is_file()]  # a DeepSpeed dir is complete
    if not candidates:
        return None
    # Every rank resolves this itself (there is no process group yet), so a tie in modification time (filesystems
    # with one-second stamps) must not fall to the order a node lists a directory in: the requeue checkpoint wins it
    # (written on the signal, the run's last act), then the name decides.
    def newest(path: Path) -> tuple[int, bool, str]:
        stamp = (path / "latest" if path.is_dir() else path).stat().st_mtime_ns
        return stamp, path.name.startswith("hpc_ckpt_"), str(path)

    return str(max(candidates, key=newest))


def checkpoint_directory(trainer: L.Trainer, callback: Any) -> str:
    """Where a `ModelCheckpoint` writes, resolved as Lightning does at setup (dirpath, else the first logger's
    `<save_dir>/<name>/<version>/checkpoints`, else `<default_root_dir>/checkpoints`)."""
    if getattr(callback, "dirpath", None):
        return str(callback.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version, "checkpoints")
    return os.path.join(trainer.default_root_dir, "checkpoints")
