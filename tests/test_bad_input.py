"""Bad input found by the bad-input audit: each is named, and found before the work it would spoil."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cli import cli_main
from conftest import TINY_DATA_ARGS
from lvlm_prune.archives import torch_archive_problem
from test_cli import TINY_BASE_ARGS, run_dir_args


def flip_bytes_inside(path: Path, offset_fraction: float = 0.5, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * offset_fraction)
    data[start:start + count] = b"\xff" * count
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_flipped_bytes_is_named_before_it_loads(tmp_path):
    checkpoint = tmp_path / "flipped.ckpt"
    torch.save({"state_dict": {"weight": torch.randn(64, 64)}, "global_step": 3}, checkpoint)
    assert torch_archive_problem(checkpoint) is None
    flip_bytes_inside(checkpoint)
    torch.load(checkpoint, weights_only=True)  # what made this dangerous: torch loads the damaged tensor silently
    assert "fails its checksum" in torch_archive_problem(checkpoint)
    with pytest.raises(ValueError, match=r"flipped.ckpt' is not a readable Lightning checkpoint \(corrupt: the "
                                         r"archive member .* fails its checksum\)"):
        cli_main(["test", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                  "--ckpt_path", str(checkpoint)])


def test_the_plugin_export_script_refuses_a_damaged_checkpoint(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from export_plugin import read_checkpoint

    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"compensation.w": torch.randn(64, 64)}}, checkpoint)
    flip_bytes_inside(checkpoint)
    with pytest.raises(ValueError, match="fails its checksum"):
        read_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def rcp_module(tiny_base_dir):
    from datamodules.synthetic import SyntheticVQADataModule
    from lightning_modules.compensation import CompensationModule
    from lvlm_prune.rcp.compensation import RCPCompensation

    data = SyntheticVQADataModule(processor_path=str(tiny_base_dir), **TINY_DATA_ARGS)
    plugin = RCPCompensation(target_prune_ratio=0.75, pruning_layers=[0, 1, 2], repair_layers=[2, 3], bottleneck=16,
                             num_queries=4, context_dim=16, adapter_bottleneck=8)
    return CompensationModule(str(tiny_base_dir), plugin, processor=data.processor, categories=data.categories,
                              learning_rate=1e-3, max_new_tokens=2)


def test_nan_plugin_weights_are_named_in_a_file_and_in_a_checkpoint(rcp_module, tmp_path):
    from lightning_modules.compensation import export_plugin_weights, load_plugin_weights

    state = {k: v.clone() for k, v in rcp_module.compensation.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
    state[name][0, 0] = float("nan")
    path = export_plugin_weights(rcp_module.compensation, tmp_path / "plugin.safetensors", {}, overrides=state)
    with pytest.raises(ValueError, match=rf"plugin.safetensors' \(model.plugin_weights_path\): \['{name}'\] hold NaN"):
        load_plugin_weights(rcp_module.compensation, path)

    checkpoint = {"state_dict": {f"compensation.{k}": v for k, v in state.items()}}
    with pytest.raises(ValueError, match=rf"plug-in weights \['compensation.{name}'\] hold NaN or infinite values"):
        rcp_module.on_load_checkpoint(checkpoint)
    # restored by a trainer, the file is named
    rcp_module._trainer = SimpleNamespace(ckpt_path=str(tmp_path / "last.ckpt"))
    try:
        with pytest.raises(ValueError, match=r"^checkpoint '.*last.ckpt': its plug-in weights"):
            rcp_module.on_load_checkpoint(checkpoint)
    finally:
        rcp_module._trainer = None


@pytest.mark.parametrize("setting", ["pruning_layers", "repair_layers"])
def test_an_empty_layer_list_is_not_silently_the_default(setting):
    from lvlm_prune.rcp.compensation import RCPCompensation

    with pytest.raises(ValueError, match=rf"rcp {setting}=\[\] is empty"):
        RCPCompensation(target_prune_ratio=0.75, **{setting: []})


def test_an_export_directory_that_cannot_be_written_is_named_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"model.init_args.export_dir: cannot write to the directory .*a_file/export"):
        cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                  "--trainer.max_steps", "2", "--model.init_args.export_dir", str(blocker / "export")])
    assert not list(tmp_path.rglob("*.ckpt"))  # it stopped before the first step


def test_an_unwritable_plugin_export_path_is_named_before_training(tiny_base_dir, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "ops"))
    from ops_helpers import tiny_experiment

    config = tiny_experiment(tmp_path / "run", tiny_base_dir, max_steps=2)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"model.init_args.plugin_export_path: cannot write to the directory"):
        cli_main(["fit", "--config", str(config), "--model.init_args.plugin_export_path",
                  str(blocker / "plugin.safetensors")])
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    # a directory where the weights file should go
    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"plugin_export_path '.*exports' is a directory"):
        cli_main(["fit", "--config", str(config), "--model.init_args.plugin_export_path", str(folder)])
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_a_yaml_syntax_error_names_its_config_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  init_args:\n    learning_rate: [1e-3\n")
    with pytest.raises(ValueError, match=r"--config .*broken.yaml: not valid YAML"):
        cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", "--config", str(broken), *TINY_BASE_ARGS])
    with pytest.raises(ValueError, match=r"--config .*broken.yaml: not valid YAML"):  # LightningCLI's short flag
        cli_main(["fit", "-c", str(broken), *TINY_BASE_ARGS])


def test_small_settings_are_named():
    from datamodules.synthetic_vqa import SyntheticVQAConfig
    from lvlm_prune.rcp.compensation import RCPCompensation

    with pytest.raises(ValueError, match=r"train_min_objects=9 must be in \[1, max_objects=5\]"):
        SyntheticVQAConfig(grid=4, min_objects=4, max_objects=5, train_min_objects=9)
    with pytest.raises(ValueError, match=r"train_min_objects=0"):
        SyntheticVQAConfig(grid=4, min_objects=4, max_objects=5, train_min_objects=0)
    with pytest.raises(ValueError, match=r"rcp temperature_start=1.5 and temperature_end=0.0 must both be > 0"):
        RCPCompensation(target_prune_ratio=0.75, temperature_end=0.0)


def test_a_broken_instruction_json_names_line_and_column(tmp_path):
    from datamodules.llava import _load_instruction_file
    from lvlm_prune.evaluation.readers import BadRecords

    broken = tmp_path / "mix.json"
    broken.write_text('[{"id": "a", "conversations": []} {"id": "b"}]')
    with pytest.raises(ValueError, match=r"mix.json: not valid JSON \(Expecting ',' delimiter, line 1 column 35, "
                                         r"character 34\)"):
        list(_load_instruction_file(broken, BadRecords(broken, "error")))


def test_the_base_module_refuses_max_new_tokens_below_one(tmp_path):
    with pytest.raises(ValueError, match=r"model.init_args.max_new_tokens=0 must be at least 1"):
        cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                  "--model.init_args.max_new_tokens", "0"])


def test_a_checkpoint_directory_that_is_not_deepspeeds_is_named(tmp_path):
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(ValueError, match=r"not_a_checkpoint' is a directory but not a DeepSpeed checkpoint"):
        cli_main(["test", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                  "--ckpt_path", str(tmp_path / "not_a_checkpoint")])


@pytest.mark.parametrize("config", ["configs/synthetic/base_describe.yaml", "configs/synthetic/rcp.yaml"])
def test_a_learning_rate_that_is_not_positive_is_named(config, tmp_path, tiny_base_dir):
    extra = [] if "base" in config else ["--model.init_args.base_model_path", str(tiny_base_dir),
                                          "--data.init_args.processor_path", str(tiny_base_dir)]
    args = TINY_BASE_ARGS if "base" in config else ["--data.init_args.grid", "4", "--data.init_args.min_objects", "4",
                                                     "--data.init_args.max_objects", "5"]
    with pytest.raises(ValueError, match=r"model.init_args.learning_rate=-1.0 must be > 0"):
        cli_main(["fit", "--config", config, *args, *extra, "--model.init_args.learning_rate", "-1",
                  "--trainer.default_root_dir", str(tmp_path)])


def test_a_plugin_checkpoint_given_to_the_plain_base_module_is_named(tiny_base_dir, rcp_module):
    from datamodules.synthetic import SyntheticVQADataModule
    from lightning_modules.frozen_base import FrozenBaseModule

    data = SyntheticVQADataModule(processor_path=str(tiny_base_dir), **TINY_DATA_ARGS)
    module = FrozenBaseModule(str(tiny_base_dir), processor=data.processor, categories=data.categories)
    with pytest.raises(ValueError, match=r"holds modules \['compensation'\] that FrozenBaseModule does not have"):
        module.on_load_checkpoint({"state_dict": rcp_module.state_dict()})
    module.on_load_checkpoint({"state_dict": module.state_dict()})  # its own checkpoint loads


def test_packed_batches_are_refused_by_the_pruning_methods_training(rcp_module):
    with pytest.raises(ValueError, match="pack_length to null for RCP and ACCM training"):
        rcp_module.training_step({"packed_rows": [[0, 1]]}, 0)


def spec_with(spec, **changes):
    from lvlm_prune.modeling import TinyLlavaSpec

    fields = spec.to_dict() if isinstance(spec, TinyLlavaSpec) else dict(spec)  # a checkpoint's: a mapping
    return TinyLlavaSpec(**{**fields, **changes})


def test_an_unknown_optimizer_and_muon_under_deepspeed_are_named(tmp_path, capsys):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_modules.base_lvlm import BaseLVLMModule

    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                  "--model.init_args.optimizer", "sgd"])
    error = capsys.readouterr().err
    assert 'Parser key "optimizer"' in error and "Expected a typing.Literal['adamw', 'muon']. Got value: sgd" in error
    cli = cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                    "--model.init_args.optimizer", "muon", "--trainer.fast_dev_run", "1"])
    module = cli.model
    with pytest.raises(ValueError, match=r"model.init_args.optimizer='sgd'; choose one of \['adamw', 'muon'\]"):
        BaseLVLMModule(processor=module.processor, spec=module.hparams.spec, optimizer="sgd")
    # a processor that cuts other patches than the model reads would fail only at the first forward
    with pytest.raises(ValueError, match=r"model.spec.patch_size=4 but the processor's patch_size is 8"):
        BaseLVLMModule(processor=module.processor, spec=spec_with(module.hparams.spec, patch_size=4))
    module.trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    with pytest.raises(ValueError, match="optimizer=muon does not run under DeepSpeedStrategy"):
        module.configure_optimizers()
    from lightning.pytorch.strategies import FSDPStrategy

    assert module.hparams.export_dir
    module.trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), is_global_zero=True)
    with pytest.raises(ValueError, match=r"export_dir: the export gathers DeepSpeed's partitions, not FSDPStrategy's"):
        module.on_fit_start()


def test_a_finished_deepspeed_base_run_resumed_names_how_to_export_its_checkpoint(tmp_path):
    """After fit the strategy is torn down (DeepSpeed's module is on the CPU, where its fp32 master gather fails
    under NCCL): the export that did not run is named, with how to export the checkpoint."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    from datamodules.synthetic import SyntheticVQADataModule
    from lightning_modules.base_lvlm import BaseLVLMModule
    from lvlm_prune.modeling import TinyLlavaSpec

    data = SyntheticVQADataModule(grid=4, cell_size=8, min_objects=4, max_objects=5, num_train=8, num_val=8,
                                  num_test=8)
    spec = TinyLlavaSpec(image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=1, vision_heads=2,
                         hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    module = BaseLVLMModule(processor=data.processor, spec=spec, export_dir=str(tmp_path / "export"))
    module.trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy), global_step=2,
                                     fit_loop=SimpleNamespace(done=True), ckpt_path="run/checkpoints/last.ckpt",
                                     is_global_zero=True)
    module._train_ended = False  # resumed at the end of training: no training loop ran
    with pytest.raises(ValueError, match=r"at step 2, where training had already ended.*export_dir=.*did not run.*"
                                         r"convert_zero_checkpoint_to_fp32_state_dict\('run/checkpoints/last.ckpt'"):
        module.on_fit_end()
    assert not (tmp_path / "export" / "config.json").exists()


def test_resuming_a_muon_checkpoint_with_adamw_is_named(tmp_path):
    args = ["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
            "--trainer.limit_val_batches", "0", "--checkpoint.every_n_train_steps", "1"]
    cli_main([*args, "--model.init_args.optimizer", "muon", "--trainer.max_steps", "1"])
    last = tmp_path / "base_describe" / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"optimizer state is muon's, but model.init_args.optimizer='adamw'"):
        cli_main([*args, "--trainer.max_steps", "2", "--ckpt_path", str(last)])
    cli_main(["test", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
              "--ckpt_path", str(last)])  # evaluation reads the weights only, whatever the optimizer


def test_plain_ddp_with_a_plugin_that_leaves_parameters_unused_is_named_before_training(rcp_module, monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from lvlm_prune.accm.compensation import ACCMCompensation
    from lvlm_prune.rcp.compensation import RCPCompensation

    assert ACCMCompensation.leaves_parameters_unused and not RCPCompensation.leaves_parameters_unused
    strategy = DDPStrategy.__new__(DDPStrategy)
    strategy._model = SimpleNamespace(find_unused_parameters=False)
    monkeypatch.setattr(rcp_module.compensation, "leaves_parameters_unused", True)
    rcp_module.trainer = SimpleNamespace(strategy=strategy)
    try:
        with pytest.raises(ValueError, match="use --trainer.strategy ddp_find_unused_parameters_true"):
            rcp_module.on_fit_start()
    finally:
        rcp_module.trainer = None
