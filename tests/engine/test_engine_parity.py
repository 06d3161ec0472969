"""r = 0 reproduces the stock model; physical removal and the soft masked path agree."""

import pytest
import torch
from conftest import make_batch, make_tiny_llava

from lvlm_prune.engine import PrunedLlava, PruningMethod
from lvlm_prune.generation import stock_greedy_generate


class KeepFixed(PruningMethod):
    """Drops a fixed set of visual tokens per sample at the input of one layer (or before the LLM); also used by
    the LLaVA-NeXT tests, where samples have different visual counts."""

    name = "fixed"
    handles_varying_visual_tokens = True

    def __init__(self, layer, drop_per_sample):
        super().__init__(0.0)
        self.layer = layer
        self.prune_layers = (layer,) if layer is not None else ()
        self.drop = drop_per_sample

    def _keep(self, visual_index):
        keep = torch.ones_like(visual_index, dtype=torch.bool)
        for b, drop in enumerate(self.drop):
            for v in drop:
                keep[b] &= visual_index[b] != v
        return keep

    def before_llm(self, ctx):
        if self.layer is not None:
            return None
        index = torch.arange(ctx.visual_features.shape[1]).expand(len(self.drop), -1)
        return self._keep(index) & ctx.visual_valid

    def at_layer(self, ctx):
        keep = self._keep(ctx.state.visual_index)
        return keep if not ctx.soft else keep.float()


def assert_greedy_loop_without_cache_writes(tokens, engine, ids, mask, pixels, method):
    """Generation on the engine's short cache equals a no-cache greedy loop over growing inputs."""
    for step in range(tokens.shape[1]):
        logits = engine(ids, mask, pixels, method=method, logits="last").logits
        assert torch.equal(logits.argmax(-1), tokens[:, step])
        ids = torch.cat([ids, tokens[:, step : step + 1]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_full_tokens_reproduce_stock_logits(tiny_spec, attn, batch_size):
    model = make_tiny_llava(tiny_spec, attn_implementation=attn)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=batch_size, left_pad=(0, 2, 3))
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, pixel_values=pixels).logits
        ours = PrunedLlava(model)(ids, mask, pixels, position_ids).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], stock[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_tokens_reproduce_stock_generation(tiny_spec, attn):
    model = make_tiny_llava(tiny_spec, attn_implementation=attn)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=3, left_pad=(0, 2, 1))
    stock = stock_greedy_generate(model, ids, mask, pixels, max_new_tokens=6)
    ours, counts = PrunedLlava(model).generate(ids, mask, pixels, max_new_tokens=6)
    assert torch.equal(ours, stock)
    assert (counts == tiny_spec.num_visual_tokens).all()
    # and Hugging Face's own generate (its positions, cache and EOS handling, not the project's reference loop)
    eos, pad = model.generation_config.eos_token_id, 0
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6,
                            do_sample=False, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(hf[:, : ids.shape[1]], ids)
    ours, _ = PrunedLlava(model).generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(ours, hf[:, ids.shape[1]:])


@pytest.mark.parametrize("layer", [None, 0, 2])
def test_physical_removal_matches_soft_mask(tiny_spec, layer):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    method = KeepFixed(layer, drop_per_sample=[[0, 3, 5, 6, 7], [1, 2, 9]])
    engine = PrunedLlava(model)
    with torch.no_grad():
        hard = engine(ids, mask, pixels, method=method)
        soft = engine(ids, mask, pixels, method=method, soft=True)
    text = mask.bool() & (ids != model.config.image_token_id)
    torch.testing.assert_close(hard.logits[text], soft.logits[text], atol=1e-4, rtol=1e-4)
    first = 0 if layer is None else layer
    expected = torch.tensor([tiny_spec.num_visual_tokens - 5, tiny_spec.num_visual_tokens - 3]).float()
    assert torch.equal(hard.visual_tokens_per_layer[:, first], expected)
    assert torch.equal(soft.visual_tokens_per_layer[:, first], expected)
    if layer:
        assert (hard.visual_tokens_per_layer[:, :layer] == tiny_spec.num_visual_tokens).all()


def test_removal_changes_output_and_generation_runs_on_short_cache(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    engine = PrunedLlava(model)
    method = KeepFixed(1, drop_per_sample=[list(range(12)), list(range(4, 16))])
    full = engine(ids, mask, pixels, logits="last").logits
    pruned = engine(ids, mask, pixels, method=method, logits="last").logits
    assert not torch.allclose(full, pruned)
    tokens, counts = engine.generate(ids, mask, pixels, method=method, max_new_tokens=4)
    assert tokens.shape == (2, 4)
    assert torch.equal(counts[:, 1], torch.tensor([4.0, 4.0]))
    assert_greedy_loop_without_cache_writes(tokens, engine, ids, mask, pixels, method)


UNEVEN_DROPS = [list(range(12)), [1, 5], list(range(3, 16, 2))]  # 4, 14 and 9 of 16 visual tokens kept


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruning_before_the_llm_generates_what_the_stock_model_does_with_those_tokens_hidden(tiny_spec, attn):
    # an independent reference: the stock model, the dropped image tokens hidden by its attention mask, positions kept
    model = make_tiny_llava(tiny_spec, attn_implementation=attn)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=3, left_pad=(0, 3, 1))
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = mask.clone()
    for b, drop in enumerate(UNEVEN_DROPS):
        image = (ids[b] == model.config.image_token_id).nonzero().squeeze(1)
        hidden[b, image[drop]] = 0
    stock = stock_greedy_generate(model, ids, hidden, pixels, position_ids=position_ids, max_new_tokens=8)
    ours, counts = PrunedLlava(model).generate(ids, mask, pixels, position_ids=position_ids,
                                              method=KeepFixed(None, UNEVEN_DROPS), max_new_tokens=8)
    assert torch.equal(ours, stock)
    assert counts[:, 0].tolist() == [4.0, 14.0, 9.0]


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_generation_with_uneven_kept_counts_equals_a_greedy_loop_without_cache(tiny_spec, layer):
    # seed 1: this random model writes no image token in 5 steps (the loop below would read one back as an image)
    model = make_tiny_llava(tiny_spec, seed=1)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=3, left_pad=(0, 3, 1))
    engine = PrunedLlava(model)
    method = KeepFixed(layer, UNEVEN_DROPS)
    tokens, counts = engine.generate(ids, mask, pixels, method=method, max_new_tokens=5)
    assert counts[:, layer].tolist() == [4.0, 14.0, 9.0]
    assert_greedy_loop_without_cache_writes(tokens, engine, ids, mask, pixels, method)


def test_a_sample_that_ends_early_is_padded_as_hugging_face_generate_pads_it(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=3, left_pad=(0, 2, 1))
    engine = PrunedLlava(model)
    eos = int(engine.generate(ids, mask, pixels, max_new_tokens=6)[0][0, 1])  # the second token sample 0 writes
    ours, _ = engine.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert (ours[0, 2:] == 0).all()  # ended at step 1
    assert torch.equal(ours, stock_greedy_generate(model, ids, mask, pixels, max_new_tokens=6, eos_token_id=eos,
                                                   pad_token_id=0))
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6,
                            do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, hf[:, ids.shape[1]:])


def test_engine_leaves_the_model_untouched(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2)

    def patches():  # every module's class forward, an instance-level forward, and its hooks
        return {name: (type(module).forward, "forward" in vars(module), len(module._forward_hooks),
                       len(module._forward_pre_hooks)) for name, module in model.named_modules()}

    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        unpatched = patches()  # after a stock forward: transformers adds its own output-recording hooks in the first
        assert not any(instance for _, instance, _, _ in unpatched.values())
        PrunedLlava(model)(ids, mask, pixels, method=KeepFixed(1, [[0, 1], [2]]))
        assert patches() == unpatched
        after = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert torch.equal(before, after)


def test_wrong_number_of_image_tokens_is_reported(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=1)
    ids[0, 3] = 5
    with pytest.raises(ValueError, match="image tokens"):
        PrunedLlava(model)(ids, mask, pixels)


def test_flash_attention_is_refused_by_name(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    # what loading with attn_implementation="flash_attention_2" records (flash-attn itself is not installed here)
    model.config.get_text_config().__dict__["_attn_implementation_internal"] = "flash_attention_2"
    assert model.config.get_text_config()._attn_implementation == "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'.*load the base with 'sdpa' or 'eager'"):
        PrunedLlava(model)


def test_last_logits_are_the_last_real_tokens_with_right_padding_too(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    engine = PrunedLlava(model)
    right_ids = torch.stack([row.roll(-int((m == 0).sum())) for row, m in zip(ids, mask)])
    right_mask = torch.stack([m.roll(-int((m == 0).sum())) for m in mask])
    with torch.no_grad():
        left = engine(ids, mask, pixels, logits="last").logits
        right = engine(right_ids, right_mask, pixels, logits="last").logits
    assert torch.allclose(left, right, atol=1e-5)


def test_stock_greedy_generation_runs_one_forward_per_new_token(tiny_spec, monkeypatch):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    tokens = stock_greedy_generate(model, ids, mask, pixels, max_new_tokens=3)
    assert tokens.shape == (2, 3) and len(calls) == 3  # the prefill gives the first token
