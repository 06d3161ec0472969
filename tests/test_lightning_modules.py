"""The LightningModules' own wiring, on tiny random models without a Trainer: the base's learning-rate schedule
and weight-decay groups, what its generation is asked for, its construction checks, which metric each stage
scores into, and the shared helpers that score, log and explain out-of-memory errors."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from lightning_modules.base_lvlm import BaseLVLMModule, record_dtype
from lightning_modules.common import log_accuracy, out_of_memory_advice, score
from lightning_modules.frozen_base import FrozenBaseModule
from lvlm_prune.evaluation.metrics import ExactMatchAccuracy
from lvlm_prune.modeling import TinyLlavaSpec
from lvlm_prune.modeling.loading import load_processor

# the spec of conftest's `tiny_base_dir`, whose processor crops to 32 pixels in 8-pixel patches
BASE_SPEC = dict(image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=2, vision_heads=2, hidden_size=32,
                 intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2, max_position_embeddings=256)


def base_module(tiny_base_dir, spec=None, **kwargs) -> BaseLVLMModule:
    return BaseLVLMModule(load_processor(str(tiny_base_dir)), categories=["color", "count"],
                          spec=TinyLlavaSpec(**{**BASE_SPEC, **(spec or {})}), **kwargs)


def eval_batch():
    return {"pixel_values": torch.zeros(2, 3, 32, 32), "answers": ["yes", "no"], "question_ids": ["a", "b"],
            "questions": ["q1", "q2"], "categories": ["count", "count"]}


def test_the_base_steps_its_schedule_every_optimizer_step_and_decays_matrices_only(tiny_base_dir):
    module = base_module(tiny_base_dir, learning_rate=1e-3, weight_decay=0.05, warmup_steps=2)
    module.trainer = SimpleNamespace(strategy=object(), estimated_stepping_batches=10)
    configured = module.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]
    assert schedule["interval"] == "step"
    rates = []
    for _ in range(11):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule["scheduler"].step()
    # linear warm-up over 2 steps, then cosine from 1e-3 down to a floor of a tenth at step 10
    expected = {0: 0.5e-3, 1: 1e-3, 2: 1e-3, 6: 1e-3 * (0.1 + 0.9 * 0.5), 10: 1e-4}
    assert {step: rates[step] for step in expected} == pytest.approx(expected)
    decayed, not_decayed = optimizer.param_groups
    assert (decayed["weight_decay"], not_decayed["weight_decay"]) == (0.05, 0.0)
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in not_decayed["params"])


def test_the_base_generates_up_to_eos_and_its_max_new_tokens(tiny_base_dir, monkeypatch):
    from lightning_modules import base_lvlm

    module = base_module(tiny_base_dir, max_new_tokens=5)
    tokenizer = module.processor.tokenizer
    asked = {}

    def greedy(model, ids, mask, pixels, position_ids=None, max_new_tokens=8, eos_token_id=None, pad_token_id=0):
        asked.update(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        return torch.tensor([[tokenizer.convert_tokens_to_ids("yes"), tokenizer.eos_token_id, tokenizer.pad_token_id]])

    monkeypatch.setattr(base_lvlm, "stock_greedy_generate", greedy)
    batch = dict.fromkeys(("prompt_input_ids", "prompt_attention_mask", "pixel_values", "prompt_position_ids"))
    assert module.generate(batch) == ["yes"]
    assert asked == {"max_new_tokens": 5, "eos_token_id": tokenizer.eos_token_id}


def test_the_base_refuses_a_spec_its_processor_or_init_from_contradicts(tiny_base_dir):
    for image_size in (64, 16):  # larger or smaller than the crop
        with pytest.raises(ValueError, match=rf"model.spec.image_size={image_size} but the processor crops images to 32"):
            base_module(tiny_base_dir, spec={"image_size": image_size})
    with pytest.raises(ValueError, match=r"vision_config.hidden_size is 32, the spec gives 64"):
        base_module(tiny_base_dir, spec={"vision_hidden_size": 64}, init_from=str(tiny_base_dir))
    assert base_module(tiny_base_dir, init_from=str(tiny_base_dir)).model.config.text_config.num_hidden_layers == 4


def test_the_base_freezes_the_vision_layers_llava_never_reads(tiny_base_dir):
    # LLaVA reads the second-to-last CLIP layer: the last layer and the final norm would never get a gradient
    tower = base_module(tiny_base_dir, spec={"vision_feature_layer": -2}).model.model.vision_tower
    assert not any(p.requires_grad for p in tower.post_layernorm.parameters())
    assert not any(p.requires_grad for p in tower.encoder.layers[1].parameters())
    assert all(p.requires_grad for p in tower.encoder.layers[0].parameters())


@pytest.mark.parametrize("stage", ["val", "test"])
def test_each_evaluation_stage_scores_into_its_own_metric(stage, tiny_base_dir):
    base = base_module(tiny_base_dir)
    base.generate = lambda batch: ["yes", "yes"]
    frozen = FrozenBaseModule(str(tiny_base_dir), load_processor(str(tiny_base_dir)), categories=["count"])
    tokens = SimpleNamespace(visual_tokens_per_layer=torch.ones(2, 4))
    frozen.run_method = lambda batch, name, ratio: (["yes", "yes"], tokens, 0.0)
    for module in (base, frozen):
        module.log = lambda *args, **kwargs: None
        module._evaluate(eval_batch(), stage)
        scored, other = ((module.val_accuracy, module.test_accuracy) if stage == "val"
                         else (module.test_accuracy, module.val_accuracy))
        assert float(scored.compute()["acc"]) == 0.5 and not other.update_called


def test_evaluation_losses_and_token_counts_are_averaged_over_processes(tiny_base_dir):
    frozen = FrozenBaseModule(str(tiny_base_dir), load_processor(str(tiny_base_dir)), categories=["count"])
    frozen.run_method = lambda batch, name, ratio: (["yes", "no"], SimpleNamespace(
        visual_tokens_per_layer=torch.ones(2, 4)), 0.0)
    logged, values = {}, {}
    frozen.log = lambda name, value, **kwargs: logged.update({name: kwargs}) or values.update({name: value})
    frozen._evaluate(eval_batch(), "val")
    base = base_module(tiny_base_dir)
    base.forward = lambda batch: torch.zeros(2, 3, 8)  # uniform logits over 8 tokens
    base.generate = lambda batch: ["yes", "no"]
    base.log = frozen.log
    base._evaluate({**eval_batch(), "labels": torch.tensor([[-100, 1, 2], [-100, -100, 3]])}, "val")
    assert logged["val/avg_visual_tokens"]["sync_dist"] is True and logged["val/loss"]["sync_dist"] is True
    # per-process means weighted by the process's item count: Lightning's sync then averages them over processes
    assert logged["val/avg_visual_tokens"]["batch_size"] == logged["val/loss"]["batch_size"] == 2
    assert float(values["val/avg_visual_tokens"]) == 1.0
    assert float(values["val/loss"]) == pytest.approx(math.log(8))  # uniform over 8 tokens


def test_score_counts_only_items_with_a_reference_answer():
    metric = ExactMatchAccuracy()
    score(metric, ["yes", "no"], {"question_ids": ["a", "b"], "questions": ["q1", "q2"], "answers": [None, "no"],
                                  "categories": ["c", "c"]})
    assert float(metric.compute()["acc"]) == 1.0


def test_accuracy_is_logged_per_category_seen():
    logged = {}
    module = SimpleNamespace(log=lambda name, value, **kwargs: logged.update({name: value}), log_dict=logged.update)
    metric = ExactMatchAccuracy(categories=["color", "count"])
    score(metric, ["2", "3"], {"question_ids": ["a", "b"], "questions": ["q1", "q2"], "answers": ["2", "4"],
                               "categories": ["count", "count"]})
    log_accuracy(module, metric, "val")
    assert logged == {"val/acc": 0.5, "val/acc/count": 0.5}  # no colour question: no NaN entry


def test_nested_out_of_memory_advice_names_the_innermost_place_once():
    with pytest.raises(torch.OutOfMemoryError) as raised:
        with out_of_memory_advice("the optimizer step"):
            with out_of_memory_advice("the training step"):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    message = str(raised.value)
    assert message.startswith("out of memory in the training step. ") and message.count("out of memory in ") == 1
    assert message.endswith("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_an_export_records_one_dtype_in_every_sub_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"dtype": "bfloat16", "text_config": {"dtype": "bfloat16", "x": 1},
                                "vision_config": {"torch_dtype": None}}))
    record_dtype(path, "float32")
    assert json.loads(path.read_text()) == {"dtype": "float32", "text_config": {"dtype": "float32", "x": 1},
                                            "vision_config": {"torch_dtype": None}}
