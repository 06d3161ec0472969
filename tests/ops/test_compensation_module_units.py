"""Units of CompensationModule that the module-level tests leave loose: the bounds of its schedule settings, the
evaluation defaults of a plug-in without a target ratio, the method names and ratio checks it answers for its plug-in,
the DDP check of a plug-in that trains every parameter, the seeded noise of a training step, a non-finite loss on
another rank, the learning-rate plan, exports and checkpoints."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_modules.compensation import CompensationModule
from lvlm_prune.compensation import Compensation
from ops_helpers import one_thread  # noqa: F401  (fixture)
from test_frozen_base_training import data, make_module  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class StubPlugin(Compensation):
    """A plug-in with one trainable layer and no `target_prune_ratio`."""

    name = "stub"

    def attach(self, engine, tokenizer):
        self.layer = nn.Linear(2, 2)

    def training_losses(self, engine, batch, progress):
        raise NotImplementedError

    def inference_method(self, prune_ratio):
        raise NotImplementedError


def first_batch(data):  # noqa: F811
    return next(iter(data.train_dataloader()))


# ------------------------------------------------------------------------------------------------------ settings
def test_the_warmup_fraction_must_stay_below_one_and_the_final_ratio_may_reach_it(tiny_base_dir, data):  # noqa: F811
    with pytest.raises(ValueError, match=r"model.warmup_fraction=1.0 must be in \[0, 1\)"):
        make_module(tiny_base_dir, data, warmup_fraction=1.0)
    # the closed ends: no warm-up, and a constant learning rate after it
    for settings in ({"warmup_fraction": 0.0}, {"final_lr_ratio": 1.0}, {"final_lr_ratio": 0.0}):
        module = make_module(tiny_base_dir, data, **settings)
        assert all(module.hparams[k] == v for k, v in settings.items())


def test_a_plugin_without_a_target_ratio_is_evaluated_unpruned_by_default(tiny_base_dir, data):  # noqa: F811
    module = CompensationModule(str(tiny_base_dir), StubPlugin(), processor=data.processor)
    assert (module.hparams.eval_method, module.hparams.eval_prune_ratio) == ("stub", 0.0)
    chosen = CompensationModule(str(tiny_base_dir), StubPlugin(), processor=data.processor, eval_method="fastv",
                                eval_prune_ratio=0.25)
    assert (chosen.hparams.eval_method, chosen.hparams.eval_prune_ratio) == ("fastv", 0.25)


# ------------------------------------------------------------------------------------------------------ methods
def test_the_method_names_hold_the_plugin_beside_the_training_free_methods(tiny_base_dir, data):  # noqa: F811
    from lightning_modules.frozen_base import FrozenBaseModule

    module = make_module(tiny_base_dir, data)
    names = module.method_names()
    assert "rcp" in names and names == sorted(names)
    assert set(FrozenBaseModule.method_names(module)) | {"rcp"} == set(names)


def test_the_plugin_method_refuses_a_ratio_of_one(tiny_base_dir, data):  # noqa: F811
    module = make_module(tiny_base_dir, data)
    with pytest.raises(ValueError, match=r"prune_ratio=1.0 must be in \[0, 1\)"):
        module.make_method("rcp", 1.0)
    with pytest.raises(ValueError, match=r"prune_ratio=-0.1 must be in \[0, 1\)"):
        module.make_method("rcp", -0.1)
    module.make_method("rcp", 0.0)
    # the module's own check, made before the plug-in is asked for a method (the stub has none to give)
    stub = CompensationModule(str(tiny_base_dir), StubPlugin(), processor=data.processor)
    with pytest.raises(ValueError, match=r"prune_ratio=1.0 must be in \[0, 1\)"):
        stub.make_method("stub", 1.0)


def test_the_plugin_generates_with_the_tokenizers_end_and_padding_ids(tiny_base_dir, data):  # noqa: F811
    module = make_module(tiny_base_dir, data)
    eos, pad = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
    assert eos is not None and eos != pad
    seen, original = [], module.compensation.generate

    def generate(engine, batch, prune_ratio, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        seen.append((prune_ratio, max_new_tokens, eos_token_id, pad_token_id))
        return original(engine, batch, prune_ratio, max_new_tokens, eos_token_id, pad_token_id, **kwargs)

    module.compensation.generate = generate
    data.setup("test")
    module.generate_with(next(iter(data.test_dataloader())), "rcp", 0.5)
    assert seen == [(0.5, 2, eos, pad)]


# ------------------------------------------------------------------------------------------------------ training
def test_plain_ddp_accepts_a_plugin_whose_every_parameter_trains(tiny_base_dir, data):  # noqa: F811
    from lightning.pytorch.strategies import DDPStrategy

    module = make_module(tiny_base_dir, data)
    assert not module.compensation.leaves_parameters_unused
    strategy = DDPStrategy.__new__(DDPStrategy)
    strategy._model = SimpleNamespace(find_unused_parameters=False)
    module.trainer = SimpleNamespace(strategy=strategy, is_global_zero=False, logger=None)
    try:
        module.on_fit_start()  # RCP gives every parameter a gradient every step: plain DDP is fine
    finally:
        module.trainer = None


def test_a_training_step_draws_its_noise_from_its_step_not_from_the_global_generator(tiny_base_dir, data,  # noqa: F811
                                                                                    stand_in_trainer):
    module = make_module(tiny_base_dir, data)
    stand_in_trainer(module, accumulate_grad_batches=1, world_size=1, estimated_stepping_batches=100)
    batch = first_batch(data)
    torch.manual_seed(0)
    first = float(module.training_step(batch, 0).detach())
    torch.rand(100)  # the global generator moves on (the data loader, dropout elsewhere ...)
    torch.manual_seed(123)
    again = float(module.training_step(batch, 0).detach())
    assert again == first  # a resumed run redraws the step's noise
    assert float(module.training_step(batch, 1).detach()) != first  # another batch of the step draws its own


def test_a_non_finite_loss_on_another_rank_skips_the_step_here_too(tiny_base_dir, data, stand_in_trainer):  # noqa: F811
    module = make_module(tiny_base_dir, data)
    trainer = stand_in_trainer(module, accumulate_grad_batches=1, world_size=2, estimated_stepping_batches=4,
                               global_step=0)
    other_rank_finite = False  # all=True: every rank's loss finite; all=False: some rank's
    trainer.strategy.reduce_boolean_decision = (
        lambda decision, all=True: (decision and other_rank_finite) if all else (decision or other_rank_finite))
    loss = module.training_step(first_batch(data), 0)
    assert module._skip_step and float(loss.detach()) == 0.0 and module.skipped_steps == 1
    stepped = []
    module.optimizer_step(0, 0, SimpleNamespace(step=lambda closure: stepped.append(1)), lambda: loss)
    assert stepped == []


def test_a_non_finite_gradient_on_another_rank_skips_the_step_here_too(tiny_base_dir, data, stand_in_trainer):  # noqa: F811
    module = make_module(tiny_base_dir, data)
    trainer = stand_in_trainer(module, accumulate_grad_batches=1, world_size=2, estimated_stepping_batches=4,
                               global_step=0)
    for parameter in module.compensation.parameters():
        parameter.grad = torch.ones_like(parameter)  # finite here
    trainer.strategy.reduce_boolean_decision = (
        lambda decision, all=True: (decision and False) if all else (decision or False))  # the other rank's are not
    stepped = []
    module.optimizer_step(0, 0, SimpleNamespace(step=lambda closure: stepped.append(1)), lambda: torch.tensor(1.0))
    assert stepped == [] and module.skipped_steps == 1


def test_the_noise_seed_follows_the_runs_seed(tiny_base_dir, data, monkeypatch):  # noqa: F811
    module = make_module(tiny_base_dir, data)
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    first = module._step_seed(0)
    assert module._step_seed(0) == first
    monkeypatch.setenv("PL_GLOBAL_SEED", "2")
    assert module._step_seed(0) != first  # seed_everything(2) draws other noise than seed_everything(1)


def test_without_a_restored_plan_the_progress_is_the_step_over_the_runs_length(tiny_base_dir, data,  # noqa: F811
                                                                            stand_in_trainer, monkeypatch):
    module = make_module(tiny_base_dir, data)
    stand_in_trainer(module, accumulate_grad_batches=1, world_size=1, estimated_stepping_batches=4)
    step = {"value": 0}
    monkeypatch.setattr(type(module), "global_step", property(lambda self: step["value"]))
    seen, original = [], module.compensation.training_losses
    module.compensation.training_losses = lambda engine, batch, progress: seen.append(progress) or original(
        engine, batch, progress)
    batch = first_batch(data)
    for value in (0, 2, 4, 6):
        step["value"] = value
        module.training_step(batch, 0)
    assert seen == [0.0, 0.5, 1.0, 1.0]


def test_the_optimiser_and_learning_rate_plan_follow_the_settings(tiny_base_dir, data):  # noqa: F811
    module = CompensationModule(str(tiny_base_dir), make_module(tiny_base_dir, data).compensation,
                                processor=data.processor, learning_rate=2e-4, weight_decay=0.05, warmup_fraction=0.2,
                                final_lr_ratio=0.5)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    try:
        configured = module.configure_optimizers()
    finally:
        module.trainer = None
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and configured["lr_scheduler"]["interval"] == "step"
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05]
    rates = []
    for _ in range(12):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()  # no gradients: nothing moves, the schedule steps
        scheduler.step()
    # two warm-up steps (20 % of 10) up to the peak, a cosine down to half of it at step 10, flat after
    assert rates[:3] == pytest.approx([1e-4, 2e-4, 2e-4])
    assert rates[3] < 2e-4 and all(a >= b for a, b in zip(rates[2:], rates[3:]))
    assert rates[10:] == pytest.approx([1e-4, 1e-4])


# ------------------------------------------------------------------------------------------------------ exports
@pytest.mark.parametrize("ended, step, done, exported", [
    (True, 3, True, False),  # the training loop ran and exported at its end: not a second time
    (False, 3, True, True),  # resumed where training had ended: no training loop, so the export runs here
    (False, 3, False, False),  # stopped before the end (interrupted, requeued): nothing to export yet
    (False, 0, True, False),  # no step was ever taken: nothing trained to export
])
def test_fit_end_exports_the_plugin_only_of_a_finished_run_whose_training_loop_did_not(
        ended, step, done, exported, tiny_base_dir, data, tmp_path):  # noqa: F811
    plugin = tmp_path / "plugin.safetensors"
    module = make_module(tiny_base_dir, data, plugin_export_path=str(plugin))
    module.trainer = SimpleNamespace(global_step=step, fit_loop=SimpleNamespace(done=done), strategy=SimpleNamespace(),
                                     is_global_zero=True, logger=None)
    try:
        module.on_fit_start()
        if ended:
            module.on_train_end()
            assert plugin.is_file()
            plugin.unlink()
        module.on_fit_end()
    finally:
        module.trainer = None
    assert plugin.is_file() == exported


def test_the_plugin_is_exported_once_per_step_with_the_base_it_fits(tiny_base_dir, data, tmp_path):  # noqa: F811
    import json

    from safetensors.torch import load_file

    plugin = tmp_path / "out" / "plugin.safetensors"
    module = make_module(tiny_base_dir, data, plugin_export_path=str(plugin))
    trainer = SimpleNamespace(global_step=5, strategy=SimpleNamespace(), is_global_zero=True)
    module.trainer = trainer
    try:
        module.export_plugin()
        written = load_file(plugin)
        state = module.compensation.state_dict()
        assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)
        record = json.loads(Path(f"{plugin}.json").read_text())
        assert record["plugin"] == "rcp" and record["config"] == module.compensation.export_config()
        assert (record["base_model_path"], record["base_fingerprint"]) == (str(tiny_base_dir), module.base_fingerprint)
        plugin.unlink()
        module.export_plugin()  # e.g. the sweep after fit, then on_train_end: the step's export is there already
        assert not plugin.exists()
        trainer.global_step = 6
        module.export_plugin()
        assert plugin.is_file()
    finally:
        module.trainer = None


# ------------------------------------------------------------------------------------------------------ checkpoints
def test_a_checkpoint_that_still_holds_the_base_loads_onto_the_same_plugin(tiny_base_dir, data):  # noqa: F811
    module = make_module(tiny_base_dir, data)
    full = dict(module.state_dict())  # e.g. written before checkpoints were lean: the base's entries beside the plug-in's
    assert any(k.startswith("base.") for k in full) and any(k.startswith("compensation.") for k in full)
    module.on_load_checkpoint({"state_dict": full, "plugin": "rcp", "skipped_steps": 2,
                               "base_model": {"path": str(tiny_base_dir), "fingerprint": module.base_fingerprint}})
    assert module.skipped_steps == 2


def test_the_fingerprint_leaves_out_load_paths_at_any_depth_of_the_config(tiny_base_dir):
    from lightning_modules.compensation import fingerprints
    from lvlm_prune.modeling.loading import load_base_model

    base = load_base_model(tiny_base_dir)
    before = fingerprints(base)
    base.config.text_config._name_or_path = "/somewhere/else/text"  # where a sub-model was once loaded from
    after = fingerprints(base)
    assert after[0] == before[0]
    assert after[1] != before[1]  # the older, path-dependent fingerprint did hash it


def test_plugin_weights_with_an_entry_the_configuration_lacks_are_refused(tiny_base_dir, data, tmp_path):  # noqa: F811
    from safetensors.torch import save_file

    from lightning_modules.compensation import load_plugin_weights

    module = make_module(tiny_base_dir, data)
    state = {k: v.clone() for k, v in module.compensation.state_dict().items()}
    state["pruners.9.weight"] = torch.zeros(2, 2)  # e.g. exported from a plug-in with more pruning layers
    save_file(state, str(tmp_path / "more.safetensors"))
    with pytest.raises(ValueError, match=r"do not fit this rcp configuration: missing \[\], unexpected "
                                         r"\['pruners.9.weight'\]"):
        load_plugin_weights(module.compensation, tmp_path / "more.safetensors")


# ------------------------------------------------------------------------------------------------------ lockstep
def zero3_partitioned(module, monkeypatch, world_size):
    """The module as ZeRO-3 leaves it (a partitioned weight) in a run of `world_size` processes."""
    trainer = SimpleNamespace(world_size=world_size, global_step=0, global_rank=0, accumulate_grad_batches=1,
                              estimated_stepping_batches=4,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision))
    monkeypatch.setattr(next(module.base.parameters()), "ds_id", 0, raising=False)
    monkeypatch.setattr(module, "_trainer", trainer)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "log_dict", lambda *args, **kwargs: None)
    return trainer


@pytest.mark.parametrize("world_size", [1, 2])
def test_under_zero3_with_several_processes_the_plugin_trains_and_generates_in_lockstep(
        tiny_base_dir, data, monkeypatch, world_size):  # noqa: F811
    module = make_module(tiny_base_dir, data)
    zero3_partitioned(module, monkeypatch, world_size)
    seen, original = [], module.compensation.training_losses
    module.compensation.training_losses = lambda engine, batch, progress: seen.append(
        module.compensation.lockstep) or original(engine, batch, progress)
    module.training_step(first_batch(data), 0)
    generated = []

    def generate(engine, batch, prune_ratio, max_new_tokens, eos_token_id, pad_token_id):
        generated.append((module.compensation.lockstep, eos_token_id))
        return SimpleNamespace(tokens=torch.zeros(1, max_new_tokens, dtype=torch.long))

    module.compensation.generate = generate
    module.generate_with(first_batch(data), "rcp", 0.5)
    several = world_size > 1  # every rank makes the same module calls: decoding runs to max_new_tokens
    assert seen == [several]
    assert generated == [(several, None if several else module.tokenizer.eos_token_id)]


def test_a_checkpoint_without_the_later_records_loads_with_no_skipped_steps(tiny_base_dir, data):  # noqa: F811
    module = make_module(tiny_base_dir, data)
    module.skipped_steps = 3
    lean = {k: v for k, v in module.state_dict().items() if k.startswith("compensation.")}
    module.on_load_checkpoint({"state_dict": lean})  # no base_model, plugin or skipped_steps: an older run's
    assert module.skipped_steps == 0


# ------------------------------------------------------------------------------------------------------ skipping
def test_a_training_step_leaves_the_global_generator_where_it_was(tiny_base_dir, data, stand_in_trainer):  # noqa: F811
    module = make_module(tiny_base_dir, data)
    stand_in_trainer(module, accumulate_grad_batches=1, world_size=1, estimated_stepping_batches=100, global_step=0)
    batch = first_batch(data)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    module.training_step(batch, 0)
    assert torch.equal(torch.rand(3), expected)  # the data order and anything else seeded globally is undisturbed


def test_in_raise_mode_a_non_finite_loss_on_another_rank_is_named_as_such(tiny_base_dir, data,  # noqa: F811
                                                                          stand_in_trainer):
    module = make_module(tiny_base_dir, data, nonfinite_loss="raise")
    trainer = stand_in_trainer(module, accumulate_grad_batches=1, world_size=2, estimated_stepping_batches=4,
                               global_step=0)
    trainer.strategy.reduce_boolean_decision = lambda decision, all=True: False if all else True
    with pytest.raises(FloatingPointError, match=r"non-finite loss on another rank at step 0 \(this rank: \{'ce': "):
        module.training_step(first_batch(data), 0)


def test_a_step_skipped_for_a_non_finite_gradient_logs_the_running_count(tiny_base_dir, data,  # noqa: F811
                                                                         stand_in_trainer, monkeypatch):
    module = make_module(tiny_base_dir, data)
    stand_in_trainer(module, accumulate_grad_batches=1, world_size=1, estimated_stepping_batches=4, global_step=0)
    logged = []
    monkeypatch.setattr(module, "log", lambda name, value, **kwargs: logged.append((name, value)))
    parameter = next(p for p in module.compensation.parameters() if p.requires_grad)
    parameter.grad = torch.full_like(parameter, float("nan"))
    stepped = []
    for _ in range(2):
        module.optimizer_step(0, 0, SimpleNamespace(step=lambda closure: stepped.append(1)), lambda: torch.tensor(1.0))
    assert stepped == [] and logged == [("train/skipped_steps", 1.0), ("train/skipped_steps", 2.0)]


# ------------------------------------------------------------------------------------------------------ the plug-in base
def test_the_plugins_generation_stops_at_the_end_id_and_pads_after_it(tiny_base_dir, data):  # noqa: F811
    module = make_module(tiny_base_dir, data)  # RCP generates with Compensation's own generate
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    free = module.compensation.generate(module.engine, batch, 0.5, 4, None, 0)
    assert free.tokens.shape == (batch["prompt_input_ids"].shape[0], 4)  # no end id: every row runs its 4 steps
    end = int(free.tokens[0, 0])  # the first answer's first token, made the end id
    pad = next(i for i in range(1, 1000) if i not in free.tokens.tolist() and i != end)
    stopped = module.compensation.generate(module.engine, batch, 0.5, 4, end, pad)
    assert stopped.tokens[0].tolist() == [end, pad, pad, pad]
    unpruned = module.compensation.generate(module.engine, batch, 0.0, 4, None, 0)
    # the ratio reaches the plug-in's method: at 0.5 its pruners remove visual tokens that 0.0 keeps
    assert free.visual_tokens_per_layer.sum() < unpruned.visual_tokens_per_layer.sum()


def test_a_plugin_without_settings_exports_its_weights_and_an_empty_config(tiny_base_dir, data, tmp_path):  # noqa: F811
    import json

    from safetensors.torch import load_file

    from lightning_modules.compensation import export_plugin_weights

    module = CompensationModule(str(tiny_base_dir), StubPlugin(), processor=data.processor)
    path = export_plugin_weights(module.compensation, tmp_path / "stub.safetensors", {"base_fingerprint": "f"})
    assert set(load_file(path)) == {"layer.weight", "layer.bias"}
    assert json.loads(Path(f"{path}.json").read_text()) == {"plugin": "stub", "config": {}, "base_fingerprint": "f"}


def test_copy_weights_copies_parameters_and_buffers_and_refuses_modules_shaped_otherwise():
    from lvlm_prune.compensation import copy_weights

    def model(rows):
        module = nn.Sequential(nn.Linear(4, rows), nn.BatchNorm1d(rows))
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.copy_(torch.randn(tensor.shape) if tensor.is_floating_point() else tensor + 5)
        return module

    source, target = model(3), model(3)
    copy_weights(source, target)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(ValueError, match="copy_weights: the two modules are not partitioned alike"):
        copy_weights(model(1), model(3))  # (1, 4) would broadcast silently into (3, 4)
    partitioned = model(3)
    partitioned[0].weight.ds_tensor = partitioned[0].weight.data.flatten()  # a ZeRO-3 partition beside a whole weight
    with pytest.raises(ValueError, match="not partitioned alike"):
        copy_weights(partitioned, model(3))


def test_fit_start_probes_the_export_directory_on_rank_zero_only(tiny_base_dir, data, tmp_path):  # noqa: F811
    export = tmp_path / "runs" / "export"
    module = make_module(tiny_base_dir, data, plugin_export_path=str(export / "plugin.safetensors"))
    try:
        module.trainer = SimpleNamespace(strategy=SimpleNamespace(), is_global_zero=False, logger=None)
        module.on_fit_start()
        assert not export.exists()  # another rank: no directory made, no probe file left
        module.trainer = SimpleNamespace(strategy=SimpleNamespace(), is_global_zero=True, logger=None)
        module.on_fit_start()
        assert export.is_dir()
    finally:
        module.trainer = None


def test_plugin_weights_load_without_a_base_to_compare_whatever_base_they_record(tiny_base_dir, data, tmp_path):  # noqa: F811
    import warnings

    from lightning_modules.compensation import export_plugin_weights, load_plugin_weights

    module = make_module(tiny_base_dir, data)
    path = export_plugin_weights(module.compensation, tmp_path / "plugin.safetensors",
                                 {"base_model_path": "/another/base", "base_fingerprint": "0123456789abcdef"})
    fresh = make_module(tiny_base_dir, data).compensation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_plugin_weights(fresh, path)  # no base fingerprints given: nothing to compare, no warning
    assert all(torch.equal(v, module.compensation.state_dict()[k]) for k, v in fresh.state_dict().items())
