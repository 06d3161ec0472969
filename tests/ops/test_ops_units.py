"""Pieces of the operations support, one at a time: atomic checkpoint files, the resumable sampler, the choice
of the checkpoint to resume from, the DeepSpeed strategy's guards, generation cut after EOS, OOM advice."""

import os
import signal
import subprocess
import sys
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import SumMetric

from callbacks.resume import ResumableDataOrder, ResumableGroupedSampler, ResumableSampler, resume_checkpoint
from lightning_modules.common import EVALUATION_MEMORY_SETTINGS, out_of_memory_advice, pad_after_eos
from lightning_modules.strategies import AtomicCheckpointIO, CPUDeepSpeedStrategy, _convert_module_keeping_metric_states
from lvlm_prune.data import LengthGroupedSampler
from ops_helpers import ROOT, one_thread, tiny_experiment  # noqa: F401 (a fixture)


def test_atomic_save_failing_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(10)}, path)

    def crash_after_some_bytes(obj, handle):
        handle.write(b"partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_after_some_bytes)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(10)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no staging file left behind


def test_atomic_save_killed_while_writing_leaves_a_whole_checkpoint(tmp_path):
    """A saving process killed halfway through writing a checkpoint: the child saves steps 0 and 1, then writes half
    of step 2's bytes into the staging file, reports it and blocks (it never finishes that save); the parent kills it
    there."""
    path = tmp_path / "last.ckpt"
    script = (
        "import io, sys, torch\n"
        "from lightning_modules.strategies import AtomicCheckpointIO\n"
        "checkpoint_io, real_save = AtomicCheckpointIO(), torch.save\n"
        "def state(step):\n"
        "    return {'step': step, 'w': torch.full((200_000,), float(step))}\n"
        "for step in (0, 1):\n"
        "    checkpoint_io.save_checkpoint(state(step), sys.argv[1])\n"
        "def half_then_block(obj, handle):\n"
        "    buffer = io.BytesIO()\n"
        "    real_save(obj, buffer)\n"
        "    data = buffer.getvalue()\n"
        "    handle.write(data[: len(data) // 2])\n"
        "    handle.flush()\n"
        "    print(len(data) // 2, flush=True)\n"
        "    sys.stdin.readline()  # blocks: the parent kills this process here\n"
        "    handle.write(data[len(data) // 2:])\n"
        "torch.save = half_then_block\n"
        "checkpoint_io.save_checkpoint(state(2), sys.argv[1])\n"
        "print('finished', flush=True)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    try:
        written = child.stdout.readline()  # returns once the child is blocked mid-write (or has died)
        assert written.strip().isdigit(), f"the saving process died before step 2's write: {written!r}"
        (staging,) = tmp_path.glob(".last.ckpt.*.tmp")
        assert staging.stat().st_size == int(written)  # half of step 2 is on disk, beside the target
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.stdin.close()
        child.stdout.close()
    # the interrupted staging file is a truncated archive ...
    with pytest.raises(RuntimeError, match="PytorchStreamReader failed reading zip archive"):
        torch.load(staging, weights_only=True)
    checkpoint = torch.load(path, weights_only=True)  # ... and the target is the previous save, whole
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["w"], torch.full((200_000,), 1.0))


def test_resumable_sampler_is_seeded_per_epoch_and_starts_where_asked():
    data = list(range(20))
    first = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7)
    second = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7)
    epoch0 = list(first)
    assert sorted(epoch0) == data and epoch0 == list(second)
    first.set_epoch(1)  # Lightning's call: its epoch count can run ahead of the data epoch
    assert list(first) == epoch0
    first.set_data_epoch(1)
    assert list(first) != epoch0
    second.set_data_epoch(1)
    second.start_index = 12
    assert list(second) == list(first)[12:]
    assert len(list(second)) == 20, "start_index applies to one epoch only"
    shards = [list(ResumableSampler(data, num_replicas=2, rank=r, shuffle=True, seed=7)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == data


def test_length_grouped_order_is_kept_sharded_and_resumable():
    lengths = [(7 * i) % 23 for i in range(40)]

    def grouped():
        return LengthGroupedSampler(lengths, group_size=8, seed=3, window_groups=2)

    reference = grouped()
    reference.set_epoch(1)
    full = list(reference)
    one = ResumableGroupedSampler(grouped(), num_replicas=1, rank=0)
    one.set_epoch(2)  # Lightning's call: ignored
    one.set_data_epoch(1)
    assert list(one) == full
    one.start_index = 13
    assert list(one) == full[13:] and list(one) == full, "start_index applies to one epoch only"
    shards = []
    for rank in (0, 1):  # groups of 8 = batch 4 x 2 ranks: each rank's k-th batch comes from the k-th group
        sampler = ResumableGroupedSampler(grouped(), num_replicas=2, rank=rank)
        sampler.set_data_epoch(1)
        shards.append(list(sampler))
        assert shards[-1] == full[rank::2] and len(sampler) == 20
    assert sorted(shards[0] + shards[1]) == list(range(40))

    loader = DataLoader(list(range(40)), batch_size=8, sampler=grouped())
    trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs=None), limit_train_batches=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'leaves the training loader unchanged'
        rebuilt = ResumableDataOrder(seed=0).resumable(loader, trainer)
    assert isinstance(rebuilt.sampler, ResumableGroupedSampler)


@pytest.mark.parametrize("limit, done, expected", [
    (1.0, 5, (1, 0, 0)),  # the checkpoint closed epoch 0 (5 batches of 8): the next data epoch from its start
    (1.0, 2, (0, 2, 16)),  # mid-epoch: the rest of epoch 0
    (2, 2, (1, 0, 0)),  # limit_train_batches=2 ends the epoch after 2 batches
    (0.5, 2, (1, 0, 0)),
])
def test_a_resumed_data_order_starts_where_the_checkpoint_left_off(limit, done, expected):
    order = ResumableDataOrder(seed=0)
    order.load_state_dict({"epoch": 0, "batches_done": done})
    trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs=None), limit_train_batches=limit)
    loader = order.resumable(DataLoader(list(range(40)), batch_size=8, shuffle=True, drop_last=True), trainer)
    assert (order.epoch, order.batches_done, loader.sampler.start_index) == expected
    # Lightning may call on_train_epoch_start for a resumed epoch (after an earlier resume from an epoch's end):
    # a mid-epoch resume still continues its epoch
    order.on_train_epoch_start(trainer, None)
    assert order.epoch == expected[0]


@pytest.mark.parametrize("drop_last, expected", [(True, (1, 0, 0)), (False, (0, 5, 40))])
def test_an_epoch_s_batch_count_follows_drop_last(drop_last, expected):
    # 42 samples in batches of 8: five batches when the last two samples are dropped, six when they form a short one
    order = ResumableDataOrder(seed=0)
    order.load_state_dict({"epoch": 0, "batches_done": 5})
    trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs=None), limit_train_batches=1.0)
    loader = order.resumable(DataLoader(list(range(42)), batch_size=8, shuffle=True, drop_last=drop_last), trainer)
    assert (order.epoch, order.batches_done, loader.sampler.start_index) == expected


def _touch(path, mtime, directory=False):
    if directory:
        path.mkdir(parents=True)
        (path / "latest").write_text("checkpoint")
        os.utime(path / "latest", (mtime, mtime))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))


def test_resume_checkpoint_picks_the_newest_of_requeue_and_last(tmp_path):
    logger = SimpleNamespace(save_dir=str(tmp_path), name="logs", version="run")
    callback = SimpleNamespace(dirpath=None)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), loggers=[logger], checkpoint_callbacks=[callback])
    assert resume_checkpoint(trainer) is None
    last = tmp_path / "logs" / "run" / "checkpoints" / "last.ckpt"
    _touch(last, 1000)
    killed_save = last.with_name(".last.ckpt.4242.tmp")  # AtomicCheckpointIO's, from a killed process
    _touch(killed_save, 5000)
    with pytest.warns(UserWarning, match=r"removing .*\.last\.ckpt\.4242\.tmp.*killed"):
        assert resume_checkpoint(trainer) == str(last)
    assert not killed_save.exists()
    _touch(tmp_path / "hpc_ckpt_1.ckpt", 2000)
    assert resume_checkpoint(trainer) == str(tmp_path / "hpc_ckpt_1.ckpt")
    _touch(last, 2000)  # a tie (one-second time stamps): the requeue checkpoint, whatever the listing order
    assert resume_checkpoint(trainer) == str(tmp_path / "hpc_ckpt_1.ckpt")
    _touch(last, 3000)
    assert resume_checkpoint(trainer) == str(last)
    deepspeed_dir = tmp_path / "ds" / "last.ckpt"
    _touch(deepspeed_dir, 4000, directory=True)
    (tmp_path / "ds" / "last-v1.ckpt").mkdir()  # no `latest` file: an unfinished DeepSpeed save
    callback.dirpath = str(tmp_path / "ds")
    assert resume_checkpoint(trainer) == str(deepspeed_dir)
    # a DeepSpeed save killed between its two renames: last.ckpt is gone, the one before sits beside it
    previous = tmp_path / "ds" / ".last.ckpt.previous"
    deepspeed_dir.rename(previous)
    assert resume_checkpoint(trainer) == str(previous)


def test_auto_resume_removes_killed_requeue_saves_that_lightning_would_resume_from(tmp_path, monkeypatch):
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
    from lightning.pytorch.trainer.states import TrainerFn

    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "lvlm-prune")
    logger = SimpleNamespace(save_dir=str(tmp_path), name="logs", version="run")
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), loggers=[logger], checkpoint_callbacks=[],
                              callbacks=[], state=SimpleNamespace(fn=TrainerFn.FITTING))
    # the staging of a killed requeue save: DeepSpeed's directory, AtomicCheckpointIO's file
    (tmp_path / ".hpc_ckpt_1.ckpt.saving" / "checkpoint").mkdir(parents=True)
    (tmp_path / ".hpc_ckpt_1.ckpt.saving" / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (tmp_path / ".hpc_ckpt_2.ckpt.4242.tmp").write_bytes(b"partial")
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.warns(UserWarning, match="left by a requeue checkpoint save that was killed"):
        assert resume_checkpoint(trainer) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    # --ckpt_path auto passes None on: Lightning under SLURM then looks for hpc_ckpt_<n>.ckpt itself
    assert _CheckpointConnector(trainer)._parse_ckpt_path(TrainerFn.FITTING, None, True, True) is None
    _touch(tmp_path / "hpc_ckpt_1.ckpt", 1000)
    assert resume_checkpoint(trainer) == str(tmp_path / "hpc_ckpt_1.ckpt")


def test_plugin_export_writes_the_fp32_master_under_every_name_of_a_tied_weight(tmp_path):
    # GPT-2's lm_head.weight is transformer.wte.weight: named_parameters() lists it (and DeepSpeed's masters key it)
    # once, the state dict under both names
    from safetensors.torch import load_file

    from lightning_modules.common import whole_state_dict
    from lightning_modules.compensation import export_plugin_weights, load_plugin_weights

    class Tied(nn.Module):
        name = "tied"

        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(8, 4)
            self.lm_head = nn.Linear(4, 8, bias=False)
            self.lm_head.weight = self.wte.weight

        def export_config(self):
            return {}

    plugin = Tied().bfloat16()  # DeepSpeed bf16 casts the plug-in; the optimiser keeps fp32 masters
    assert [name for name, _ in plugin.named_parameters()] == ["wte.weight"]
    master = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    path = export_plugin_weights(plugin, tmp_path / "plugin.safetensors", {}, overrides={"wte.weight": master})
    written = load_file(str(path))
    assert torch.equal(written["wte.weight"], master) and torch.equal(written["lm_head.weight"], master)
    loaded = Tied()
    load_plugin_weights(loaded, path)
    assert torch.equal(loaded.lm_head.weight, master)
    # the base module's export (save_pretrained of whole_state_dict) likewise
    whole = whole_state_dict(plugin, overrides={"wte.weight": master})
    assert whole["wte.weight"] is master and whole["lm_head.weight"] is master


def test_deepspeed_strategy_names_zero_dim_parameters():
    class WithScalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.0))
            self.linear = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"0-dim parameters \['scale'\].*shape \(1,\)"):
        CPUDeepSpeedStrategy(stage=2)._setup_model_and_optimizer(WithScalar(), None)


def test_precision_cast_leaves_metric_states_alone():
    module = nn.Module()
    module.linear = nn.Linear(2, 2).double()
    module.total = SumMetric()
    module.total.set_dtype(torch.float64)
    module.total.update(torch.tensor(1.5, dtype=torch.float64))
    _convert_module_keeping_metric_states("32-true")(module)
    assert module.linear.weight.dtype == torch.float32
    assert module.total.sum_value.dtype == torch.float64
    module.total.update(torch.tensor(0.1, dtype=torch.float64))  # keeps accumulating in float64, not a float32 copy
    assert module.total.compute().item() == 1.5 + 0.1 and module.total.compute().dtype == torch.float64


def test_tokens_after_eos_become_padding():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert pad_after_eos(tokens, eos_token_id=2, pad_token_id=0).tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]


def test_training_free_generation_keeps_step_across_zero3_ranks(tiny_base_dir, monkeypatch):
    """Under ZeRO-3 on several ranks every rank decodes max_new_tokens steps (each call gathers weights
    collectively), and the answers come out as without lockstep."""
    from lightning_modules import frozen_base
    from lvlm_prune.modeling.loading import load_processor
    from lvlm_prune.runner import GenerationResult

    module = frozen_base.FrozenBaseModule(str(tiny_base_dir), load_processor(str(tiny_base_dir)), max_new_tokens=4)
    eos = module.tokenizer.eos_token_id
    asked = []

    def generate(engine, batch, method, max_new_tokens, eos_token_id, pad_token_id):
        asked.append(eos_token_id)
        return GenerationResult(torch.tensor([[5, eos, 7, 7]]), torch.zeros(1, 1), torch.zeros(1), {})

    monkeypatch.setattr(frozen_base, "generate_with_method", generate)
    monkeypatch.setattr(frozen_base, "generates_in_lockstep", lambda module: True)
    result = module.generate_with({}, "random", 0.5)
    pad = module.tokenizer.pad_token_id
    assert asked == [None] and result.tokens.tolist() == [[5, eos, pad, pad]]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_names_the_settings_to_lower(error):
    with pytest.raises(type(error)) as caught:
        with out_of_memory_advice("the training step"):
            raise error
    message = str(caught.value)
    for setting in ("data.init_args.batch_size", "data.init_args.max_length", "trainer.accumulate_grad_batches",
                    "model.init_args.quantization", "configs/trainer/deepspeed_zero2.yaml"):
        assert setting in message
    assert str(error) in message and "in the training step" in message


def test_out_of_memory_in_generation_names_the_evaluation_settings():
    with pytest.raises(torch.OutOfMemoryError, match=r"^out of memory in generation\. Lower data.init_args.eval_batch_size"):
        with out_of_memory_advice("generation", EVALUATION_MEMORY_SETTINGS):
            raise torch.OutOfMemoryError("CUDA out of memory.")


def test_other_runtime_errors_pass_unchanged():
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        with out_of_memory_advice("the training step"):
            raise RuntimeError("shape mismatch")


@pytest.mark.parametrize("preset, expected", [
    ("deepspeed_zero2.yaml", {"class_path": "lightning_modules.strategies.CPUDeepSpeedStrategy", "stage": 2}),
    ("deepspeed_zero3.yaml", {"class_path": "lightning_modules.strategies.CPUDeepSpeedStrategy", "stage": 3}),
    ("ddp.yaml", {"strategy": "ddp", "devices": 2}),
    ("debug.yaml", {"max_steps": 4}),
])
def test_trainer_presets_state_their_command_and_combine_with_an_experiment(preset, expected, tmp_path, capsys):
    import yaml

    from cli import cli_main

    path = ROOT / "configs" / "trainer" / preset
    assert path.read_text().startswith(f"# python cli.py fit --config configs/synthetic/rcp.yaml --config configs/trainer/{preset}\n")
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "--config", str(ROOT / "configs" / "synthetic" / "rcp.yaml"), "--config", str(path),
                  "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed[printed.index("# lightning.pytorch=="):])  # after import-time log lines
    trainer = config["trainer"]
    strategy = trainer["strategy"]
    for key, value in expected.items():
        if key == "class_path":
            assert strategy["class_path"] == value
        elif key == "stage":
            assert strategy["init_args"]["stage"] == value and strategy["init_args"]["exclude_frozen_parameters"]
        else:
            assert trainer[key] == value
    assert config["model"]["class_path"] == "lightning_modules.compensation.CompensationModule"  # the experiment stays


def test_a_resumed_run_names_exactly_the_settings_that_differ_from_its_checkpoint(tiny_base_dir, tmp_path, one_thread):
    """Explicit and `auto` checkpoints alike; a setting the config leaves to the module (eval_method: None becomes
    the plug-in's name in the saved hyperparameters) is no difference."""
    from cli import cli_main

    config = tiny_experiment(tmp_path / "run", tiny_base_dir, max_steps=2)
    common = ["--config", str(config), "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "0"]
    cli_main(["fit", *common])
    last = tmp_path / "run" / "logs" / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*differently from the run that wrote the checkpoint")
        cli_main(["validate", *common, "--ckpt_path", str(last)])
    with pytest.warns(UserWarning, match=r"checkpoints/last.ckpt: the config sets model.init_args \['learning_rate'\]"):
        cli = cli_main(["fit", *common, "--ckpt_path", "auto", "--trainer.max_steps", "3",
                        "--model.init_args.learning_rate", "0.01"])
    assert cli.trainer.global_step == 3 and cli.model.hparams.learning_rate == 0.01


def test_exporting_from_a_file_that_is_not_a_checkpoint_names_it(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from export_plugin import read_checkpoint
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    corrupt = tmp_path / "last.ckpt"
    corrupt.write_bytes(b"\x80\x04 not a checkpoint")
    with pytest.raises(ValueError, match=r"last.ckpt' is not a readable Lightning checkpoint"):
        read_checkpoint(corrupt)


def test_a_requeue_signal_inside_an_accumulation_window_checkpoints_at_the_window_end(tmp_path):
    from callbacks.requeue import SlurmRequeue

    accumulating = iter([True, True, False])  # the signal lands on the first batch of a 3-batch window
    saved = []
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_should_accumulate=lambda: next(accumulating))),
        _checkpoint_connector=SimpleNamespace(hpc_save_path=lambda root: str(tmp_path / "hpc_ckpt_1.ckpt")),
        default_root_dir=str(tmp_path), save_checkpoint=saved.append, is_global_zero=False, global_step=4,
    )
    requeue = SlurmRequeue()
    requeue._signal = signal.SIGUSR1
    requeue._note(signal.SIGUSR1, None)
    for batch_idx in range(3):
        requeue.on_train_batch_end(trainer, None, None, None, batch_idx)
        assert saved == ([] if batch_idx < 2 else [str(tmp_path / "hpc_ckpt_1.ckpt")])
    requeue.on_train_batch_end(trainer, None, None, None, 3)  # once only
    assert len(saved) == 1


class _Interrupted(Exception):
    pass


class _AccumulatingModel(L.LightningModule):
    """w is pulled toward each batch; stops (raises) after `stop_after` training batches of this run."""

    def __init__(self, stop_after=None):
        super().__init__()
        self.w, self.stop_after, self.batches = torch.nn.Parameter(torch.zeros(1)), stop_after, 0

    def training_step(self, batch, batch_idx):
        return ((self.w - batch[0]) ** 2).sum()

    def on_train_batch_end(self, *args):
        self.batches += 1
        if self.batches == self.stop_after:
            raise _Interrupted

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Numbers(L.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(16.0)), batch_size=2,
                                           shuffle=True)


def test_a_run_resumed_at_a_checkpoint_step_does_not_save_again_inside_an_accumulation_window(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(directory, stop_after=None, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(default_root_dir=directory, max_steps=8, accumulate_grad_batches=2, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[ResumableDataOrder(), ModelCheckpoint(dirpath=directory, every_n_train_steps=2,
                                                                             save_top_k=0, save_last=True)])
        model = _AccumulatingModel(stop_after)
        try:
            trainer.fit(model, datamodule=_Numbers(), ckpt_path=ckpt_path)
        except _Interrupted:
            pass
        return model.w.item()

    def saved(path):
        checkpoint = torch.load(path, weights_only=False)
        return checkpoint["global_step"], checkpoint["callbacks"]["ResumableDataOrder"]["batches_done"]

    uninterrupted = fit(tmp_path / "a")
    last = tmp_path / "b" / "last.ckpt"
    fit(tmp_path / "b", stop_after=5)  # last.ckpt at step 2, after 4 batches
    assert saved(last) == (2, 4)
    fit(tmp_path / "b", stop_after=1, ckpt_path=last)  # resumed, stopped after the first micro-batch of a window
    assert saved(last) == (2, 4)  # Lightning's checkpoint saved again here, at 5 batches (inside the window)
    assert fit(tmp_path / "b", ckpt_path=last) == uninterrupted


def test_each_true_precision_casts_to_its_own_dtype():
    for precision, dtype in (("bf16-true", torch.bfloat16), ("16-true", torch.float16), ("32-true", torch.float32)):
        module = torch.nn.Linear(2, 2).double()
        assert _convert_module_keeping_metric_states(precision)(module).weight.dtype == dtype
    module = torch.nn.Linear(2, 2).double()
    assert _convert_module_keeping_metric_states("bf16-mixed")(module).weight.dtype == torch.float64


def test_atomic_checkpoint_io_refuses_storage_options(tmp_path):
    with pytest.raises(TypeError, match=r"AtomicCheckpointIO takes no storage_options, got \{'x': 1\}"):
        AtomicCheckpointIO().save_checkpoint({"a": 1}, tmp_path / "c.ckpt", storage_options={"x": 1})
    assert not (tmp_path / "c.ckpt").exists()
