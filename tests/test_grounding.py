"""The attention-grounding loss: the attention it scores is the layer's own, and its evidence comes from the data."""

import pytest
import torch

from conftest import TINY_DATA_ARGS, make_batch, make_tiny_llava
from lvlm_prune.modeling.grounding import AttentionGrounding, GroundingQuery, grounding_queries


def test_scored_attention_is_the_layers_own(tiny_spec):
    model = make_tiny_llava(tiny_spec, attn_implementation="eager")
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    queries = [GroundingQuery(0, ids.shape[1] - 1, (3, 4)), GroundingQuery(1, ids.shape[1] - 3, (5,)),
               GroundingQuery(1, ids.shape[1] - 1, (6,))]
    grounding = AttentionGrounding(model, layers=[1, 2], heads=[0, 3])
    with grounding.capturing(), torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True)
    for layer in (1, 2):
        ours = grounding.attention(layer, queries, mask)
        for k, q in enumerate(queries):
            reference = output.attentions[layer][q.row, [0, 3], q.query]
            torch.testing.assert_close(ours[k], reference, atol=1e-5, rtol=1e-4)
    # hooks are removed on exit: a later forward records nothing new
    grounding._inputs.clear()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert grounding._inputs == {}


def test_loss_trains_a_head_towards_the_evidence(tiny_spec):
    model = make_tiny_llava(tiny_spec).train()
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 0))
    queries = [GroundingQuery(0, ids.shape[1] - 1, (2,)), GroundingQuery(1, ids.shape[1] - 1, (9, 10))]
    grounding = AttentionGrounding(model, layers=[1], heads=[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        with grounding.capturing():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        loss = grounding.loss(queries, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # only the supervised layer's attention projections (and what feeds them) get gradients
    layers = model.model.language_model.layers
    assert layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[1].self_attn.o_proj.weight.grad is None or layers[1].self_attn.o_proj.weight.grad.abs().sum() == 0
    assert layers[2].self_attn.q_proj.weight.grad is None or layers[2].self_attn.q_proj.weight.grad.abs().sum() == 0


def test_bad_layers_and_heads_are_named(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    with pytest.raises(ValueError, match=r"grounding layers \[7\]"):
        AttentionGrounding(model, layers=[7], heads=[0])
    with pytest.raises(ValueError, match=r"grounding heads \[4\]"):
        AttentionGrounding(model, layers=[0], heads=[4])
    with pytest.raises(RuntimeError, match="capturing"):
        AttentionGrounding(model, layers=[0], heads=[0]).attention(0, [GroundingQuery(0, 1, (0,))], torch.ones(1, 4))


def test_collator_points_each_answer_turn_at_its_visible_evidence():
    from datamodules.synthetic import SyntheticVQADataModule

    dm = SyntheticVQADataModule(**TINY_DATA_ARGS, turns_per_image=3, describe_fraction=0.5, token_drop_fraction=0.5,
                                train_min_objects=1, grounding_evidence=True)
    samples = dm.samples("train")
    examples = [dm._train_example(sample, i) for i, sample in enumerate(samples[:8])]
    batch = dm.collator(examples)
    lookups = grounding_queries(batch)
    assert lookups
    image_token = dm.image_token_id
    for lookup in lookups:
        example = examples[lookup.row]
        # the query predicts an answer's first token, and the evidence is visible visual tokens of that answer
        assert batch["labels"][lookup.row, lookup.query] == -100 and batch["labels"][lookup.row, lookup.query + 1] != -100
        assert all(batch["input_ids"][lookup.row, p] == image_token and batch["attention_mask"][lookup.row, p] == 1
                   for p in lookup.evidence)
    # the first answer's evidence is its sample's relevant objects (when it is the sample's own question)
    grid = dm.config.grid
    for row, (sample, example) in enumerate(zip(samples[:8], examples)):
        if example.question == sample.question and example.context is None:
            first = example.evidence[0]
            assert first == tuple(sorted(o.row * grid + o.col for o in sample.relevant))
            assert len(example.evidence) == 1 + len(example.extra_turns)


def test_collator_rejects_evidence_that_does_not_match_the_turns():
    from datamodules.synthetic import SyntheticVQADataModule
    from dataclasses import replace

    dm = SyntheticVQADataModule(**TINY_DATA_ARGS, grounding_evidence=True)
    example = dm._train_example(dm.samples("train")[0], 0)
    with pytest.raises(ValueError, match="evidence for 2 answer turns"):
        dm.collator([replace(example, evidence=((0,), (1,)))])
    with pytest.raises(ValueError, match=r"evidence visual tokens \[99\]"):
        dm.collator([replace(example, evidence=((99,),))])


def test_base_fit_through_the_cli_trains_with_the_grounding_loss(tmp_path):
    from test_cli import TINY_BASE_ARGS, run_dir_args
    from cli import cli_main

    cli = cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                    "--trainer.fast_dev_run", "1", "--model.init_args.grounding_weight", "0.5",
                    "--model.init_args.grounding_layers", "[1]", "--data.init_args.grounding_evidence", "true"])
    metrics = cli.trainer.callback_metrics
    expected = metrics["train/answer_loss"] + 0.5 * metrics["train/grounding_loss"]
    torch.testing.assert_close(metrics["train/loss"], expected)
    assert metrics["train/grounding_loss"] > 0


def test_grounding_without_evidence_in_the_data_is_named(tmp_path):
    from test_cli import TINY_BASE_ARGS, run_dir_args
    from cli import cli_main

    with pytest.raises(ValueError, match="data.grounding_evidence"):
        cli_main(["fit", "--config", "configs/synthetic/base_describe.yaml", *TINY_BASE_ARGS, *run_dir_args(tmp_path),
                  "--trainer.fast_dev_run", "1", "--model.init_args.grounding_weight", "0.5",
                  "--model.init_args.grounding_layers", "[1]"])
