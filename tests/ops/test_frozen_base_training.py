"""Training plug-ins on a frozen base, in process: skipped non-finite steps, lean checkpoints that refuse a
different base, and a bitsandbytes-quantised (8-bit, 4-bit NF4) base under fp32 plug-ins."""

import copy
import math
import io
import shutil
import stat
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import TINY_DATA_ARGS
from datamodules.synthetic import SyntheticVQADataModule
from lightning_modules.compensation import BASE_PREFIX, CompensationModule, fingerprints
from lvlm_prune.rcp.compensation import RCPCompensation
from ops_helpers import one_thread, other_base_dir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_module(base_dir, data, **kwargs) -> CompensationModule:
    plugin = RCPCompensation(target_prune_ratio=0.75, pruning_layers=[0, 1, 2], repair_layers=[2, 3], bottleneck=16,
                             num_queries=4, context_dim=16, adapter_bottleneck=8)
    return CompensationModule(str(base_dir), plugin, processor=data.processor, categories=data.categories,
                              learning_rate=1e-3, max_new_tokens=2, **kwargs)


def make_trainer(tmp_path, max_steps, callbacks=(), checkpoint=False) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=checkpoint,
                     callbacks=list(callbacks), default_root_dir=tmp_path)


@pytest.fixture(scope="module")
def data(tiny_base_dir):
    return SyntheticVQADataModule(processor_path=str(tiny_base_dir), **{**TINY_DATA_ARGS, "batch_size": 4})


def plugin_state(module):
    return {k: v.detach().clone() for k, v in module.compensation.state_dict().items()}


class Snapshots(L.Callback):
    """Plug-in weights and optimiser state before and after every training batch."""

    def __init__(self):
        self.before, self.after = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = (plugin_state(pl_module), copy.deepcopy(trainer.optimizers[0].state_dict()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = (plugin_state(pl_module), copy.deepcopy(trainer.optimizers[0].state_dict()))


def poison_step(module, step):
    original = module.compensation.training_losses

    def training_losses(engine, batch, progress):
        losses = original(engine, batch, progress)
        if module.trainer.global_step == step:
            losses["loss"] = losses["loss"] + float("inf")
        return losses

    module.compensation.training_losses = training_losses


def test_a_non_finite_step_moves_neither_weights_nor_optimiser_state(tiny_base_dir, data, tmp_path):
    module = make_module(tiny_base_dir, data, weight_decay=0.1)  # decay would move weights even with zero grads
    poison_step(module, step=1)
    snapshots = Snapshots()
    make_trainer(tmp_path, max_steps=3, callbacks=[snapshots]).fit(module, datamodule=data)
    weights_before, optimizer_before = snapshots.before[1]
    weights_after, optimizer_after = snapshots.after[1]
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
    # AdamW's moments and step counts stay; the step still counts, so the learning-rate schedule moves on
    torch.testing.assert_close(optimizer_after["state"], optimizer_before["state"], rtol=0, atol=0)
    assert module.skipped_steps == 1
    for step in (0, 2):  # the neighbouring steps do train
        assert any(not torch.equal(snapshots.before[step][0][k], snapshots.after[step][0][k]) for k in weights_before)


def test_a_non_finite_gradient_under_a_finite_loss_skips_the_step_before_clipping_spreads_it(
        tiny_base_dir, data, tmp_path):
    # e.g. a bf16 overflow in the base's backward: clipping would turn one NaN into a NaN norm for every weight
    module = make_module(tiny_base_dir, data)
    parameter = next(p for p in module.compensation.parameters() if p.requires_grad)
    parameter.register_hook(lambda grad: grad * float("nan") if module.trainer.global_step == 1 else grad)
    snapshots = Snapshots()
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[snapshots])
    trainer.gradient_clip_val = 1.0
    trainer.fit(module, datamodule=data)
    weights_before, _ = snapshots.before[1]
    weights_after, _ = snapshots.after[1]
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
    assert module.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.compensation.parameters())


def test_a_skipped_step_logs_its_own_non_finite_loss_not_the_last_steps(tiny_base_dir, data, tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module = make_module(tiny_base_dir, data)
    poison_step(module, step=1)
    returned = {}
    poisoned = module.compensation.training_losses

    def recorded(engine, batch, progress):
        losses = poisoned(engine, batch, progress)
        returned[module.trainer.global_step] = float(losses["ce"])
        return losses

    module.compensation.training_losses = recorded
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, limit_val_batches=0, log_every_n_steps=1,
                        logger=CSVLogger(tmp_path, name="logs", version="run"), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    rows = {int(r["step"]): r for r in csv.DictReader(open(tmp_path / "logs" / "run" / "metrics.csv"))
            if r.get("train/loss")}
    assert float(rows[1]["train/loss"]) == float("inf") and float(rows[1]["train/skipped_steps"]) == 1
    # the skipped step's own (finite) CE term, not step 0's left over
    assert math.isfinite(float(rows[1]["train/ce"])) and returned[1] != returned[0]
    assert all(float(rows[step]["train/ce"]) == pytest.approx(returned[step], rel=1e-6) for step in (0, 1, 2))
    assert all(math.isfinite(float(rows[step]["train/loss"])) for step in (0, 2))


class BaseStaysFrozen(L.Callback):
    """Checks at every training batch that the base is in eval mode while the plug-in trains, and before every
    optimiser step that no gradient reached the base while the plug-in's pruners got one."""

    def __init__(self):
        self.batches = self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert pl_module.training and pl_module.compensation.training
        assert not pl_module.base.training and not any(m.training for m in pl_module.base.modules())
        self.batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        assert not any(p.requires_grad or p.grad is not None for p in pl_module.base.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pl_module.compensation.pruners.parameters())
        self.steps += 1


def test_a_fit_leaves_the_base_bitwise_unchanged_and_in_eval_mode(tiny_base_dir, data, tmp_path):
    """The module's own freeze (no test-side one) and its train() override: after two AdamW steps with weight decay
    (which would move any weight the optimiser held, gradient or not) the base equals a fresh load bit for bit."""
    from lvlm_prune.modeling.loading import load_base_model

    module = make_module(tiny_base_dir, data, weight_decay=0.1)
    plugin_before = plugin_state(module)
    module.train()
    assert module.compensation.training and not module.base.training
    probe = BaseStaysFrozen()
    make_trainer(tmp_path, max_steps=2, callbacks=[probe]).fit(module, datamodule=data)
    assert probe.batches == 2 and probe.steps == 2
    fresh, after = load_base_model(tiny_base_dir).state_dict(), module.base.state_dict()
    assert after.keys() == fresh.keys()
    assert all(torch.equal(after[k], fresh[k]) for k in fresh)
    assert any(not torch.equal(v, plugin_state(module)[k]) for k, v in plugin_before.items())  # the plug-in trained


def test_a_fit_logs_each_loss_term_and_the_parameter_counts(tiny_base_dir, tmp_path):
    """The CLI's CSV logger gets, per training step, the answer CE, the repair and sparsity losses, the kept-token
    fraction and the schedule's values beside the total (which they make up), and once the trainable / frozen
    parameter counts."""
    import math

    import yaml

    from cli import cli_main
    from ops_helpers import metric_rows, tiny_experiment

    run_dir = tmp_path / "run"
    cli = cli_main(["fit", "--config", str(tiny_experiment(run_dir, tiny_base_dir, max_steps=2)),
                    "--trainer.limit_val_batches", "0"])
    rows = [r for r in metric_rows(run_dir) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [0, 1]
    plugin = cli.model.compensation
    for row in rows:
        values = {k: float(row[f"train/{k}"]) for k in ("loss", "ce", "repair", "sparsity", "keep_fraction",
                                                       "target_keep_fraction", "temperature")}
        assert all(math.isfinite(v) for v in values.values()), values
        assert values["ce"] > 0 and values["repair"] > 0 and values["sparsity"] >= 0
        assert 0 < values["keep_fraction"] <= 1 and 0 < values["target_keep_fraction"] <= 1
        assert values["temperature"] == pytest.approx(plugin.schedule(int(row["step"]) / 2).temperature)
        total = (plugin.ce_weight * values["ce"] + plugin.repair_weight * values["repair"]
                 + plugin.sparsity_weight * values["sparsity"])
        assert values["loss"] == pytest.approx(total, rel=1e-5)
    hparams = yaml.safe_load((run_dir / "logs" / "run" / "hparams.yaml").read_text())
    trainable = sum(p.numel() for p in plugin.parameters())
    frozen = sum(p.numel() for p in cli.model.base.parameters())
    assert (hparams["params/trainable"], hparams["params/frozen"]) == (trainable, frozen)
    assert trainable + frozen == sum(p.numel() for p in cli.model.parameters())


@pytest.mark.parametrize("deepspeed", [True, False])
def test_under_accumulation_a_non_finite_micro_batch_backpropagates_zero_and_still_steps(
        tiny_base_dir, data, stand_in_trainer, deepspeed):
    """DeepSpeed counts its accumulation window in the step after every micro-batch: skipping that step would
    shift every later window, so the bad micro-batch contributes a zero gradient and the step is taken. Other
    strategies do the same: a skip flag set by an earlier micro-batch would be overwritten by the window's last."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    module = make_module(tiny_base_dir, data)
    # only its type is read
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy) if deepspeed else None
    stand_in_trainer(module, strategy, accumulate_grad_batches=2, world_size=1, estimated_stepping_batches=4,
                     global_step=0)
    poison_step(module, step=0)
    loss = module.training_step(next(iter(data.train_dataloader())), 0)
    assert loss is not None and float(loss) == 0.0 and loss.requires_grad and not module._skip_step
    stepped = []
    module.optimizer_step(0, 0, SimpleNamespace(step=lambda closure: stepped.append(1)), lambda: loss)
    assert stepped == [1] and module.skipped_steps == 1


def test_non_finite_loss_can_stop_the_run_with_the_setting_named(tiny_base_dir, data, tmp_path):
    module = make_module(tiny_base_dir, data, nonfinite_loss="raise")
    poison_step(module, step=0)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0.*model.nonfinite_loss=skip"):
        make_trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    with pytest.raises(ValueError, match="model.nonfinite_loss='ignore'"):
        make_module(tiny_base_dir, data, nonfinite_loss="ignore")


def test_checkpoints_are_lean_and_refuse_another_base(tiny_base_dir, other_base_dir, data, tmp_path):  # noqa: F811
    module = make_module(tiny_base_dir, data)
    checkpointing = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    make_trainer(tmp_path, max_steps=1, callbacks=[checkpointing], checkpoint=True).fit(module, datamodule=data)
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    assert not [k for k in checkpoint["state_dict"] if k.startswith(BASE_PREFIX)]
    assert checkpoint["base_model"] == {"path": str(tiny_base_dir), "fingerprint": module.base_fingerprint}
    with_base = dict(checkpoint, state_dict={**checkpoint["state_dict"], **{
        k: v for k, v in module.state_dict().items() if k.startswith(BASE_PREFIX)}})
    buffer = io.BytesIO()
    torch.save(with_base, buffer)
    base_bytes = sum(p.numel() * p.element_size() for p in module.base.parameters())
    assert path.stat().st_size < buffer.getbuffer().nbytes - 0.9 * base_bytes

    same = make_module(tiny_base_dir, data)
    assert not same.strict_loading  # Lightning's loading may not ask for the base's keys ...
    same.on_load_checkpoint(checkpoint)  # ... because this checks the plug-in's
    same.load_state_dict(checkpoint["state_dict"], strict=same.strict_loading)
    trained = plugin_state(module)
    assert all(torch.equal(v, trained[k]) for k, v in plugin_state(same).items())
    first_key = next(iter(checkpoint["state_dict"]))
    incomplete = dict(checkpoint, state_dict={k: v for k, v in checkpoint["state_dict"].items() if k != first_key})
    with pytest.raises(ValueError, match=rf"does not fit the configured rcp plug-in: missing \['{first_key}'\]"):
        same.on_load_checkpoint(incomplete)
    reshaped = dict(checkpoint, state_dict={**checkpoint["state_dict"], first_key: torch.zeros(3, 1)})
    with pytest.raises(ValueError, match=rf"other shape \(checkpoint vs configured\) \['{first_key} \(3, 1\) vs"):
        same.on_load_checkpoint(reshaped)
    assert checkpoint["plugin"] == "rcp"
    assert checkpoint["plugin_class"] == "lvlm_prune.rcp.compensation.RCPCompensation"
    assert checkpoint["plugin_config"] == module.compensation.export_config()
    with pytest.raises(ValueError, match=r"holds the 'accm' plug-in, but the config builds 'rcp'"):
        same.on_load_checkpoint(dict(checkpoint, plugin="accm"))

    other = make_module(other_base_dir, data)
    assert other.base_fingerprint != module.base_fingerprint
    with pytest.raises(ValueError, match=r"belongs to the base model at .*point model.init_args.base_model_path at the original"):
        other.on_load_checkpoint(torch.load(path, weights_only=False))

    # the same base moved elsewhere is the same base; checkpoints that recorded the older, path-dependent hash load
    moved = make_module(shutil.copytree(tiny_base_dir, tmp_path / "moved_base"), data)
    assert moved.base_fingerprint == module.base_fingerprint
    moved.on_load_checkpoint(torch.load(path, weights_only=False))
    legacy = fingerprints(module.base)[1]
    assert legacy != module.base_fingerprint
    module.on_load_checkpoint(dict(checkpoint, base_model={"path": str(tiny_base_dir), "fingerprint": legacy}))


@pytest.mark.parametrize("quantization, layer_type", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_fp32_plugins_train_on_a_quantised_base(tiny_base_dir, data, tmp_path, quantization, layer_type):
    module = make_module(tiny_base_dir, data, quantization=quantization)
    quantised = {name for name, m in module.base.named_modules() if type(m).__name__ == layer_type}
    linear = {name for name, m in module.base.named_modules() if isinstance(m, torch.nn.Linear)}
    # as LLaVA's own loader: the language model and the projector; the CLIP tower and lm_head stay in the base dtype
    assert quantised == {name for name in linear if "vision_tower" not in name and "lm_head" not in name}
    assert any("multi_modal_projector" in name for name in quantised) and len(quantised) >= 10
    full_precision = make_module(tiny_base_dir, data)

    def language_model_bytes(base):
        return sum(t.numel() * t.element_size() for t in [*base.model.language_model.parameters(),
                                                          *base.model.language_model.buffers()])

    assert language_model_bytes(module.base) < 0.5 * language_model_bytes(full_precision.base)
    assert module.base.get_memory_footprint() < full_precision.base.get_memory_footprint()
    assert all(p.dtype == torch.float32 and p.requires_grad for p in module.compensation.parameters())
    assert not any(p.requires_grad for p in module.base.parameters())
    base_before = {k: v.clone() for k, v in module.base.state_dict().items() if isinstance(v, torch.Tensor)}
    plugin_before = plugin_state(module)
    make_trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    plugin_after = plugin_state(module)
    assert any(not torch.equal(plugin_before[k], plugin_after[k]) for k in plugin_before)
    assert all(torch.isfinite(v).all() for v in plugin_after.values())
    base_after = module.base.state_dict()
    assert all(torch.equal(v, base_after[k]) for k, v in base_before.items())


class RestoredAtTrainStart(L.Callback):
    """Compares, when the resumed run starts training, the plug-in weights, the optimiser state and the learning-rate
    schedule with the checkpoint it resumes from, and the frozen base with `base_state`."""

    def __init__(self, checkpoint, base_state):
        self.checkpoint, self.base_state, self.checked = checkpoint, base_state, False

    def on_train_start(self, trainer, pl_module):
        saved = self.checkpoint["state_dict"]
        plugin = pl_module.compensation.state_dict()
        assert {f"compensation.{k}" for k in plugin} == {k for k in saved if k.startswith("compensation.")}
        for key, value in plugin.items():
            assert torch.equal(value, saved[f"compensation.{key}"]), key
        (expected,) = self.checkpoint["optimizer_states"]
        actual = trainer.optimizers[0].state_dict()
        assert len(expected["state"]) == len(plugin) and all(s["step"] == 1 for s in expected["state"].values())
        torch.testing.assert_close(actual["state"], expected["state"], rtol=0, atol=0)  # AdamW's moments and steps
        assert [g["lr"] for g in actual["param_groups"]] == [g["lr"] for g in expected["param_groups"]]
        assert trainer.lr_scheduler_configs[0].scheduler.state_dict() == self.checkpoint["lr_schedulers"][0]
        base = pl_module.base.state_dict()  # the quantised weights and their quantisation state
        assert base.keys() == self.base_state.keys()
        assert all(torch.equal(base[k], v) for k, v in self.base_state.items() if isinstance(v, torch.Tensor))
        self.checked = True


def test_a_run_on_a_4bit_base_resumes_from_its_checkpoint(tiny_base_dir, data, tmp_path):
    checkpointing = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    first = make_module(tiny_base_dir, data, quantization="4bit")
    base_state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in first.base.state_dict().items()}
    make_trainer(tmp_path, max_steps=1, callbacks=[checkpointing], checkpoint=True).fit(first, datamodule=data)
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    resumed = make_module(tiny_base_dir, data, quantization="4bit")
    fresh = plugin_state(resumed)
    # the trained plug-in differs from a fresh one, so equal weights at the start mean they were restored
    assert any(not torch.equal(v, checkpoint["state_dict"][f"compensation.{k}"]) for k, v in fresh.items())
    restored = RestoredAtTrainStart(checkpoint, base_state)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[restored], checkpoint=True)
    trainer.fit(resumed, datamodule=data, ckpt_path=path)
    assert restored.checked and trainer.global_step == 2
    base_after = resumed.base.state_dict()
    assert all(torch.equal(base_after[k], v) for k, v in base_state.items() if isinstance(v, torch.Tensor))


def test_gradients_through_a_4bit_layer_stay_right_after_a_no_grad_pass(tiny_base_dir, data):
    import bitsandbytes.functional as bnb_functional

    module = make_module(tiny_base_dir, data, quantization="4bit")
    layer = module.base.model.language_model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        layer(x)  # the teacher pass: bitsandbytes would repack the layer for its backward-less CPU kernel here
    x.requires_grad_(True)
    layer(x).square().sum().backward()
    weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    reference = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(reference, weight, layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-3, atol=1e-4)


def test_plugin_weights_name_their_file_when_they_do_not_fit(tiny_base_dir, other_base_dir, data, tmp_path):  # noqa: F811
    from safetensors.torch import save_file

    from lightning_modules.compensation import export_plugin_weights

    module = make_module(tiny_base_dir, data)
    path = export_plugin_weights(module.compensation, tmp_path / "plugin.safetensors",
                                 {"base_model_path": str(tiny_base_dir), "base_fingerprint": module.base_fingerprint})
    # as readable as its .json (safetensors alone writes 0600)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(Path(f"{path}.json").stat().st_mode)
    with pytest.warns(UserWarning, match=r"plugin.safetensors' were trained on the base at .*only meaningful"):
        make_module(other_base_dir, data, plugin_weights_path=str(path))

    state = {k: v.clone() for k, v in module.compensation.state_dict().items()}
    name = next(k for k, v in state.items() if v.dim() == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    save_file(state, str(path))
    with pytest.raises(ValueError, match=rf"plugin.safetensors' .*do not fit this base .*{name}"):
        make_module(tiny_base_dir, data, plugin_weights_path=str(path))

    save_file(module.compensation.state_dict(), str(path))
    Path(str(path) + ".json").write_text('{"base_model_path": ')
    with pytest.raises(ValueError, match=r"plugin.safetensors.json', the record beside the plug-in weights, is not"):
        make_module(tiny_base_dir, data, plugin_weights_path=str(path))

    path.write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"plugin.safetensors' \(model.plugin_weights_path\) are not a readable"):
        make_module(tiny_base_dir, data, plugin_weights_path=str(path))


def test_an_impossible_evaluation_setting_is_named_before_any_work(tiny_base_dir, data):
    module = make_module(tiny_base_dir, data, eval_prune_ratio=1.0)
    with pytest.raises(ValueError, match=r"model.eval_method='rcp' at model.eval_prune_ratio=1.0: .*must be in \[0, 1\)"):
        module.setup("test")


def test_out_of_memory_in_a_sweep_names_the_evaluation_settings(tiny_base_dir, data, monkeypatch):
    from lightning_modules.frozen_base import FrozenBaseModule

    module = FrozenBaseModule(str(tiny_base_dir), processor=data.processor, categories=data.categories)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(module.engine, "generate", out_of_memory)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    with pytest.raises(torch.OutOfMemoryError, match=r"out of memory in generation\. Lower data.init_args.eval_batch_size"):
        module.generate_with(batch, "fastv", 0.5)


def test_exported_plugin_weights_load_through_the_module_setting(tiny_base_dir, data, tmp_path):
    from lightning_modules.compensation import export_plugin_weights
    from lvlm_prune.rcp.compensation import RCPPruning

    module = make_module(tiny_base_dir, data)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights away from any initialisation, pruners and adapters alike
        for parameter in module.compensation.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        for pruner in module.compensation.pruners:
            pruner.bias.fill_(0.0)
    path = export_plugin_weights(module.compensation, tmp_path / "plugin.safetensors",
                                 {"base_model_path": str(tiny_base_dir), "base_fingerprint": module.base_fingerprint})
    # as readable as its .json (safetensors alone writes 0600)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(Path(f"{path}.json").stat().st_mode)
    loaded = make_module(tiny_base_dir, data, plugin_weights_path=str(path))
    fresh = make_module(tiny_base_dir, data)
    exported, restored, initial = plugin_state(module), plugin_state(loaded), plugin_state(fresh)
    assert restored.keys() == exported.keys()
    assert all(torch.equal(restored[k], exported[k]) for k in exported)
    assert any(not torch.equal(initial[k], exported[k]) for k in exported)

    batch = next(iter(data.train_dataloader()))
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["position_ids"])

    def teacher_forced(m):  # thresholded pruners decide, the adapters repair the answer positions
        method = RCPPruning(m.compensation, training=False, temperature=m.compensation.schedule.temperature_end)
        with torch.no_grad():
            return m.engine(*args, labels=batch["labels"], method=method)

    expected, actual = teacher_forced(module), teacher_forced(loaded)
    num_visual = module.engine.info.num_visual_tokens
    assert (expected.visual_tokens_per_layer < num_visual).any()  # the loaded pruners' decisions count too
    torch.testing.assert_close(actual.visual_tokens_per_layer, expected.visual_tokens_per_layer, rtol=0, atol=0)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    assert not torch.allclose(teacher_forced(fresh).logits, expected.logits)


def test_the_rcp_optimiser_holds_exactly_the_plugin_parameters(tiny_base_dir, data):
    from types import SimpleNamespace

    module = make_module(tiny_base_dir, data)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    optimizer = module.configure_optimizers()["optimizer"]
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    plugin = [id(p) for p in module.compensation.parameters()]
    assert len(held) == len(set(held)) and set(held) == set(plugin)
    assert {id(p) for p in module.compensation.pruners.parameters()} <= set(held)
    assert {id(p) for p in module.compensation.adapters.parameters()} <= set(held)
    assert not set(held) & {id(p) for p in module.base.parameters()}


def test_predict_returns_answer_records_of_the_evaluation_method(tiny_base_dir, data):
    module = make_module(tiny_base_dir, data, eval_method="fastv", eval_prune_ratio=0.5)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    batches = trainer.predict(module, dataloaders=data.test_dataloader())
    records = [record for batch in batches for record in batch]
    samples = data.samples("test")
    assert [r["question_id"] for r in records] == [s.question_id for s in samples]
    assert {r["model_id"] for r in records} == {"fastv@r=0.5"}
    batch = next(iter(data.test_dataloader()))
    expected, _, _ = module.run_method(batch, "fastv", 0.5)
    assert [r["text"] for r in records[: len(expected)]] == expected
    trainer.test(module, dataloaders=data.test_dataloader(), verbose=False)  # test's answer records say the same
    assert [(r["question_id"], r["model_id"]) for r in module.test_predictions] == [
        (r["question_id"], "fastv@r=0.5") for r in records]


def test_a_quantised_base_is_refused_under_a_sharding_strategy_before_any_work(tiny_base_dir, data):
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from lightning_modules.common import check_quantization_fits_strategy

    for strategy in (DeepSpeedStrategy(stage=2), FSDPStrategy()):
        with pytest.raises(ValueError, match=rf"quantization='4bit' does not run under {type(strategy).__name__}"):
            check_quantization_fits_strategy("4bit", strategy)
        check_quantization_fits_strategy(None, strategy)
    check_quantization_fits_strategy("4bit", L.Trainer(accelerator="cpu", devices=1, logger=False).strategy)
    # the module's setup hook, which Lightning calls before the strategy wraps the module, asks
    module = make_module(tiny_base_dir, data, quantization="8bit")
    module.trainer = L.Trainer(strategy=DeepSpeedStrategy(stage=2), accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match=r"quantization='8bit' does not run under DeepSpeedStrategy"):
        module.setup("fit")


def test_a_run_resumed_with_another_length_keeps_one_plan_for_every_schedule(tiny_base_dir, data, tmp_path):
    # fit 2 steps, then resume to 4: the LR schedule comes back from the checkpoint with its 2-step plan, and the
    # plug-in's schedules (RCP's temperature and noise) must follow the same plan, not a new 4-step one
    checkpointing = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    first = make_module(tiny_base_dir, data)
    poison_step(first, step=0)  # one skipped step, which the checkpoint must remember
    make_trainer(tmp_path, max_steps=2, callbacks=[checkpointing], checkpoint=True).fit(first, datamodule=data)
    assert first.skipped_steps == 1

    resumed = make_module(tiny_base_dir, data)
    seen, original = [], resumed.compensation.training_losses
    resumed.compensation.training_losses = lambda engine, batch, progress: seen.append(
        (progress, resumed.lr_schedulers().get_last_lr()[0])) or original(engine, batch, progress)
    with pytest.warns(UserWarning, match=r"keep the plan of 2 steps restored from the checkpoint; this run now ends "
                                         r"after 4"):
        make_trainer(tmp_path, max_steps=4).fit(resumed, datamodule=data, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    final_lr = 1e-3 * resumed.hparams.final_lr_ratio
    assert [progress for progress, _ in seen] == [1.0, 1.0]
    assert all(lr == pytest.approx(final_lr) for _, lr in seen)
    assert resumed.skipped_steps == 1  # restored, not counted from 0


def test_a_run_without_a_length_is_refused(tiny_base_dir, data, tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=-1, max_epochs=-1, max_time="00:00:00:30",
                        limit_val_batches=0, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"no length \(trainer.max_steps and trainer.max_epochs are both -1\)"):
        trainer.fit(make_module(tiny_base_dir, data), datamodule=data)
