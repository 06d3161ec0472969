"""Sweep settings that can be checked at the start fail there, naming the setting: an empty sweep, the FLOPs
convention, misspelt method options (at module init) and a method configuration no ratio can run (at setup); a
ratio a method cannot reach on this depth is still an 'unreachable' row."""

import csv
from types import SimpleNamespace

import lightning as L
import pytest

from callbacks.sweep import PruningSweep
from conftest import TINY_DATA_ARGS
from datamodules.synthetic import SyntheticVQADataModule
from lightning_modules.compensation import CompensationModule
from lightning_modules.frozen_base import FrozenBaseModule
from lvlm_prune.rcp.compensation import RCPCompensation


@pytest.fixture(scope="module")
def data(tiny_base_dir):
    return SyntheticVQADataModule(processor_path=str(tiny_base_dir), **TINY_DATA_ARGS)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("methods", [[], ()])
def test_a_sweep_without_methods_is_refused(methods):
    with pytest.raises(ValueError, match=r"sweep methods=\[\] \(PruningSweep init_args\.methods\) is empty"):
        PruningSweep(methods=methods)


def test_a_sweep_without_ratios_is_refused_unless_it_only_runs_full():
    with pytest.raises(ValueError, match=r"sweep prune_ratios=\[\] \(PruningSweep init_args\.prune_ratios\) is empty, "
                                         r"so \['random', 'fastv'\] would not run"):
        PruningSweep(methods=["random", "fastv"], prune_ratios=[])
    assert PruningSweep(methods=["full"], prune_ratios=[]).pairs() == [("full", 0.0)]


def test_the_flops_convention_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"sweep flops_convention='FastV' \(PruningSweep init_args\."
                                         r"flops_convention\); choose one of \['fastv', 'exact'\]"):
        PruningSweep(flops_convention="FastV")
    assert PruningSweep(flops_convention="exact").flops_convention == "exact"


def test_a_misspelt_method_option_fails_at_module_init_before_the_base_loads(tmp_path, data):
    # a base directory that does not exist: the options are checked first, not after the load (or the fit)
    missing = str(tmp_path / "no_base")
    with pytest.raises(ValueError, match=r"^model\.method_options\.fastv\.layr is not an option of fastv \(FastV\); "
                                         r"accepted: \['layer'\]$"):
        FrozenBaseModule(missing, processor=data.processor, method_options={"fastv": {"layr": 1}})
    with pytest.raises(ValueError, match=r"model\.method_options\.full\.seed is not an option of full .*: none"):
        FrozenBaseModule(missing, processor=data.processor, method_options={"full": {"seed": 1}})
    with pytest.raises(ValueError, match=r"model\.method_options names unknown methods \['fastvv'\]; "
                                         r"known: \[.*'fastv'"):
        FrozenBaseModule(missing, processor=data.processor, method_options={"fastvv": {}})
    with pytest.raises(ValueError, match=r"model\.method_options\.pdrop must map option names to values, got 3"):
        FrozenBaseModule(missing, processor=data.processor, method_options={"pdrop": 3})
    with pytest.raises(ValueError, match=r"model\.method_options\.visionzip=\{'dominant_fraction': 2\.0\}: visionzip: "
                                         r"dominant_fraction=2\.0 must be in \(0, 1\]"):
        FrozenBaseModule(missing, processor=data.processor, method_options={"visionzip": {"dominant_fraction": 2.0}})
    plugin = RCPCompensation(target_prune_ratio=0.5, pruning_layers=[1])
    with pytest.raises(ValueError, match=r"model\.method_options\.dart\.pivots is not an option of dart \(DART\); "
                                         r"accepted: \['layer', 'num_pivots', 'num_text_pivots'\]"):
        CompensationModule(missing, plugin, processor=data.processor, method_options={"dart": {"pivots": 2}})


def test_a_method_configuration_no_ratio_can_run_fails_at_sweep_setup(tiny_base_dir, data, tmp_path):
    """Stage ends beyond the 4 layers are a configuration error, not an 'unreachable' row for every ratio."""
    module = FrozenBaseModule(str(tiny_base_dir), processor=data.processor, categories=data.categories,
                              max_new_tokens=2, method_options={"pdrop": {"stage_ends": [1, 6, 9]}})
    evaluated = []
    original = module.run_method
    module.run_method = lambda *args: evaluated.append(args[1:]) or original(*args)
    sweep = PruningSweep(methods=["full", "random", "pdrop"], prune_ratios=[0.5], dirpath=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[sweep],
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^sweep method 'pdrop' \(PruningSweep init_args\.methods\) cannot run on "
                                         r"this model at any prune ratio: pdrop: stage_ends=\[1, 6, 9\] must be "
                                         r"increasing layers in \[1, 3\] \(model\.method_options\.pdrop="):
        trainer.test(module, datamodule=data)
    assert evaluated == []  # not a single batch: neither the test loop nor a sweep pair ran
    assert not list(tmp_path.glob("sweep*"))


def test_a_ratio_a_method_cannot_reach_at_this_depth_is_still_an_unreachable_row(tiny_base_dir, data, tmp_path):
    module = FrozenBaseModule(str(tiny_base_dir), processor=data.processor, categories=data.categories,
                              max_new_tokens=2)
    sweep = PruningSweep(methods=["fastv"], prune_ratios=[0.5, 0.9], dirpath=str(tmp_path), limit_batches=1)
    sweep.setup(SimpleNamespace(datamodule=data), module, "validate")  # passes: fastv runs at r = 0.5
    data.setup("test")
    stub = SimpleNamespace(datamodule=data, is_global_zero=True, logger=None, default_root_dir=tmp_path, global_step=0)
    sweep.run(stub, module)
    rows = {float(r["prune_ratio"]): r["status"] for r in read_rows(tmp_path / "sweep.csv")}
    assert rows[0.5] == "ok"
    assert rows[0.9].startswith("unreachable: fastv: prune_ratio=0.9 cannot be reached")
