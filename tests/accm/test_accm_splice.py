import pytest
import torch

from lvlm_prune.accm import splice_after_image

IMG, PAD = 63, 0


def make_prompts():
    """Left-padded: [pad.., bos, img, img, question.., answer..] with labels on the answer."""
    ids = torch.tensor([
        [PAD, PAD, 1, IMG, IMG, 10, 11, 40],
        [1, IMG, IMG, 12, 13, 14, 41, 42],
    ])
    mask = (ids != PAD).long()
    labels = torch.full_like(ids, -100)
    labels[0, 7] = 40
    labels[1, 6:] = torch.tensor([41, 42])
    return ids, mask, labels


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_splice_inserts_after_last_image_token(padding_side):
    ids, mask, labels = make_prompts()
    insert = [torch.tensor([50, 51, 52]), torch.tensor([53])]
    out = splice_after_image(ids, mask, labels, IMG, insert, PAD, padding_side=padding_side)
    assert out.input_ids.shape == (2, 9)
    real = [row[m.bool()].tolist() for row, m in zip(out.input_ids, out.attention_mask)]
    assert real == [[1, IMG, IMG, 50, 51, 52, 10, 11, 40], [1, IMG, IMG, 53, 12, 13, 14, 41, 42]]
    real_labels = [row[m.bool()].tolist() for row, m in zip(out.labels, out.attention_mask)]
    assert real_labels == [[-100] * 8 + [40], [-100] * 7 + [41, 42]]
    assert (out.labels[~out.attention_mask.bool()] == -100).all()
    assert (out.input_ids[~out.attention_mask.bool()] == PAD).all()
    first_real = out.attention_mask.argmax(1)
    if padding_side == "left":
        assert out.attention_mask[:, -1].all() and first_real.tolist() == [0, 0]
        assert out.attention_mask[0].tolist() == [1] * 9
    else:
        assert out.attention_mask[:, 0].all()
    # Every old real token keeps its id at its new position; old padding maps to -1.
    for b in range(2):
        old_real = mask[b].bool()
        new_positions = out.positions[b, old_real]
        assert torch.equal(out.input_ids[b, new_positions], ids[b, old_real])
        assert (out.positions[b, ~old_real] == -1).all()
    inserted = out.inserted_mask()
    assert [out.input_ids[b, inserted[b]].tolist() for b in range(2)] == [[50, 51, 52], [53]]


def test_splice_handles_right_padded_input_empty_inserts_and_no_labels():
    ids = torch.tensor([[1, IMG, 10, PAD], [1, IMG, 11, 12]])
    mask = (ids != PAD).long()
    out = splice_after_image(ids, mask, None, IMG, [torch.tensor([], dtype=torch.long), torch.tensor([7, 8])],
                             PAD, padding_side="left")
    assert out.labels is None
    assert out.input_ids.tolist() == [[PAD, PAD, PAD, 1, IMG, 10], [1, IMG, 7, 8, 11, 12]]
    assert out.positions.tolist() == [[3, 4, 5, -1], [0, 1, 4, 5]]


def test_splice_names_the_sample_without_image_token():
    ids = torch.tensor([[1, IMG, 10], [1, 10, 11]])
    with pytest.raises(ValueError, match="sample 1"):
        splice_after_image(ids, torch.ones_like(ids), None, IMG, [torch.tensor([5]), torch.tensor([5])], PAD)
    with pytest.raises(ValueError, match="padding_side"):
        splice_after_image(ids, torch.ones_like(ids), None, IMG, [torch.tensor([5])] * 2, PAD, padding_side="middle")
