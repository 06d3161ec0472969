"""Unit-level behaviour of `lvlm_prune.accm.pretrained` that the plug-in tests do not pin: the loaders called directly
on tiny random checkpoints saved to tmp_path (float32, dropout, '~' paths, the quiet and restored transformers
logging, and each refusal naming its setting); and of `lvlm_prune.engine.state` (dtypes, empty batches, the order of
long rows, the soft weights through compaction)."""

import json
import logging as std_logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_accm_pretrained import EOT, SOT, UNK, save_tiny_clip, save_tiny_gpt2, word_tokenizer
from transformers import GPT2LMHeadModel
from transformers.utils import logging

from lvlm_prune.accm.pretrained import (
    check_caption_decoder,
    load_caption_decoder,
    load_clip_text_encoder,
)
from lvlm_prune.engine.state import SequenceState, gather_rows


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained_units")
    return {"gpt2": save_tiny_gpt2(root / "gpt2", n_layer=2), "clip": save_tiny_clip(root / "clip"),
            "clip_full": save_tiny_clip(root / "clip_full", kind="full")}


def copy(dirs, name, tmp_path):
    return shutil.copytree(dirs[name], tmp_path / name)


# ---------------------------------------------------------------------------------------------------- caption decoder
def test_a_bfloat16_decoder_checkpoint_loads_in_float32(dirs, tmp_path):
    directory = copy(dirs, "gpt2", tmp_path)
    GPT2LMHeadModel.from_pretrained(directory).to(torch.bfloat16).save_pretrained(directory)
    decoder, _ = load_caption_decoder(directory, 0.0)
    assert {p.dtype for p in decoder.parameters()} == {torch.float32}


def test_every_dropout_of_the_decoder_is_the_given_one(dirs):
    decoder, _ = load_caption_decoder(dirs["gpt2"], 0.3)  # the checkpoint's own are GPT-2's 0.1
    config = decoder.config
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.3, 0.3, 0.3)
    rates = {name: m.p for name, m in decoder.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert {"transformer.drop", "transformer.h.0.attn.attn_dropout", "transformer.h.0.attn.resid_dropout",
            "transformer.h.0.mlp.dropout"} <= set(rates)
    assert set(rates.values()) == {0.3}


def test_paths_starting_with_a_tilde_are_read_from_the_home_directory(dirs, tmp_path, monkeypatch):
    copy(dirs, "gpt2", tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_caption_decoder("~/gpt2")["model_type"] == "gpt2"
    decoder, tokenizer = load_caption_decoder("~/gpt2", 0.0)
    reference = GPT2LMHeadModel.from_pretrained(dirs["gpt2"])
    assert torch.equal(decoder.transformer.wte.weight, reference.transformer.wte.weight)
    assert tokenizer.eos_token == EOT


def test_a_legacy_vocab_json_counts_as_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    (tmp_path / "vocab.json").write_text(json.dumps({EOT: 0}))
    assert check_caption_decoder(tmp_path) == {"model_type": "gpt2", "n_embd": 8}


def test_a_decoder_that_is_not_gpt2_is_refused_by_the_loader_itself(dirs):
    with pytest.raises(ValueError, match=r"caption_decoder_path=.* is not a GPT-2 checkpoint: .*'clip_text_model'"):
        load_caption_decoder(dirs["clip"], 0.0)


def test_a_tokenizer_that_does_not_load_is_named(dirs, tmp_path):
    directory = copy(dirs, "gpt2", tmp_path)
    (directory / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"accm caption_decoder_path=.*gpt2': its tokenizer does not load"):
        load_caption_decoder(directory, 0.0)


def test_weights_that_are_absent_or_incomplete_are_named(dirs, tmp_path):
    directory = copy(dirs, "gpt2", tmp_path)
    weights = directory / "model.safetensors"
    state = load_file(str(weights))
    weights.unlink()
    with pytest.raises(ValueError, match=r"caption_decoder_path=.*: the GPT2LMHeadModel weights do not load"):
        load_caption_decoder(directory, 0.0)
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"caption_decoder_path=.*: the checkpoint does not fill GPT2LMHeadModel: "
                                         r"missing \['transformer.h.1.mlp.c_fc.weight'\]"):
        load_caption_decoder(directory, 0.0)


@pytest.mark.parametrize("name, loader", [("gpt2", lambda d: load_caption_decoder(d, 0.0)),
                                          ("clip", load_clip_text_encoder)])
def test_a_damaged_weights_header_is_named(dirs, tmp_path, name, loader):
    directory = copy(dirs, name, tmp_path)
    (directory / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"_path=.*: the \w+ weights do not load \(.*header"):
        loader(directory)


# ---------------------------------------------------------------------------------------------------- CLIP encoder
def test_a_whole_clip_loads_quietly_and_leaves_the_verbosity_as_it_was(dirs):
    """transformers reports every unused vision weight of a whole CLIP as a warning; the loader silences it for the
    load only."""
    records = []
    handler = std_logging.Handler(std_logging.WARNING)
    handler.emit = records.append
    library = logging.get_logger()  # transformers' root logger: its level is the verbosity
    before = logging.get_verbosity()
    logging.set_verbosity_warning()
    library.addHandler(handler)
    try:
        encoder = load_clip_text_encoder(dirs["clip_full"])
        assert logging.get_verbosity() == logging.WARNING
        library.warning("after the load")
    finally:
        library.removeHandler(handler)
        logging.set_verbosity(before)
    assert encoder.width == 8
    assert [r.getMessage() for r in records] == ["after the load"]


@pytest.mark.parametrize("name, content, message", [
    ("clip", "{", r"selector_encoder_path=.*clip': config.json is not valid JSON"),
    ("gpt2", "[]", r"caption_decoder_path=.*gpt2': config.json holds a JSON list, not a model config")])
def test_a_config_json_that_is_no_json_object_is_named(dirs, tmp_path, name, content, message):
    directory = copy(dirs, name, tmp_path)
    (directory / "config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_clip_text_encoder(directory) if name == "clip" else check_caption_decoder(directory)


def test_an_encoder_that_is_not_clip_is_refused_by_the_loader_itself(dirs):
    with pytest.raises(ValueError, match=r"selector_encoder_path=.* is not a CLIP text checkpoint: .*'gpt2'"):
        load_clip_text_encoder(dirs["gpt2"])


def resave_clip_tokenizer(directory, **kwargs):
    words = sorted(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"])
    words = [w for w in words if w not in (SOT, EOT, UNK)]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)
    word_tokenizer([SOT, EOT, UNK], words, bos_token=SOT, **kwargs).save_pretrained(directory)


def test_a_clip_tokenizer_without_eos_is_refused(dirs, tmp_path):
    directory = copy(dirs, "clip", tmp_path)
    resave_clip_tokenizer(directory, template=f"{SOT} $A {EOT}")
    with pytest.raises(ValueError, match=r"selector_encoder_path=.*: its tokenizer has no eos_token"):
        load_clip_text_encoder(directory)


def test_a_clip_tokenizer_that_does_not_end_texts_with_eos_is_refused(dirs, tmp_path):
    directory = copy(dirs, "clip", tmp_path)
    resave_clip_tokenizer(directory, eos_token=EOT, pad_token=EOT)  # no template: no BOS/EOS added
    with pytest.raises(ValueError, match=r"selector_encoder_path=.*: its tokenizer does not end a text with EOS "
                                         r"\(id 1\)"):
        load_clip_text_encoder(directory)


def set_eos_token_id(directory, value):
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = value
    (directory / "config.json").write_text(json.dumps(config))


def test_the_model_must_pool_at_the_tokenizer_eos_or_at_the_highest_id(dirs, tmp_path):
    directory = copy(dirs, "clip", tmp_path)
    set_eos_token_id(directory, 5)
    with pytest.raises(ValueError, match=r"selector_encoder_path=.*: the model pools at eos_token_id=5 but its "
                                         r"tokenizer's EOS is 1"):
        load_clip_text_encoder(directory)
    set_eos_token_id(directory, 2)  # transformers' marker of the original CLIP configs
    encoder = load_clip_text_encoder(directory)
    assert encoder.model.config.eos_token_id == 2 and encoder.tokenizer.eos_token_id == 1


# ---------------------------------------------------------------------------------------------------- SequenceState
def state_of(keep_valid: torch.Tensor, **changes) -> SequenceState:
    b, t = keep_valid.shape
    fields = dict(hidden=torch.arange(b * t, dtype=torch.float32).view(b, t, 1),
                  position_ids=torch.arange(t).expand(b, t).clone(), key_valid=keep_valid,
                  visual_index=torch.arange(t).expand(b, t).clone(), question_mask=torch.zeros(b, t, dtype=torch.bool),
                  answer_mask=torch.zeros(b, t, dtype=torch.bool), source_index=torch.arange(t).expand(b, t).clone())
    fields.update(changes)
    return SequenceState(**fields)


def test_visual_counts_are_float():
    counts = state_of(torch.tensor([[True, False, True]])).visual_counts()
    assert counts.dtype == torch.float32 and counts.tolist() == [2.0]


def test_an_empty_batch_compacts_and_gathers_to_an_empty_batch():
    state = state_of(torch.zeros(0, 4, dtype=torch.bool))
    out = state.compact(torch.ones(0, 4, dtype=torch.bool))
    assert out.hidden.shape == (0, 0, 1) and out.source_index.shape == (0, 0)
    rows, valid = gather_rows(torch.zeros(0, 4, 3), torch.zeros(0, 4, dtype=torch.bool), min_width=2)
    assert rows.shape == (0, 2, 3) and valid.shape == (0, 2)


def test_long_rows_keep_their_order_when_compacted_or_gathered():
    """Sorting the kept tokens first must be stable: a long row (here 300 tokens) is where an unstable sort
    reorders them."""
    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(2, 300, generator=generator) < 0.5
    state = state_of(torch.ones(2, 300, dtype=torch.bool))
    out = state.compact(keep)
    rows, valid = gather_rows(state.source_index, keep)
    for b in range(2):
        expected = keep[b].nonzero().flatten().tolist()
        assert out.source_index[b][out.key_valid[b]].tolist() == expected
        assert rows[b][valid[b]].tolist() == expected


def test_compaction_carries_the_soft_key_weights():
    weight = torch.tensor([[0.9, 0.2, 0.7, 0.6]])
    state = state_of(torch.ones(1, 4, dtype=torch.bool), key_weight=weight)
    out = state.compact(torch.tensor([[True, False, True, True]]))
    assert out.key_weight[0].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert out.with_hidden(torch.zeros(1, 3, 1)).key_weight is out.key_weight
