"""AttentionGrounding piece by piece: its layer checks, where the attention mass is counted, the mean over layers,
and a batch without lookups."""

import math

import pytest
import torch

from conftest import make_batch
from lvlm_prune.modeling.grounding import AttentionGrounding, GroundingQuery, grounding_queries


def test_a_layer_index_equal_to_the_depth_or_no_layer_is_refused(tiny_llava):
    with pytest.raises(ValueError, match=r"grounding layers \[4\]: each must be in \[0, 4\)"):
        AttentionGrounding(tiny_llava, layers=[4], heads=[0])
    with pytest.raises(ValueError, match=r"grounding layers \[\]"):
        AttentionGrounding(tiny_llava, layers=[], heads=[0])


def test_evidence_on_every_visible_token_holds_all_the_attention_and_padding_none(tiny_llava, tiny_spec):
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    last = ids.shape[1] - 1
    visible = tuple(range(2, last + 1))  # row 1: two left pads
    queries = [GroundingQuery(1, last, visible), GroundingQuery(1, last, (0, 1))]
    grounding = AttentionGrounding(tiny_llava, layers=[1], heads=[0, 2])
    with grounding.capturing(), torch.no_grad():
        tiny_llava(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        mass = grounding.evidence_mass(1, queries, mask)
        loss = grounding.loss(queries[1:], mask)
    torch.testing.assert_close(mass[0], torch.ones(2))
    assert (mass[1] == 0).all()
    # evidence the query cannot see: a large loss, but finite (one bad lookup must not make the step NaN)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(-math.log(1e-6), rel=1e-3)


def test_the_loss_over_several_layers_is_the_average_of_their_losses(tiny_llava, tiny_spec):
    ids, mask, pixels = make_batch(tiny_spec, batch_size=2, left_pad=(0, 2))
    queries = [GroundingQuery(0, ids.shape[1] - 1, (3, 4)), GroundingQuery(1, ids.shape[1] - 2, (5,))]
    both, first, second = (AttentionGrounding(tiny_llava, layers=layers, heads=[1]) for layers in ([1, 2], [1], [2]))
    with both.capturing(), first.capturing(), second.capturing(), torch.no_grad():
        tiny_llava(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    expected = (first.loss(queries, mask) + second.loss(queries, mask)) / 2
    torch.testing.assert_close(both.loss(queries, mask), expected)


def test_a_batch_without_lookups_has_no_grounding_queries():
    assert grounding_queries({"input_ids": torch.ones(1, 3)}) == []
