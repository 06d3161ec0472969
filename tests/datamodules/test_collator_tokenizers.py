"""The collator's answer mask on a Llama-style SentencePiece/BPE tokenizer, and its truncation to max_length."""

import json
import warnings

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessor, LlamaTokenizer, LlavaProcessor

from lvlm_prune.data import IGNORE_INDEX, VQACollator, VQAExample
from lvlm_prune.modeling.prompt import VICUNA_V1

CORPUS = [VICUNA_V1.system + " USER: What is the color of the bus? ASSISTANT: The bus is red and white.",
          "USER: How many people are there? ASSISTANT: Two", "yes no red blue two three what is the a of"] * 20


def llama_style_processor(legacy: bool) -> LlavaProcessor:
    """A small byte-fallback BPE with Llama's '▁' pieces, in transformers' LlamaTokenizer, inside a LlavaProcessor."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=special, initial_alphabet=["\u2581"]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = LlamaTokenizer(vocab=bpe.get_vocab(), merges=merges, legacy=legacy)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    tokenizer.image_token = "<image>"
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def supervised_text(processor, batch, row=0) -> list[str]:
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    pieces, current = [], []
    for token, label in zip(ids.tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            pieces.append(processor.tokenizer.decode(current)), current.clear()
    if current:
        pieces.append(processor.tokenizer.decode(current))
    return pieces


@pytest.mark.parametrize("legacy", [False, True])
def test_every_answer_turn_is_supervised_on_a_llama_style_tokenizer(legacy):
    processor = llama_style_processor(legacy)
    collator = VQACollator(processor, VICUNA_V1, processor.tokenizer.convert_tokens_to_ids("<image>"), max_length=256)
    image = Image.new("RGB", (40, 30), (10, 20, 30))
    examples = [VQAExample(1, image, "What is the color of the bus?", "The bus is red and white.",
                           extra_turns=(("How many people are there?", "Two"), ("Is it blue?", "no"))),
                VQAExample(2, image, "What is the color of the bus?", "red")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sample may be masked for a boundary mismatch
        batch = collator(examples)
    assert supervised_text(processor, batch, 0) == ["The bus is red and white.</s>", "Two</s>", "no</s>"]
    assert supervised_text(processor, batch, 1) == ["red</s>"]


def test_a_conversation_longer_than_max_length_is_truncated_with_a_warning():
    processor = llama_style_processor(legacy=False)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    image = Image.new("RGB", (28, 28))
    long = VQAExample("long", image, "What is the color of the bus?", "red",
                      extra_turns=tuple(("How many people are there?", "Two") for _ in range(8)))
    short = VQAExample("short", image, "What is the color of the bus?", "red")
    full = VQACollator(processor, VICUNA_V1, image_token, max_length=1024)([long, short])
    keep = int(full["attention_mask"][0].sum()) - 10
    with pytest.warns(UserWarning, match=r"samples \['long'\]: truncated to data.max_length="):
        batch = VQACollator(processor, VICUNA_V1, image_token, max_length=keep)([long, short])
    assert batch["input_ids"].shape[1] == keep
    assert torch.equal(batch["labels"], full["labels"][:, :keep])
    assert torch.equal(batch["input_ids"][1], full["input_ids"][1, :keep])
    with pytest.raises(ValueError, match="sample long: its visual tokens reach past data.max_length=20"):
        VQACollator(processor, VICUNA_V1, image_token, max_length=20)([long])
