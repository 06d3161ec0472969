"""Units of the LightningModules' shared pieces and of the base module that the module-level tests leave loose:
the writable-directory probe, answer decoding, scoring and logging, the ZeRO-3 helpers (with a stand-in for
DeepSpeed's gather), and the base module's hooks: export, fit start and end, resume checks, lockstep generation,
logging sizes, init_from checks. The frozen-base module and the strategies: test_lightning_units_2.py."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_modules import common
from lightning_modules.common import (
    check_writable_directory,
    decode_answers,
    deepspeed_fp32_masters,
    generates_in_lockstep,
    log_accuracy,
    out_of_memory_advice,
    partitioned,
    score,
    whole_state_dict,
)
from lightning_modules.base_lvlm import BaseLVLMModule
from lvlm_prune.evaluation.metrics import ExactMatchAccuracy
from lvlm_prune.modeling import TinyLlavaSpec
from test_lightning_modules import BASE_SPEC, base_module, eval_batch


class RecordingTokenizer:
    """decode() of a row: its ids joined with spaces, padded with spaces, special tokens (0) kept unless asked."""

    def decode(self, row, skip_special_tokens=False):
        return "  " + " ".join(str(i) for i in row if not (skip_special_tokens and i == 0)) + " \n"


@pytest.fixture(scope="module")
def processor(tiny_base_dir):
    from lvlm_prune.modeling.loading import load_processor

    return load_processor(str(tiny_base_dir))


def logged_calls(module):
    """Replaces `module.log` / `module.log_dict` by recorders; returns {name: (value, kwargs)}."""
    logged = {}
    module.log = lambda name, value, **kwargs: logged.update({name: (value, kwargs)})
    module.log_dict = lambda values, **kwargs: logged.update({k: (v, kwargs) for k, v in values.items()})
    return logged


# ---------------------------------------------------------------------------------------------------- common.py
def test_a_writable_directory_check_creates_missing_parents_and_leaves_no_probe(tmp_path):
    target = tmp_path / "runs" / "a" / "export"
    check_writable_directory(target, "model.init_args.export_dir")
    assert target.is_dir() and list(target.iterdir()) == []


def test_answers_are_decoded_without_special_tokens_and_surrounding_space():
    assert decode_answers(RecordingTokenizer(), torch.tensor([[5, 6, 0], [0, 7, 0]])) == ["5 6", "7"]


def test_an_item_repeated_by_the_sampler_counts_once_but_two_questions_of_one_id_both_count():
    """MME asks two questions about one image under one question id: both count; a distributed sampler's repeat of
    an item (same id, same question) counts once."""
    metric = ExactMatchAccuracy()
    batch = {"question_ids": ["m1", "m1", "m1"], "questions": ["is it red?", "is it blue?", "is it red?"],
             "answers": ["yes", "no", "yes"], "categories": ["c", "c", "c"]}
    score(metric, ["yes", "yes", "yes"], batch)  # right, wrong, and the repeat of the first (right)
    assert float(metric.compute()["acc"]) == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_a_batch_without_reference_answers_scores_nothing_and_logs_nothing():
    metric = ExactMatchAccuracy(categories=["c"])
    score(metric, ["yes"], {"question_ids": ["a"], "questions": ["q"], "answers": [None], "categories": ["c"]})
    module = SimpleNamespace()
    logged = logged_calls(module)
    assert log_accuracy(module, metric, "test") == {} and logged == {}


def test_accuracy_is_logged_on_the_progress_bar_and_the_metric_starts_afresh_each_epoch():
    module = SimpleNamespace()
    logged = logged_calls(module)
    metric = ExactMatchAccuracy(categories=["c"])
    batch = {"question_ids": ["a", "b"], "questions": ["q1", "q2"], "answers": ["x", "y"], "categories": ["c", "c"]}
    score(metric, ["x", "x"], batch)
    assert log_accuracy(module, metric, "val") == {"acc": 0.5, "acc/c": 0.5}
    assert logged["val/acc"] == (0.5, {"prog_bar": True})
    score(metric, ["x", "y"], batch)  # the next epoch: the same items, both right now
    assert log_accuracy(module, metric, "val")["acc"] == 1.0


def test_out_of_memory_advice_keeps_the_original_error_as_its_cause():
    original = torch.OutOfMemoryError("CUDA out of memory.")
    with pytest.raises(torch.OutOfMemoryError) as raised:
        with out_of_memory_advice("the training step"):
            raise original
    assert raised.value.__cause__ is original


def test_zero3_helpers_outside_deepspeed():
    """Without ZeRO-3 partitions no master copies exist and the state dict is a CPU copy of the weights, on the
    ranks that keep it; one partitioned weight is enough to make a module partitioned."""
    plain, marked = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    marked.ds_id = 0
    assert not partitioned([plain]) and partitioned([plain, marked])
    layer = nn.Linear(2, 2)
    assert deepspeed_fp32_masters(SimpleNamespace(), layer) == {}
    assert whole_state_dict(layer, keep=False) is None
    state = whole_state_dict(layer)
    assert state.keys() == {"weight", "bias"} and torch.equal(state["weight"], layer.weight)
    assert state["weight"].data_ptr() != layer.weight.data_ptr()  # a copy, not a view of the training weights


def test_without_zero3_nothing_needs_deepspeed_installed(monkeypatch):
    """DeepSpeed is an optional extra: gathering, master copies and whole state dicts of plain weights must not
    import it."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    monkeypatch.setitem(sys.modules, "deepspeed.utils", None)
    layer = nn.Linear(2, 2)
    with common.gathered(layer.parameters()):
        pass
    assert deepspeed_fp32_masters(SimpleNamespace(), layer) == {}
    assert torch.equal(whole_state_dict(layer)["bias"], layer.bias)


class StandInGather:
    """DeepSpeed's `GatheredParameters` over weights whose data is empty outside it (a ZeRO-3 partition): inside,
    each weight holds its whole value from `WHOLE`; every gather's weight count is noted in `SIZES`."""

    WHOLE: dict[int, torch.Tensor] = {}
    SIZES: list[int] = []

    def __init__(self, parameters, modifier_rank=None):
        self.parameters = list(parameters)

    def __enter__(self):
        StandInGather.SIZES.append(len(self.parameters))
        for p in self.parameters:
            p.data = StandInGather.WHOLE[id(p)]

    def __exit__(self, *exc):
        for p in self.parameters:
            p.data = torch.empty(0)


def partition(module: nn.Module, monkeypatch) -> dict[str, torch.Tensor]:
    """Makes every weight of `module` a stand-in ZeRO-3 partition; returns the whole state dict it had."""
    import deepspeed

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", StandInGather)
    monkeypatch.setattr(StandInGather, "WHOLE", {})
    monkeypatch.setattr(StandInGather, "SIZES", [])
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    for p in module.parameters():
        StandInGather.WHOLE[id(p)] = p.data.clone()
        p.ds_id = 0
        p.data = torch.empty(0)
    return expected


def test_zero3_partitions_are_gathered_into_the_state_dict_one_submodule_at_a_time(monkeypatch):
    module = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    module.register_buffer("scale", torch.tensor([2.0]))
    expected = partition(module, monkeypatch)
    state = whole_state_dict(module)
    assert StandInGather.SIZES == [2, 2]  # each layer's weight and bias together, one layer at a time
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert module[0].weight.numel() == 0  # partitioned again afterwards


def test_generation_runs_in_lockstep_only_with_partitioned_weights_and_several_processes():
    module = SimpleNamespace(parameters=lambda: iter([marked]), _trainer=None)
    marked = nn.Parameter(torch.ones(1))
    marked.ds_id = 0
    assert not generates_in_lockstep(module)  # no trainer: one process
    module._trainer = module.trainer = SimpleNamespace(world_size=1)
    assert not generates_in_lockstep(module)
    module.trainer.world_size = 2
    assert generates_in_lockstep(module)
    module.parameters = lambda: iter([nn.Parameter(torch.ones(1))])
    assert not generates_in_lockstep(module)


def test_fp32_masters_are_those_of_trainable_weights_the_optimiser_owns_and_kept_only_where_asked(monkeypatch):
    """Under DeepSpeed: a frozen weight has no master, nor has a ZeRO-3 partition no optimiser owns; the masters
    come out as float32 CPU copies, and a rank that does not keep them gets none (it still joins the gathers)."""
    import deepspeed.utils
    from lightning.pytorch.strategies import DeepSpeedStrategy

    asked = []
    monkeypatch.setattr(deepspeed.utils, "safe_get_full_fp32_param",
                        lambda p: asked.append(p) or torch.full(p.shape, 3.0, dtype=torch.bfloat16))
    module = nn.Module()
    module.trained, module.frozen, module.foreign = (nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    module.frozen.requires_grad_(False)
    module.foreign.ds_id = 7  # a ZeRO-3 partition without `_z3_optimizer`
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    masters = deepspeed_fp32_masters(strategy, module)
    assert list(masters) == ["trained"] and masters["trained"].dtype == torch.float32
    assert torch.equal(masters["trained"], torch.full((2, 2), 3.0)) and asked == [module.trained]
    assert deepspeed_fp32_masters(strategy, module, keep=False) == {} and len(asked) == 2


# ---------------------------------------------------------------------------------------------------- base_lvlm.py
def base_trainer(**fields):
    """A stand-in trainer of one process under no sharding strategy (fields override)."""
    return SimpleNamespace(**{"strategy": SimpleNamespace(), "is_global_zero": True, "global_step": 0,
                              "fit_loop": SimpleNamespace(done=False), "ckpt_path": None, **fields})


def test_the_base_export_is_written_by_rank_zero_only_whole_readable_and_in_the_weights_dtype(tiny_base_dir, tmp_path):
    from lvlm_prune.modeling.loading import load_processor

    export = tmp_path / "export"
    module = base_module(tiny_base_dir, export_dir=str(export))
    module.trainer = base_trainer(is_global_zero=False)
    module._export()
    assert not export.exists()
    module.trainer = base_trainer()
    module.model.to(torch.bfloat16)  # no DeepSpeed masters: the config records the dtype the weights have
    module._export()
    config = json.loads((export / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert len(load_processor(str(export)).tokenizer) == len(module.processor.tokenizer)
    umask = os.umask(0)
    os.umask(umask)
    assert (export / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_zero3_base_without_fp32_masters_exports_its_gathered_weights(tiny_base_dir, tmp_path, monkeypatch):
    """fp32 ZeRO-3 keeps no separate master copies, and the module's own weights are partitions: the export
    writes them gathered, not the empty partitions."""
    from lvlm_prune.modeling.loading import load_base_model

    module = base_module(tiny_base_dir, export_dir=str(tmp_path / "export"))
    module.trainer = base_trainer()
    expected = partition(module.model, monkeypatch)
    module._export()
    written = load_base_model(str(tmp_path / "export")).state_dict()
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


@pytest.mark.parametrize("ended, step, done, exported", [
    (True, 3, True, False),  # the training loop ran and exported at its end: not a second time
    (False, 3, True, True),  # resumed where training had ended: no training loop, so the export runs here
    (False, 3, False, False),  # stopped before the end (interrupted, requeued): nothing to export yet
    (False, 0, True, False),  # no step was ever taken: nothing trained to export
])
def test_fit_end_exports_only_a_finished_run_whose_training_loop_did_not(ended, step, done, exported, tiny_base_dir,
                                                                         tmp_path):
    module = base_module(tiny_base_dir, export_dir=str(tmp_path / "export"))
    module.trainer = base_trainer(global_step=step, fit_loop=SimpleNamespace(done=done))
    written = []
    module._export = lambda: written.append("export")
    module.on_fit_start()
    if ended:
        module.on_train_end()
    written.clear()
    module.on_fit_end()
    assert written == (["export"] if exported else [])


def test_a_finished_deepspeed_run_resumed_without_an_export_dir_ends_quietly(tiny_base_dir):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    module = base_module(tiny_base_dir)
    module.trainer = base_trainer(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy), global_step=3,
                                  fit_loop=SimpleNamespace(done=True))
    exported = []
    module._export = lambda: exported.append("export")
    module.on_fit_start()
    module.on_fit_end()  # nothing was asked to be exported: no error about how to export
    assert exported == []
    # the same resume with an export_dir is the case that cannot end quietly under DeepSpeed
    module.hparams.export_dir = "export"
    with pytest.raises(ValueError, match=r"^fit resumed from a checkpoint at step 3, where training had already ended, "
                                         r"so the export to model.init_args.export_dir='export' did not run"):
        module.on_fit_end()
    assert exported == []


def test_fit_start_switches_to_training_mode_and_probes_the_export_dir_on_rank_zero_only(tiny_base_dir, tmp_path):
    export = tmp_path / "runs" / "export"
    module = base_module(tiny_base_dir, export_dir=str(export))
    module.model.eval()  # as from_pretrained (init_from) returns it
    module.trainer = base_trainer(is_global_zero=False)
    module.on_fit_start()
    assert module.model.training and all(m.training for m in module.model.modules())
    assert not export.exists()
    module.trainer = base_trainer()
    module.on_fit_start()
    assert export.is_dir()


def test_a_checkpoint_without_optimizer_states_or_loaded_without_a_trainer_is_not_checked(tiny_base_dir):
    from lightning.pytorch.trainer.states import TrainerFn

    module = base_module(tiny_base_dir)
    muon_states = {"optimizer_states": [{"muon": {}, "adamw": {}}]}
    module.on_load_checkpoint(muon_states)  # load_from_checkpoint: weights only, no trainer
    module.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))
    module.on_load_checkpoint({"optimizer_states": []})  # a weights-only checkpoint resumed into fit
    module.on_load_checkpoint({})
    module.on_load_checkpoint({"optimizer_states": [{"state": {}, "param_groups": []}]})  # adamw's own
    with pytest.raises(ValueError, match="optimizer state is muon's"):
        module.on_load_checkpoint(muon_states)


def test_the_base_in_lockstep_decodes_every_step_and_drops_what_follows_eos(tiny_base_dir, monkeypatch):
    from lightning_modules import base_lvlm

    module = base_module(tiny_base_dir, max_new_tokens=3)
    tokenizer = module.processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(["yes", "no"])
    asked = []

    def greedy(model, ids_, mask, pixels, position_ids=None, max_new_tokens=8, eos_token_id=None, pad_token_id=0):
        asked.append(eos_token_id)
        return torch.tensor([[ids[0], tokenizer.eos_token_id, ids[1]]])

    monkeypatch.setattr(base_lvlm, "stock_greedy_generate", greedy)
    monkeypatch.setattr(base_lvlm, "generates_in_lockstep", lambda module: True)
    batch = dict.fromkeys(("prompt_input_ids", "prompt_attention_mask", "pixel_values", "prompt_position_ids"))
    assert module.generate(batch) == ["yes"] and asked == [None]


def test_losses_are_logged_with_the_number_of_examples_as_batch_size(tiny_base_dir):
    """Packed training rows hold several examples: the loss is weighted by examples (question ids), not rows; an
    evaluation batch by its images."""
    module = base_module(tiny_base_dir)
    logged = logged_calls(module)
    module.forward = lambda batch: torch.zeros(batch["labels"].shape[0], 3, 8)  # uniform over 8 tokens
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 3]])
    loss = module.training_step({"question_ids": ["a", "b", "c"], "input_ids": labels, "labels": labels}, 0)
    assert float(loss) == pytest.approx(float(torch.log(torch.tensor(8.0))))
    assert logged["train/loss"][1] == {"prog_bar": True, "batch_size": 3}
    module.generate = lambda batch: ["yes", "no", "no"]
    module._evaluate({**eval_batch(), "pixel_values": torch.zeros(3, 3, 32, 32), "labels": labels,
                      "answers": ["yes", "no", "x"], "question_ids": list("abc"), "questions": list("abc"),
                      "categories": ["count"] * 3}, "val")
    assert logged["val/loss"][1]["batch_size"] == 3


def test_a_test_epoch_collects_its_own_answer_records(tiny_base_dir):
    module = base_module(tiny_base_dir)
    logged_calls(module)
    module.generate = lambda batch: ["yes", "no"]
    module.on_test_epoch_start()
    module.test_step(eval_batch(), 0)
    module.on_test_epoch_start()  # a second `trainer.test` on the same module
    module.test_step({**eval_batch(), "question_ids": ["c", "d"]}, 0)
    assert [(r["question_id"], r["text"], r["model_id"]) for r in module.test_predictions] == [
        ("c", "yes", "tiny-llava"), ("d", "no", "tiny-llava")]


def test_the_base_refuses_settings_that_cannot_train(tiny_base_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model.init_args.learning_rate=0.0 must be > 0"):
        base_module(tiny_base_dir, learning_rate=0.0)
    with pytest.raises(ValueError, match=r"model.grounding_weight=-0.5 must be at least 0"):
        base_module(tiny_base_dir, grounding_weight=-0.5)
    with pytest.raises(ValueError, match=r"model.processor is missing: it is linked from the datamodule"):
        BaseLVLMModule(None, spec=TinyLlavaSpec(**BASE_SPEC))
    with pytest.raises(FileNotFoundError, match=r"init_from=.*is not a directory: it is an earlier stage's export"):
        base_module(tiny_base_dir, init_from=str(tmp_path / "missing"))
    # a model-level LLaVA setting (not in either tower's config) that the export contradicts
    with pytest.raises(ValueError, match=r"vision_feature_layer is -1, the spec gives -2"):
        base_module(tiny_base_dir, spec={"vision_feature_layer": -2}, init_from=str(tiny_base_dir))


def test_a_spec_restored_from_a_checkpoint_as_a_mapping_builds_the_same_model(tiny_base_dir, processor):
    module = BaseLVLMModule(processor, spec={**BASE_SPEC, "num_layers": 2})
    assert module.model.config.text_config.num_hidden_layers == 2 and module.hparams.spec.num_layers == 2
    built = BaseLVLMModule(processor, spec=TinyLlavaSpec(**{**BASE_SPEC, "num_layers": 2}))
    assert module.hparams.spec == built.hparams.spec and isinstance(module.hparams.spec, TinyLlavaSpec)
    assert module.model.config.to_dict() == built.model.config.to_dict()
    assert all(torch.equal(value, built.model.state_dict()[name]) for name, value in module.model.state_dict().items())


def test_the_seed_draws_the_weights_and_init_from_grows_the_llm_in_the_placement_asked(tiny_base_dir):
    from lvlm_prune.modeling.loading import load_base_model

    first, again, other = (base_module(tiny_base_dir, seed=seed).model.state_dict() for seed in (1, 1, 2))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    trained = load_base_model(str(tiny_base_dir)).state_dict()
    grown = base_module(tiny_base_dir, spec={"num_layers": 6}, init_from=str(tiny_base_dir), grow_placement="bottom")
    state = grown.model.state_dict()
    layer = "model.language_model.layers.{}.self_attn.q_proj.weight"
    assert grown.model.config.text_config.num_hidden_layers == 6
    assert all(torch.equal(state[layer.format(i)], trained[layer.format(i)]) for i in range(4))  # the bottom four
