"""CompensationModule's guards and bookkeeping: its settings checks, a skipped step under several processes, a
non-finite gradient in raise mode, per-step noise seeds, unexpected or missing plug-in weights, re-export after a
finished run, and the base fingerprint."""

from types import SimpleNamespace

import pytest
import torch

from ops_helpers import one_thread  # noqa: F401  (fixture)
from test_frozen_base_training import data, make_module, make_trainer, poison_step  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_zero_learning_rate_and_a_negative_final_ratio_are_named(tiny_base_dir, data):  # noqa: F811
    from lightning_modules.compensation import CompensationModule
    from lvlm_prune.rcp.compensation import RCPCompensation

    def module(**kwargs):
        return CompensationModule(str(tiny_base_dir), RCPCompensation(target_prune_ratio=0.5, pruning_layers=[1]),
                                  processor=data.processor, **kwargs)

    with pytest.raises(ValueError, match=r"learning_rate=0.0 must be > 0"):
        module(learning_rate=0.0)
    with pytest.raises(ValueError, match=r"model.final_lr_ratio=-0.1 in \[0, 1\]"):
        module(final_lr_ratio=-0.1)


def test_under_several_processes_a_skipped_step_backpropagates_zero_but_does_not_step(tiny_base_dir, data,  # noqa: F811
                                                                                     stand_in_trainer):
    module = make_module(tiny_base_dir, data)
    stand_in_trainer(module, accumulate_grad_batches=1, world_size=2, estimated_stepping_batches=4, global_step=0)
    poison_step(module, step=0)
    loss = module.training_step(next(iter(data.train_dataloader())), 0)
    assert loss is not None and float(loss) == 0.0 and module._skip_step  # a zero loss completes the all-reduce
    stepped = []
    module.optimizer_step(0, 0, SimpleNamespace(step=lambda closure: stepped.append(1)), lambda: loss)
    assert stepped == [] and module.skipped_steps == 1


def test_a_non_finite_gradient_stops_the_run_in_raise_mode(tiny_base_dir, data, tmp_path):  # noqa: F811
    module = make_module(tiny_base_dir, data, nonfinite_loss="raise")
    parameter = next(p for p in module.compensation.parameters() if p.requires_grad)
    parameter.register_hook(lambda grad: grad * float("nan") if module.trainer.global_step == 1 else grad)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient at step 1; set model.nonfinite_loss=skip"):
        make_trainer(tmp_path, max_steps=3).fit(module, datamodule=data)


def test_each_step_and_rank_draws_its_own_noise_and_a_resumed_step_the_same(tiny_base_dir, data, monkeypatch):  # noqa: F811
    module = make_module(tiny_base_dir, data)
    where = {"step": 0, "rank": 0}
    monkeypatch.setattr(type(module), "global_step", property(lambda self: where["step"]))
    monkeypatch.setattr(type(module), "global_rank", property(lambda self: where["rank"]))
    seeds = {}
    for step in (0, 1, 4):
        for rank in (0, 1):
            where.update(step=step, rank=rank)
            seeds[step, rank] = module._step_seed(0)
    assert len(set(seeds.values())) == len(seeds)  # every (step, rank) its own draw at the same batch index
    where.update(step=1, rank=0)
    assert module._step_seed(0) == seeds[1, 0] and module._step_seed(1) != seeds[1, 0]


def test_a_checkpoint_with_plugin_weights_the_configuration_lacks_is_named(tiny_base_dir, data):  # noqa: F811
    module = make_module(tiny_base_dir, data)
    state = {k: v for k, v in module.state_dict().items() if k.startswith("compensation.")}
    extra = dict(state, **{"compensation.pruners.9.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"unexpected \['compensation.pruners.9.weight'\]"):
        module.on_load_checkpoint({"state_dict": extra})
    module.on_load_checkpoint({"state_dict": state})


def test_a_finished_run_resumed_without_a_sweep_exports_its_plugin_again(tiny_base_dir, data, tmp_path):  # noqa: F811
    from lightning.pytorch.callbacks import ModelCheckpoint
    from safetensors.torch import load_file

    plugin = tmp_path / "plugin.safetensors"
    checkpointing = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    make_trainer(tmp_path, max_steps=2, callbacks=[checkpointing], checkpoint=True).fit(
        make_module(tiny_base_dir, data, plugin_export_path=str(plugin)), datamodule=data)
    first = load_file(plugin)
    plugin.unlink()  # killed after the final checkpoint, before the export
    resumed = make_module(tiny_base_dir, data, plugin_export_path=str(plugin))
    make_trainer(tmp_path, max_steps=2).fit(resumed, datamodule=data, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    again = load_file(plugin)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_plugin_weights_that_are_missing_or_lack_an_entry_are_named(tiny_base_dir, data, tmp_path):  # noqa: F811
    from safetensors.torch import save_file

    from lightning_modules.compensation import load_plugin_weights

    module = make_module(tiny_base_dir, data)
    with pytest.raises(FileNotFoundError, match=r"nothing.safetensors' do not exist \(model.plugin_weights_path\)"):
        load_plugin_weights(module.compensation, tmp_path / "nothing.safetensors")
    state = {k: v.clone() for k, v in module.compensation.state_dict().items()}
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=rf"do not fit this rcp configuration: missing \['{dropped}'\]"):
        load_plugin_weights(module.compensation, tmp_path / "partial.safetensors")


def test_plugin_weights_recording_the_older_path_dependent_fingerprint_load_without_a_warning(
        tiny_base_dir, data, tmp_path):  # noqa: F811
    import warnings

    from lightning_modules.compensation import export_plugin_weights, fingerprints

    module = make_module(tiny_base_dir, data)
    legacy = fingerprints(module.base)[1]
    assert legacy != module.base_fingerprint
    with torch.no_grad():  # trained weights, not the ones a fresh plug-in starts from
        for parameter in module.compensation.parameters():
            parameter.add_(0.5)
    path = export_plugin_weights(module.compensation, tmp_path / "plugin.safetensors",
                                 {"base_model_path": str(tiny_base_dir), "base_fingerprint": legacy})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = make_module(tiny_base_dir, data, plugin_weights_path=str(path))
    exported = module.compensation.state_dict()
    assert loaded.compensation.state_dict().keys() == exported.keys()
    assert all(torch.equal(value, exported[name]) for name, value in loaded.compensation.state_dict().items())
    # the fingerprint that would make a warning: another base's (the current one, changed)
    other = export_plugin_weights(module.compensation, tmp_path / "other.safetensors",
                                  {"base_model_path": str(tiny_base_dir), "base_fingerprint": "0" * len(legacy)})
    with pytest.warns(UserWarning, match=r"were trained on the base at"):
        make_module(tiny_base_dir, data, plugin_weights_path=str(other))


def test_the_fingerprint_covers_the_last_values_of_every_tensor(tiny_base_dir):
    from lightning_modules.compensation import fingerprints
    from lvlm_prune.modeling.loading import load_base_model

    base = load_base_model(tiny_base_dir)
    before = fingerprints(base)
    name, tensor = next((n, t) for n, t in base.state_dict().items() if t.numel() > 8 and t.is_floating_point())
    with torch.no_grad():
        tensor.view(-1)[-1] += 1.0  # a base that differs from the other only at a tensor's end
    after = fingerprints(base)
    assert after[0] != before[0] and after[1] != before[1], name
