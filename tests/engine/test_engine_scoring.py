"""Attention scores computed from a layer's own projections equal eager attention probabilities."""

import pytest
import torch
from conftest import make_batch, make_tiny_llava

from lvlm_prune.baselines import FastV
from lvlm_prune.data import IGNORE_INDEX
from lvlm_prune.engine import PrunedLlava, PruningMethod


class Probe(PruningMethod):
    name = "probe"

    def __init__(self, layers):
        super().__init__(0.0)
        self.prune_layers = tuple(layers)
        self.seen = {}

    def at_layer(self, ctx):
        index = torch.arange(ctx.state.hidden.shape[1]).expand(ctx.state.hidden.shape[0], -1)
        self.seen[ctx.layer_idx] = (ctx.attention_probs(index), ctx.last_token_to_visual(), ctx.question_to_visual(),
                                    ctx.state)
        return None


def test_attention_rows_match_eager_attentions(tiny_spec):
    model = make_tiny_llava(tiny_spec, attn_implementation="eager")
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, pixel_values=pixels,
                      output_attentions=True).attentions
        probe = Probe(range(tiny_spec.num_layers))
        PrunedLlava(model)(ids, mask, pixels, position_ids, method=probe)
    real = mask.bool()
    for layer, (probs, last_to_visual, question_to_visual, state) in probe.seen.items():
        for b in range(2):
            rows = real[b].nonzero().squeeze(1)
            ours = probs[b][:, rows][:, :, rows]
            reference = eager[layer][b][:, rows][:, :, rows]
            torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-4)
            visual = state.visual_index[b] >= 0
            expected_last = eager[layer][b, :, -1].mean(0) * visual
            torch.testing.assert_close(last_to_visual[b], expected_last.float(), atol=1e-5, rtol=1e-4)
            question = state.question_mask[b]
            expected_q = eager[layer][b][:, question].mean(0).mean(0) * visual
            torch.testing.assert_close(question_to_visual[b], expected_q.float(), atol=1e-5, rtol=1e-4)


def test_scores_do_not_need_eager_attention(tiny_spec):
    sdpa = make_tiny_llava(tiny_spec, attn_implementation="sdpa")
    eager = make_tiny_llava(tiny_spec, attn_implementation="eager")
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2)
    a, b = Probe([1]), Probe([1])
    with torch.no_grad():
        PrunedLlava(sdpa)(ids, mask, pixels, method=a)
        PrunedLlava(eager)(ids, mask, pixels, method=b)
    assert sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(a.seen[1][1], b.seen[1][1], atol=1e-5, rtol=1e-4)


def test_a_layers_keys_are_projected_once_however_many_scores_read_them(tiny_spec):
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2)
    calls = []
    handle = model.model.language_model.layers[1].self_attn.k_proj.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape))
    with torch.no_grad():
        PrunedLlava(model)(ids, mask, pixels, method=Probe([1]))  # three scores at layer 1, each reading the keys
    handle.remove()
    assert len(calls) == 2  # the scores' one projection + the layer's own forward


def test_a_teacher_forced_sample_without_answer_labels_scores_from_its_last_real_token(tiny_spec):
    """A sample whose labels are all ignored (its answer cut by truncation) has no generation position: its last
    prompt token is its last real token, as without labels, not position 0."""
    model = make_tiny_llava(tiny_spec)
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[1, -2:] = ids[1, -2:]  # sample 1 answers with its last two tokens; sample 0 keeps no label
    kept = []

    class Recording(FastV):
        def at_layer(self, ctx):
            keep = super().at_layer(ctx)
            if keep is not None:
                kept.append((keep & ctx.state.visual_mask).clone())
            return keep

    with torch.no_grad():
        PrunedLlava(model)(ids, mask, pixels, labels=labels, method=Recording(0.5, layer=1))
        PrunedLlava(model)(ids, mask, pixels, method=Recording(0.5, layer=1))
    with_labels, without_labels = kept
    assert torch.equal(with_labels[0], without_labels[0])
    assert with_labels[0].any()


def test_a_multi_turn_sample_s_question_is_its_first_turn_s(tiny_spec):
    # [bos, image x 16, q q a a q q a a t t]: the question rows are the first question's, as at generation time,
    # when later turns do not exist yet
    model = make_tiny_llava(tiny_spec)
    ids, mask, _ = make_batch(tiny_spec, batch_size=1, text_len=10, left_pad=(0,))
    start = 1 + tiny_spec.num_visual_tokens
    labels = torch.full_like(ids, IGNORE_INDEX)
    for answer in (start + 2, start + 3, start + 6, start + 7):
        labels[0, answer] = ids[0, answer]
    engine = PrunedLlava(model)
    state = engine.initial_state(ids, mask, None, labels, torch.zeros(*ids.shape, tiny_spec.hidden_size))
    assert state.question_mask[0].nonzero().flatten().tolist() == [start]  # start + 1 predicts the first answer
    # without labels (generation) the question is every text token before the last one
    state = engine.initial_state(ids, mask, None, None, torch.zeros(*ids.shape, tiny_spec.hidden_size))
    assert state.question_mask[0].nonzero().flatten().tolist() == list(range(start, start + 9))


def test_a_prompt_that_ends_with_its_image_is_refused(tiny_spec):
    # a pruning method could drop that last token, and the answer would be read off another position
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, text_len=1, left_pad=(0,))
    ids[1] = torch.cat([ids[1, :1], ids[1, -1:], ids[1, 1:-1]])  # [bos, text, image x 16]
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] of the batch end with an image token"):
        PrunedLlava(make_tiny_llava(tiny_spec))(ids, mask, pixels, method=FastV(0.5))


def test_generating_no_token_is_refused(tiny_spec):
    ids, mask, pixels = make_batch(tiny_spec, batch_size=1, left_pad=(0,))
    with pytest.raises(ValueError, match="generate: max_new_tokens=0 must be at least 1"):
        PrunedLlava(make_tiny_llava(tiny_spec)).generate(ids, mask, pixels, max_new_tokens=0)
