"""Units of the frozen-base module and of the strategy plug-ins that the module-level tests leave loose: the
processor-against-base checks, crop sizes, method options, evaluation logs and answer records; the DeepSpeed
strategy's staged checkpoint directory, strict loading of lean checkpoints and CPU set-up, with a stand-in DeepSpeed
engine; atomic checkpoint files."""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import pytest
import torch
from torch import nn

from test_lightning_modules import base_module, eval_batch
from test_lightning_units import logged_calls, processor  # noqa: F401 (a fixture)


# ---------------------------------------------------------------------------------------------------- frozen_base.py
def fake_base(image_token_id=None, image_token_index=None, rows=1000, image_size=32):
    """What `check_processor_matches_base` reads of a base: its config and embedding size."""
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=image_size))
    if image_token_id is not None:
        config.image_token_id = image_token_id
    if image_token_index is not None:
        config.image_token_index = image_token_index
    return SimpleNamespace(config=config, get_input_embeddings=lambda: SimpleNamespace(num_embeddings=rows))


def image_processor(crop=None, **fields):
    return SimpleNamespace(crop_size={"height": 32, "width": 32} if crop is None else crop, **fields)


def test_the_processor_is_checked_against_the_base_however_each_names_its_image_token(processor):
    from lightning_modules.frozen_base import check_processor_matches_base

    tokenizer = processor.tokenizer
    image = tokenizer.convert_tokens_to_ids("<image>")
    # an older processor class: the image token by name only, its id from the tokenizer
    by_name = SimpleNamespace(tokenizer=tokenizer, image_token="<image>", image_processor=image_processor())
    with pytest.raises(ValueError, match=rf"image token '<image>' has id {image}, the base model's "
                                         rf"config.image_token_id is {image + 1}"):
        check_processor_matches_base(by_name, fake_base(image_token_id=image + 1), "base")
    # an older config: `image_token_index`
    with pytest.raises(ValueError, match=rf"config.image_token_id is {image + 2}"):
        check_processor_matches_base(by_name, fake_base(image_token_index=image + 2), "base")
    check_processor_matches_base(by_name, fake_base(image_token_index=image), "base")
    # a processor without an image token: nothing to compare it with
    plain = SimpleNamespace(tokenizer=tokenizer, image_processor=image_processor())
    check_processor_matches_base(plain, fake_base(image_token_id=image + 1), "base")


def test_a_tokenizer_one_token_larger_than_the_embedding_or_a_non_square_crop_is_refused(processor):
    from lightning_modules.frozen_base import check_processor_matches_base

    size = len(processor.tokenizer)
    check_processor_matches_base(processor, fake_base(rows=size), "base")
    with pytest.raises(ValueError, match=rf"tokenizer has {size} tokens, more than the base model's {size - 1} "):
        check_processor_matches_base(processor, fake_base(rows=size - 1), "base")
    tall = SimpleNamespace(tokenizer=processor.tokenizer, image_processor=image_processor({"height": 32, "width": 48}))
    with pytest.raises(ValueError, match=r"crops images to 32 x 48 pixels, the base model's vision tower takes 32"):
        check_processor_matches_base(tall, fake_base(), "base")


def test_a_mismatch_names_where_the_processor_came_from(processor):
    from lightning_modules.frozen_base import check_processor_matches_base

    class Built:  # a tokenizer the datamodule built: no path it was loaded from
        name_or_path = ""

        def __len__(self):
            return 10

    unnamed = SimpleNamespace(tokenizer=Built(), image_processor=None)
    with pytest.raises(ValueError, match=r"the processor was built by the datamodule, the base from 'base/dir'"):
        check_processor_matches_base(unnamed, fake_base(rows=5), "base/dir")


@pytest.mark.parametrize("processor_fields, expected", [
    ({}, (32, 32)),  # no `do_center_crop` at all: its crop size is what the tower gets
    ({"do_center_crop": False}, None),
    ({"crop": {"height": 24, "width": 40}}, (24, 40)),
    ({"crop": 336}, None),  # an old-style single number: not a (height, width) crop
    ({"crop": {"height": 32}}, None),
    ({"crop": {"height": 32.0, "width": 32.0}}, None),
])
def test_the_crop_size_is_height_then_width_of_a_centre_crop_only(processor_fields, expected):
    from lightning_modules.frozen_base import crop_size

    assert crop_size(image_processor(**processor_fields)) == expected


def test_method_options_take_any_mapping_are_kept_as_plain_dicts_and_a_ratio_or_bad_type_is_named():
    from lightning_modules.frozen_base import checked_method_options

    checked = checked_method_options(MappingProxyType({"fastv": MappingProxyType({"layer": 2})}))
    assert checked == {"fastv": {"layer": 2}} and type(checked["fastv"]) is dict
    with pytest.raises(ValueError, match=r"model.method_options.fastv.prune_ratio is not an option of fastv"):
        checked_method_options({"fastv": {"prune_ratio": 0.5}})
    with pytest.raises(ValueError, match=r"model.method_options.visionzip=\{'dominant_fraction': 'most'\}: "):
        checked_method_options({"visionzip": {"dominant_fraction": "most"}})


@pytest.fixture
def frozen_module(tiny_base_dir, processor):
    from lightning_modules.frozen_base import FrozenBaseModule

    return FrozenBaseModule(str(tiny_base_dir), processor, categories=["count"], eval_method="fastv",
                            eval_prune_ratio=0.5)


def test_a_fit_checks_the_evaluation_setting_before_any_work(tiny_base_dir, processor):
    from lightning_modules.frozen_base import FrozenBaseModule

    with pytest.raises(ValueError, match=r"model.processor is missing: it is linked from the datamodule"):
        FrozenBaseModule(str(tiny_base_dir), None)
    module = FrozenBaseModule(str(tiny_base_dir), processor, eval_method="full", eval_prune_ratio=0.5)
    with pytest.raises(ValueError, match=r"model.eval_method='full' at model.eval_prune_ratio=0.5: method 'full'"):
        module.setup("fit")


def test_evaluation_logs_the_mean_visual_tokens_per_answered_item(frozen_module):
    logged = logged_calls(frozen_module)
    tokens = SimpleNamespace(visual_tokens_per_layer=torch.tensor([[16.0, 16.0, 8.0, 8.0], [16.0, 16.0, 4.0, 4.0]]))
    frozen_module.run_method = lambda batch, name, ratio: (["yes", "no"], tokens, 0.0)
    frozen_module._evaluate(eval_batch(), "test")
    value, kwargs = logged["test/avg_visual_tokens"]
    assert float(value) == pytest.approx(11.0) and kwargs["batch_size"] == 2


def test_both_modules_log_accuracy_per_category_of_the_data(tiny_base_dir, frozen_module):
    base = base_module(tiny_base_dir)  # categories color and count
    base.generate = lambda batch: ["yes", "yes"]
    frozen_module.run_method = lambda batch, name, ratio: (["yes", "yes"], SimpleNamespace(
        visual_tokens_per_layer=torch.ones(2, 4)), 0.0)
    for module in (base, frozen_module):
        logged = logged_calls(module)
        module._evaluate(eval_batch(), "val")
        module.on_validation_epoch_end()
        assert logged["val/acc"][0] == 0.5 and logged["val/acc/count"][0] == 0.5


def test_run_method_answers_and_times_the_generation(frozen_module, monkeypatch):
    from lightning_modules import frozen_base

    clock = iter([10.0, 12.5])
    monkeypatch.setattr(frozen_base.time, "perf_counter", lambda: next(clock))
    tokenizer = frozen_module.tokenizer
    answer = tokenizer.convert_tokens_to_ids(["yes"])
    frozen_module.generate_with = lambda batch, name, ratio: SimpleNamespace(tokens=torch.tensor([answer]))
    answers, _, seconds = frozen_module.run_method({}, "fastv", 0.5)
    assert answers == ["yes"] and seconds == 2.5


def test_test_and_predict_records_name_the_method_and_ratio_and_a_test_epoch_starts_empty(frozen_module):
    logged_calls(frozen_module)
    tokens = SimpleNamespace(visual_tokens_per_layer=torch.ones(2, 4))
    frozen_module.run_method = lambda batch, name, ratio: (["yes", "no"], tokens, 0.0)
    frozen_module.on_test_epoch_start()
    frozen_module.test_step(eval_batch(), 0)
    frozen_module.on_test_epoch_start()
    frozen_module.test_step(eval_batch(), 0)
    assert [(r["question_id"], r["model_id"]) for r in frozen_module.test_predictions] == [
        ("a", "fastv@r=0.5"), ("b", "fastv@r=0.5")]
    assert {r["model_id"] for r in frozen_module.predict_step(eval_batch(), 0)} == {"fastv@r=0.5"}


def test_a_checkpoint_without_a_state_dict_is_not_foreign(frozen_module):
    """DeepSpeed hands the module its client state, from which the weights were left out."""
    frozen_module.on_load_checkpoint({"global_step": 3})
    frozen_module.on_load_checkpoint({"state_dict": None})
    own = next(iter(frozen_module.state_dict()))
    frozen_module.on_load_checkpoint({"state_dict": {own: torch.zeros(1)}})  # its own modules: not foreign either
    # what the check is for: modules of another class are named
    with pytest.raises(ValueError, match=r"^this checkpoint holds modules \['compensation'\] that FrozenBaseModule "
                                         r"does not have"):
        frozen_module.on_load_checkpoint({"state_dict": {own: torch.zeros(1), "compensation.w": torch.zeros(1)}})


# ---------------------------------------------------------------------------------------------------- strategies.py
class StandInEngine:
    """DeepSpeed's engine as the strategy drives it: `save_checkpoint` writes a shard (holding the client state's
    `step`) under the tag and the `latest` file; `load_checkpoint` hands `weights` to the custom load function."""

    def __init__(self, weights=None, client_state=None):
        self.weights, self.client_state, self.load_kwargs = weights, client_state, None

    def save_checkpoint(self, save_dir, client_state, tag, exclude_frozen_parameters):
        save_dir = Path(save_dir)
        (save_dir / tag).mkdir(parents=True)
        (save_dir / tag / "mp_rank_00_model_states.pt").write_text(str(client_state["step"]))
        (save_dir / "latest").write_text(tag)

    def load_checkpoint(self, path, custom_load_fn, **kwargs):
        self.load_kwargs = kwargs
        custom_load_fn(self.weights, self.module)
        return path, self.client_state


def deepspeed_strategy(engine=None, global_rank=0, local_rank=0, **kwargs):
    from lightning_modules.strategies import CPUDeepSpeedStrategy

    strategy = CPUDeepSpeedStrategy(**{"stage": 2, **kwargs})
    strategy.cluster_environment = SimpleNamespace(global_rank=lambda: global_rank, local_rank=lambda: local_rank,
                                                   node_rank=lambda: 0, world_size=lambda: 1)
    strategy.model = engine
    return strategy


def shard_step(directory):
    return (directory / "checkpoint" / "mp_rank_00_model_states.pt").read_text()


def test_a_deepspeed_save_replaces_the_last_one_whole_and_clears_what_killed_saves_left(tmp_path):
    target = tmp_path / "last.ckpt"
    strategy = deepspeed_strategy(StandInEngine())
    strategy.save_checkpoint({"step": 1}, target)
    assert shard_step(target) == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # a save killed while writing left shards in the staging directory; one killed between the renames left the
    # directory the run resumed from under `.previous`
    (tmp_path / ".last.ckpt.saving" / "checkpoint").mkdir(parents=True)
    (tmp_path / ".last.ckpt.saving" / "checkpoint" / "zero_pp_rank_1_optim_states.pt").write_text("step 0")
    (tmp_path / ".last.ckpt.previous" / "checkpoint").mkdir(parents=True)
    strategy.save_checkpoint({"step": 2}, target)
    assert shard_step(target) == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in (target / "checkpoint").iterdir()) == ["mp_rank_00_model_states.pt"]


def test_the_renames_of_a_deepspeed_save_are_done_once_per_node_with_node_local_storage(tmp_path):
    """Rank 2, the first of its node: with node-local storage its node's copy is its to rename; with shared storage
    it is global rank 0's (which here never comes: the staged save stays unrenamed)."""
    shared = deepspeed_strategy(StandInEngine(), global_rank=2, local_rank=0)
    shared.save_checkpoint({"step": 1}, tmp_path / "shared.ckpt")
    assert not (tmp_path / "shared.ckpt").exists() and (tmp_path / ".shared.ckpt.saving").is_dir()
    local = deepspeed_strategy(StandInEngine(), global_rank=2, local_rank=0,
                               config={"checkpoint": {"use_node_local_storage": True}, "zero_optimization": {}})
    local.save_checkpoint({"step": 1}, tmp_path / "local.ckpt")
    assert shard_step(tmp_path / "local.ckpt") == "1" and not (tmp_path / ".local.ckpt.saving").exists()


def test_every_rank_saves_where_rank_zero_says(tmp_path):
    """This rank's own path (another time stamp, say) gives way to rank zero's."""
    ours, rank_zero = tmp_path / "last.ckpt", tmp_path / "rank0" / "last.ckpt"
    strategy = deepspeed_strategy(StandInEngine())
    strategy.broadcast = lambda value, src=0: str(rank_zero) if str(value) == str(ours) else value
    rank_zero.parent.mkdir()
    strategy.save_checkpoint({"step": 1}, ours)
    assert shard_step(rank_zero) == "1" and not ours.exists()


class Plug(nn.Module):
    """A module with a trained and a frozen layer, attached to a stand-in trainer in `fn`."""

    def __init__(self, fn):
        super().__init__()
        self.trained, self.frozen = nn.Linear(2, 2), nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.trainer = SimpleNamespace(state=SimpleNamespace(fn=fn))


def lean_load(tmp_path, weights, fn=None, client_state=..., module=None):
    """Loads `weights` through the strategy's lean (exclude_frozen_parameters) DeepSpeed path; returns the engine
    and the client state."""
    from lightning.pytorch.trainer.states import TrainerFn

    (tmp_path / "last.ckpt" / "checkpoint").mkdir(parents=True, exist_ok=True)
    engine = StandInEngine(weights, {"global_step": 3} if client_state is ... else client_state)
    engine.module = Plug(fn or TrainerFn.FITTING) if module is None else module
    strategy = deepspeed_strategy(engine, exclude_frozen_parameters=True)
    strategy._lightning_module = engine.module
    return engine, strategy.load_checkpoint(tmp_path / "last.ckpt")


def test_a_lean_deepspeed_checkpoint_loads_the_trained_weights_strictly_and_the_optimiser_only_to_fit(tmp_path):
    from lightning.pytorch.trainer.states import TrainerFn

    weights = {"trained.weight": torch.full((2, 2), 5.0), "trained.bias": torch.ones(2)}
    engine, client = lean_load(tmp_path, weights)  # the frozen layer is not in it: it comes from the model as built
    assert client == {"global_step": 3} and torch.equal(engine.module.trained.weight, weights["trained.weight"])
    assert engine.load_kwargs == {"load_optimizer_states": True, "load_lr_scheduler_states": False}
    engine, _ = lean_load(tmp_path, weights, fn=TrainerFn.VALIDATING)
    assert engine.load_kwargs["load_optimizer_states"] is False
    with pytest.raises(RuntimeError, match=r"does not fit this model: missing \['trained.bias'\], unexpected \[\]"):
        lean_load(tmp_path, {"trained.weight": torch.ones(2, 2)})
    with pytest.raises(RuntimeError, match=r"does not fit this model: missing \[\], unexpected \['other.weight'\]"):
        lean_load(tmp_path, {**weights, "other.weight": torch.ones(1)})
    with pytest.raises(RuntimeError, match=r"DeepSpeed found no checkpoint in"):
        lean_load(tmp_path, weights, client_state=None)


def test_a_lean_deepspeed_checkpoint_without_the_frozen_weights_a_plugin_needs_is_named(tmp_path):
    from lightning.pytorch.trainer.states import TrainerFn

    module = Plug(TrainerFn.FITTING)
    module.compensation = nn.Module()
    module.compensation.reference = nn.Linear(2, 2).requires_grad_(False)
    module.compensation.frozen_weights_needed = lambda: ["reference.weight"]
    weights = {"trained.weight": torch.ones(2, 2), "trained.bias": torch.ones(2)}
    with pytest.raises(RuntimeError, match=r"lacks frozen plug-in weights the run needs \(1, e.g. "
                                           r"'compensation.reference.weight'\)"):
        lean_load(tmp_path, weights, module=module)


@pytest.mark.parametrize("settings", [{"exclude_frozen_parameters": False},
                                      {"exclude_frozen_parameters": True, "stage": 3, "load_full_weights": True}])
def test_checkpoints_holding_every_weight_load_the_stock_way(settings, tmp_path, monkeypatch):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    monkeypatch.setattr(DeepSpeedStrategy, "load_checkpoint", lambda self, path, weights_only=None: {"stock": path})
    assert deepspeed_strategy(**settings).load_checkpoint(tmp_path) == {"stock": tmp_path}


def test_on_cpu_deepspeed_gets_the_trainable_parameters_and_this_process_s_rank_as_its_device(monkeypatch):
    import deepspeed

    asked = {}

    def initialize(**kwargs):
        asked.update(kwargs, model_parameters=list(kwargs["model_parameters"]))
        return "engine", "optimizer", None, None

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    module = Plug(None)
    strategy = deepspeed_strategy(local_rank=1)
    assert strategy._setup_model_and_optimizer(module, "adamw") == ("engine", "optimizer")
    assert asked["model_parameters"] == [module.trained.weight, module.trained.bias]
    assert asked["args"].device_rank == 1 and asked["optimizer"] == "adamw" and asked["dist_init_required"] is False


def test_on_cpu_deepspeed_inference_gets_this_process_s_rank_as_its_device(monkeypatch):
    import deepspeed
    from lightning.pytorch.strategies import DeepSpeedStrategy

    def stock_initialize(**kwargs):
        return kwargs["args"].device_rank

    def stock_inference(self, model):  # Lightning's: `root_device.index`, None on CPU
        return deepspeed.initialize(args=SimpleNamespace(device_rank=None), model=model)

    monkeypatch.setattr(deepspeed, "initialize", stock_initialize)
    monkeypatch.setattr(DeepSpeedStrategy, "_initialize_deepspeed_inference", stock_inference)
    assert deepspeed_strategy(local_rank=1)._initialize_deepspeed_inference(nn.Linear(1, 1)) == 1
    assert deepspeed.initialize is stock_initialize  # put back


def test_on_cpu_the_environment_is_set_up_without_the_cuda_check_and_reseeded_from_the_global_seed(monkeypatch):
    import random

    from lightning.pytorch.accelerators import CPUAccelerator

    from lightning_modules.strategies import CPUDeepSpeedStrategy

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    monkeypatch.setenv("PL_SEED_WORKERS", "0")
    initialised = []
    monkeypatch.setattr(CPUDeepSpeedStrategy, "_init_deepspeed_distributed", lambda self: initialised.append(True))
    strategy = CPUDeepSpeedStrategy(stage=2, accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")])
    state = random.getstate()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            strategy.setup_environment()
            drawn = torch.rand(3)
            torch.manual_seed(7)
            assert torch.equal(drawn, torch.rand(3))
    finally:
        random.setstate(state)
    assert initialised == [True]


def test_the_deepspeed_precision_cast_set_up_for_a_run_leaves_metric_states_alone(monkeypatch):
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from torchmetrics import SumMetric

    monkeypatch.setattr(DeepSpeedStrategy, "setup", lambda self, trainer: None)  # the rest of Lightning's set-up
    strategy = deepspeed_strategy(precision_plugin=DeepSpeedPrecision("bf16-true"))
    strategy.setup(None)
    module = nn.Module()
    module.linear, module.total = nn.Linear(2, 2), SumMetric()
    module.total.set_dtype(torch.float64)
    strategy.precision_plugin.convert_module(module)
    assert module.linear.weight.dtype == torch.bfloat16 and module.total.sum_value.dtype == torch.float64


def test_an_atomic_checkpoint_goes_into_a_directory_that_does_not_exist_yet(tmp_path):
    from lightning_modules.strategies import AtomicCheckpointIO

    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 4}, path)
    assert torch.load(path, weights_only=True) == {"step": 4} and os.listdir(path.parent) == ["last.ckpt"]


def test_a_new_fit_replaces_a_last_checkpoint_of_the_other_kind(tmp_path):
    """An earlier fit in the run directory under another strategy left `last.ckpt` as a file, or as DeepSpeed's
    directory: the next saves replace it, save after save, and leave nothing beside it."""
    from lightning_modules.strategies import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 0}, target)
    strategy = deepspeed_strategy(StandInEngine())
    for step in (1, 2):
        strategy.save_checkpoint({"step": step}, target)
        assert shard_step(target) == str(step) and os.listdir(tmp_path) == ["last.ckpt"]
    AtomicCheckpointIO().save_checkpoint({"step": 3}, target)
    assert torch.load(target, weights_only=True) == {"step": 3} and os.listdir(tmp_path) == ["last.ckpt"]
