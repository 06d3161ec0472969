"""Packed training batches: the same examples, loss and gradients as padded ones, in fewer rows."""

import pytest
import torch

from datamodules.synthetic import SyntheticVQADataModule
from lvlm_prune.data import answer_cross_entropy, pack_teacher_forced
from lvlm_prune.modeling import TinyLlavaSpec

# multi-turn conversations, descriptions, textual contexts and hidden tokens: every kind of training example
DATA = dict(grid=4, cell_size=8, min_objects=4, max_objects=5, train_min_objects=1, num_train=64, num_val=8,
            num_test=8, batch_size=16, turns_per_image=3, describe_fraction=0.5, context_fraction=0.3,
            token_drop_fraction=0.5)
SPEC = TinyLlavaSpec(image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=2, vision_heads=2,
                     hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=256)


def padded_and_packed(pack_length=64, **overrides):
    padded = SyntheticVQADataModule(**{**DATA, **overrides})
    packed = SyntheticVQADataModule(**{**DATA, **overrides}, pack_length=pack_length)
    batches = []
    for data in (padded, packed):
        torch.manual_seed(0)  # the same shuffle
        batches.append(next(iter(data.train_dataloader())))
    return *batches, padded


def base_module(data, attn_implementation="sdpa"):
    from lightning_modules.base_lvlm import BaseLVLMModule

    return BaseLVLMModule(processor=data.processor, categories=data.categories, spec=SPEC,
                          attn_implementation=attn_implementation, seed=1)


def test_packed_rows_hold_every_example_once_with_its_own_positions():
    padded, packed, data = padded_and_packed()
    lengths = (padded["position_ids"].argmax(1) + 1).tolist()
    rows = packed["packed_rows"]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert len(rows) < len(lengths) and packed["input_ids"].shape[0] == len(rows)
    assert packed["input_ids"].shape[1] <= max(64, max(lengths))
    order = [i for row in rows for i in row]
    assert packed["question_ids"] == [padded["question_ids"][i] for i in order]
    assert torch.equal(packed["pixel_values"], padded["pixel_values"][order])
    mask = packed["attention_mask"][:, 0]
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            span = slice(start, start + lengths[i])
            assert torch.equal(packed["input_ids"][r, span], padded["input_ids"][i, : lengths[i]])
            assert torch.equal(packed["labels"][r, span], padded["labels"][i, : lengths[i]])
            assert torch.equal(packed["position_ids"][r, span], padded["position_ids"][i, : lengths[i]])
            block = mask[r, span, span]
            expected = torch.ones(lengths[i], lengths[i], dtype=torch.bool).tril() & padded["attention_mask"][i, : lengths[i]].bool()
            assert torch.equal(block, expected)  # causal, and hidden visual tokens stay hidden
            assert not mask[r, span, :start].any() and not mask[r, span, start + lengths[i]:].any()  # no other example
            start += lengths[i]
    # the images go in the order their tokens come, row after row (how LLaVA fills them in)
    image_rows = (packed["input_ids"] == data.image_token_id).sum(1)
    assert image_rows.tolist() == [len(row) * SPEC.num_visual_tokens for row in rows]


def test_an_example_longer_than_the_row_gets_a_row_of_its_own_length():
    padded, packed, _ = padded_and_packed(pack_length=8)
    lengths = (padded["position_ids"].argmax(1) + 1).tolist()
    assert packed["input_ids"].shape[1] == max(lengths)  # the row grows to the longest example, no longer
    for row in packed["packed_rows"]:
        assert sum(lengths[i] for i in row) <= max(lengths)
    with pytest.raises(ValueError, match="pack_length=0 must be at least 1"):
        SyntheticVQADataModule(**DATA, pack_length=0).train_dataloader()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_batches_give_the_padded_loss_and_gradients(attn_implementation):
    padded, packed, data = padded_and_packed()
    module = base_module(data, attn_implementation)
    results = []
    for batch in (padded, packed):
        module.zero_grad()
        loss = answer_cross_entropy(module(batch), batch["labels"])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 10
    # every trained parameter gets a gradient (plain DDP needs it); what no loss reaches is frozen
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert padded_grads.keys() == trained
    assert {n for n, p in module.named_parameters() if not p.requires_grad} == {
        "model.model.vision_tower.post_layernorm.weight", "model.model.vision_tower.post_layernorm.bias"}
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_grounding_lookups_follow_their_examples_into_the_rows():
    from lvlm_prune.modeling.grounding import AttentionGrounding, grounding_queries

    padded, packed, data = padded_and_packed(grounding_evidence=True)
    assert len(packed["grounding"]) == len(padded["grounding"]) > 0
    model = base_module(data).model.eval()
    grounding = AttentionGrounding(model, layers=[1], heads=[0, 2])
    masses = []
    for batch in (padded, packed):
        with torch.no_grad(), grounding.capturing():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], pixel_values=batch["pixel_values"])
            masses.append(grounding.evidence_mass(1, grounding_queries(batch), batch["attention_mask"]))
    torch.testing.assert_close(masses[1], masses[0], rtol=1e-4, atol=1e-6)
    assert (masses[0] > 0).all()


def test_the_generation_layout_and_anyres_batches_are_not_packed():
    padded, packed, _ = padded_and_packed()
    assert "prompt_input_ids" in padded and "prompt_input_ids" not in packed
    with pytest.raises(ValueError, match="image_sizes"):
        pack_teacher_forced({**padded, "image_sizes": torch.ones(16, 2)}, 64, pad_token_id=0)


def test_base_fit_through_the_cli_trains_on_packed_rows(tmp_path):
    from test_cli import TINY_BASE_ARGS, run_dir_args
    from cli import cli_main

    cli = cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                    "--trainer.fast_dev_run", "2", "--data.init_args.pack_length", "128"])
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["attention_mask"].ndim == 4 and len(batch["packed_rows"]) < len(batch["question_ids"])
    assert "packed_rows" not in next(iter(cli.datamodule.val_dataloader()))  # evaluation is never packed


def test_text_only_examples_carry_the_scene_in_words_and_no_image():
    data = SyntheticVQADataModule(**{**DATA, "text_only_fraction": 0.5})
    torch.manual_seed(0)
    batch = next(iter(data.train_dataloader()))
    samples = {s.question_id: s for s in data.samples("train")}
    with_image = batch["image_examples"]
    assert 0 < len(with_image) < len(batch["question_ids"]) == 16
    assert batch["pixel_values"].shape[0] == len(with_image)
    image_tokens = (batch["input_ids"] == data.image_token_id).sum(1)
    for i, question_id in enumerate(batch["question_ids"]):
        if i in with_image:
            assert image_tokens[i] == SPEC.num_visual_tokens
            continue
        assert image_tokens[i] == 0
        assert batch["contexts"][i].endswith(samples[question_id].scene.description())
        assert batch["categories"][i] != "describe"
    # packed, the images still follow the examples that have one, and the loss is the padded batch's
    torch.manual_seed(0)
    packed = next(iter(SyntheticVQADataModule(**{**DATA, "text_only_fraction": 0.5}, pack_length=64).train_dataloader()))
    order = [i for row in packed["packed_rows"] for i in row]
    assert [order[k] for k in packed["image_examples"]] == [i for i in order if i in with_image]
    module = base_module(data)
    with torch.no_grad():
        losses = [answer_cross_entropy(module(b), b["labels"]) for b in (batch, packed)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_a_text_only_stage_trains_without_any_image(tmp_path):
    from test_cli import TINY_BASE_ARGS, run_dir_args
    from cli import cli_main

    cli = cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                    "--trainer.fast_dev_run", "1", "--data.init_args.text_only_fraction", "1.0",
                    "--model.init_args.grounding_weight", "0.5", "--model.init_args.grounding_layers", "[1]",
                    "--data.init_args.grounding_evidence", "true"])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["pixel_values"] is None and not (batch["input_ids"] == cli.datamodule.image_token_id).any()
    # no visual token to point at: the grounding loss has no lookup (0), and the step is not refused
    assert batch["grounding"] == [] and cli.trainer.callback_metrics["train/grounding_loss"] == 0
