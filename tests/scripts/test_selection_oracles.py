"""The saliency selections of scripts/selection_oracles.py, on the tiny random base."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import selection_oracles  # noqa: E402
from conftest import TINY_DATA_ARGS  # noqa: E402
from datamodules.synthetic import SyntheticVQADataModule  # noqa: E402
from lvlm_prune.engine import KeepWeightProbe, PrunedLlava  # noqa: E402
from lvlm_prune.modeling.loading import load_base_model  # noqa: E402
from lvlm_prune.rcp.losses import answer_ce  # noqa: E402


@pytest.fixture(scope="module")
def engine_and_batch(tiny_base_dir):
    data = SyntheticVQADataModule(processor_path=str(tiny_base_dir), **TINY_DATA_ARGS)
    data.setup("test")
    engine = PrunedLlava(load_base_model(str(tiny_base_dir)).eval())
    return engine, next(iter(data.test_dataloader())), data.processor.tokenizer


def test_the_reference_saliency_ranks_tokens_by_how_much_their_keep_weight_lowers_the_answer_loss(engine_and_batch):
    engine, batch, tokenizer = engine_and_batch
    method = selection_oracles.saliency_selection(engine, batch, 3, True, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # one token's keep weight lowered a little from 1: the loss moves by -step * dCE/dw = +step * score
    rows, tokens = method.scores(None).shape
    assert (method.keep, tokens) == (3, engine.info.num_visual_tokens)
    step, token = 1e-2, int(method.scores(None)[0].argmax())
    losses = []
    for lowered in (False, True):
        weights = torch.ones(rows, tokens)
        weights[0, token] -= step if lowered else 0.0
        with torch.no_grad():
            output = engine(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["position_ids"],
                            labels=batch["labels"], method=KeepWeightProbe(weights), soft=True)
        losses.append(answer_ce(output.logits, batch["labels"]).item())
    assert losses[1] - losses[0] == pytest.approx(step * method.scores(None)[0, token].item(), rel=0.05)
    assert all(p.grad is None for p in engine.model.parameters())


def test_the_self_saliency_explains_the_bases_own_first_token_not_the_reference(engine_and_batch):
    engine, batch, tokenizer = engine_and_batch
    ids = tokenizer.eos_token_id, tokenizer.pad_token_id
    own = selection_oracles.saliency_selection(engine, batch, 3, False, *ids).scores(None)
    reference = selection_oracles.saliency_selection(engine, batch, 3, True, *ids).scores(None)
    assert own.shape == reference.shape and torch.isfinite(own).all()
    assert not torch.allclose(own, reference)
    # what it explains: the cross-entropy of the token the full-token base generates first, at the last prompt
    # position; one token's keep weight lowered a little from 1 moves that loss by +step * score
    from lvlm_prune.engine.methods import PruningMethod
    from lvlm_prune.runner import generate_with_method

    with torch.no_grad():
        first = generate_with_method(engine, batch, PruningMethod(0.0), 1, *ids).tokens[:, 0]
    step, token = 1e-2, int(own[0].argmax())
    losses = []
    for lowered in (False, True):
        weights = torch.ones(own.shape)
        weights[0, token] -= step if lowered else 0.0
        with torch.no_grad():
            output = engine(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"],
                            batch["prompt_position_ids"], method=KeepWeightProbe(weights), soft=True)
        losses.append(torch.nn.functional.cross_entropy(output.logits[0, -1].float(), first[0]).item())
    assert losses[1] - losses[0] == pytest.approx(step * own[0, token].item(), rel=0.05)
