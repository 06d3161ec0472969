"""Units of the frozen-base module (and of the shared helpers it uses) that the other module tests leave loose:
the test epoch's accuracy log, what the hyperparameters keep, and how generation is timed on an accelerator."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from test_lightning_modules import eval_batch
from test_lightning_units import logged_calls, processor  # noqa: F401 (a fixture)


@pytest.fixture
def frozen_module(tiny_base_dir, processor):  # noqa: F811
    from lightning_modules.frozen_base import FrozenBaseModule

    return FrozenBaseModule(str(tiny_base_dir), processor, categories=["count"], eval_method="fastv",
                            eval_prune_ratio=0.5)


def answering(module, answers):
    module.run_method = lambda batch, name, ratio: (answers, SimpleNamespace(
        visual_tokens_per_layer=torch.ones(len(answers), 4)), 0.0)


def test_a_test_epoch_logs_its_own_accuracy_per_category_and_the_next_starts_afresh(frozen_module):
    logged = logged_calls(frozen_module)
    answering(frozen_module, ["yes", "yes"])  # one of two right
    frozen_module.on_test_epoch_start()
    frozen_module.test_step(eval_batch(), 0)
    frozen_module.on_test_epoch_end()
    assert logged["test/acc"][0] == 0.5 and logged["test/acc"][1].get("prog_bar") is True
    assert logged["test/acc/count"][0] == 0.5 and "val/acc" not in logged
    answering(frozen_module, ["yes", "no"])  # both right: the first epoch's items no longer count
    frozen_module.on_test_epoch_start()
    frozen_module.test_step(eval_batch(), 0)
    frozen_module.on_test_epoch_end()
    assert logged["test/acc"][0] == 1.0


def test_the_processor_is_not_a_hyperparameter_but_every_setting_is(frozen_module):
    """The processor comes from the datamodule: a checkpoint must not pickle it (nor the CLI echo it back)."""
    assert "processor" not in frozen_module.hparams
    assert frozen_module.hparams.eval_method == "fastv" and frozen_module.hparams.eval_prune_ratio == 0.5
    assert frozen_module.hparams.categories == ["count"] and frozen_module.hparams.max_new_tokens == 8


def test_on_cuda_generation_is_timed_between_two_synchronisations(frozen_module, monkeypatch):
    """CUDA kernels run asynchronously: the clock starts after the queued work is done and stops after the
    generation's own kernels are, not merely launched."""
    from lightning_modules import frozen_base

    events = []
    clock = iter([1.0, 4.0])
    monkeypatch.setattr(frozen_base.time, "perf_counter", lambda: events.append("clock") or next(clock))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))
    monkeypatch.setattr(type(frozen_module), "device", property(lambda self: torch.device("cuda", 0)))
    answer = frozen_module.tokenizer.convert_tokens_to_ids(["yes"])
    frozen_module.generate_with = lambda batch, name, ratio: events.append("generate") or SimpleNamespace(
        tokens=torch.tensor([answer]))
    answers, _, seconds = frozen_module.run_method({}, "fastv", 0.5)
    assert answers == ["yes"] and seconds == 3.0
    assert events == [("sync", "cuda:0"), "clock", "generate", ("sync", "cuda:0"), "clock"]


def test_a_method_whose_constructor_takes_any_keyword_gets_its_options_unchecked_by_name(monkeypatch):
    """Names are checked against the constructor's parameters only where it lists them all: one taking **kwargs
    (a method forwarding its options) gets every option, and only the constructor itself may refuse one."""
    from lightning_modules.frozen_base import checked_method_options
    from lvlm_prune.baselines import TRAINING_FREE_METHODS, RandomPruning

    class Forwarding(RandomPruning):
        def __init__(self, prune_ratio=0.0, **options):
            super().__init__(prune_ratio, seed=options.pop("seed", 0))
            self.options = options

    monkeypatch.setitem(TRAINING_FREE_METHODS, "forwarding", Forwarding)
    assert checked_method_options({"forwarding": {"window": 3, "seed": 1}}) == {"forwarding": {"window": 3, "seed": 1}}
    with pytest.raises(ValueError, match=r"model.method_options.random.window is not an option of random"):
        checked_method_options({"random": {"window": 3}})

def test_the_processor_s_own_image_token_id_is_compared_and_an_uncropped_processor_is_not(processor):  # noqa: F811
    from lightning_modules.frozen_base import check_processor_matches_base
    from test_lightning_units_2 import fake_base, image_processor

    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    # a processor that gives the id itself (no token name to look up): that id is what the base must have
    by_id = SimpleNamespace(tokenizer=processor.tokenizer, image_token_id=image + 3, image_processor=image_processor())
    with pytest.raises(ValueError, match=rf"has id {image + 3}, the base model's config.image_token_id is {image}"):
        check_processor_matches_base(by_id, fake_base(image_token_id=image), "base")
    check_processor_matches_base(by_id, fake_base(image_token_id=image + 3), "base")
    # no centre crop (or no image processor at all): no crop size to compare with the vision tower's
    for image_processor_ in (image_processor(do_center_crop=False), None):
        uncropped = SimpleNamespace(tokenizer=processor.tokenizer, image_processor=image_processor_)
        check_processor_matches_base(uncropped, fake_base(image_size=336), "base")

def test_the_sweep_is_offered_every_training_free_method_in_order(frozen_module):
    from lvlm_prune.baselines import TRAINING_FREE_METHODS

    names = frozen_module.method_names()
    assert names == sorted(TRAINING_FREE_METHODS) and {"dart", "full", "visionzip"} <= set(names)

# ---------------------------------------------------------------------------------------------------- common.py
def test_answer_records_carry_the_question_file_s_prompt_and_the_dataset_index_where_the_batch_has_them():
    from lightning_modules.common import prediction_records

    batch = {**eval_batch(), "prompts": ["p1", "p2"], "dataset_indices": [7, 3]}
    records = prediction_records(batch, ["yes", "no"], "m")
    assert [(r["prompt"], r["dataset_index"], r["text"], r["answer"]) for r in records] == [
        ("p1", 7, "yes", "yes"), ("p2", 3, "no", "no")]
    # without prompts: the questions; without dataset indices: no such field
    plain = prediction_records(eval_batch(), ["yes", "no"], "m")
    assert [r["prompt"] for r in plain] == ["q1", "q2"] and all("dataset_index" not in r for r in plain)


def test_a_trainable_zero3_partition_the_optimiser_owns_has_its_fp32_master_exported(monkeypatch):
    import deepspeed.utils
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_modules.common import deepspeed_fp32_masters

    monkeypatch.setattr(deepspeed.utils, "safe_get_full_fp32_param", lambda p: torch.full(p.shape, 2.0))
    module = torch.nn.Module()
    module.owned, module.foreign = (torch.nn.Parameter(torch.zeros(3)) for _ in range(2))
    module.owned.ds_id, module.owned._z3_optimizer = 1, object()  # a partition ZeRO-3's optimiser steps
    module.foreign.ds_id = 2
    masters = deepspeed_fp32_masters(DeepSpeedStrategy.__new__(DeepSpeedStrategy), module)
    assert list(masters) == ["owned"] and torch.equal(masters["owned"], torch.full((3,), 2.0))


def test_zero3_weights_are_gathered_read_only(monkeypatch):
    """modifier_rank=None: nothing is broadcast back from one rank when the gather ends (the state dict only reads)."""
    import deepspeed

    from lightning_modules.common import gathered

    asked = []
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters",
                        lambda parameters, modifier_rank=-1: asked.append(modifier_rank) or "gather")
    weight = torch.nn.Parameter(torch.ones(1))
    weight.ds_id = 0
    assert gathered([weight]) == "gather" and asked == [None]
