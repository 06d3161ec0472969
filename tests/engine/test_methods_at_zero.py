"""At r = 0 every training-free method keeps every visual token: the engine with it reproduces the stock
LlavaForConditionalGeneration (logits and greedy generation) and sees all N visual tokens at every layer."""

import pytest
import torch
from conftest import make_batch, make_tiny_llava

from lvlm_prune.baselines import TRAINING_FREE_METHODS, build_method
from lvlm_prune.engine import PrunedLlava
from lvlm_prune.generation import stock_greedy_generate

METHODS = sorted(TRAINING_FREE_METHODS)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", METHODS)
def test_a_method_at_zero_reproduces_the_stock_model(tiny_spec, name, attn):
    model = make_tiny_llava(tiny_spec, attn_implementation=attn)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=3, left_pad=(0, 2, 1))
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    engine = PrunedLlava(model)
    method = build_method(name, 0.0)
    n, depth = tiny_spec.num_visual_tokens, tiny_spec.num_layers
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, pixel_values=pixels).logits
        ours = engine(ids, mask, pixels, position_ids, method=method)
    assert method.planned_visual_tokens() == [float(n)] * depth
    assert torch.equal(ours.visual_tokens_per_layer, torch.full((3, depth), float(n)))
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], stock[real], atol=1e-5, rtol=1e-5)

    expected = stock_greedy_generate(model, ids, mask, pixels, max_new_tokens=6)
    tokens, counts = engine.generate(ids, mask, pixels, method=build_method(name, 0.0), max_new_tokens=6)
    assert torch.equal(tokens, expected)
    assert torch.equal(counts, torch.full((3, depth), float(n)))


@pytest.mark.parametrize("name", METHODS)
def test_a_method_at_zero_keeps_every_token_on_the_soft_path_too(tiny_spec, name):
    """The training path masks instead of removing: at r = 0 no visual key gets a weight below 1."""
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    engine = PrunedLlava(model)
    with torch.no_grad():
        full = engine(ids, mask, pixels).logits
        soft = engine(ids, mask, pixels, method=build_method(name, 0.0), soft=True)
    real = mask.bool()
    torch.testing.assert_close(soft.logits[real], full[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(soft.visual_tokens_per_layer, torch.full_like(soft.visual_tokens_per_layer,
                                                                      tiny_spec.num_visual_tokens))
