"""Offline tokenizer and processor for the tiny default model (no hub download)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from lvlm_prune.modeling.prompt import IMAGE_PLACEHOLDER

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def build_word_tokenizer(words: list[str], template_words: tuple[str, ...] = ("USER", "ASSISTANT", ":")) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: ids 0..3 are pad, bos, eos, unk; the image token is last.

    Text is split on whitespace and punctuation; BOS is prepended like LLaMA's tokenizer does.
    """
    vocab_words = list(SPECIAL_TOKENS)
    for word in list(template_words) + sorted(set(words)):
        if word not in vocab_words:
            vocab_words.append(word)
    vocab_words.append(IMAGE_PLACEHOLDER)
    vocab = {w: i for i, w in enumerate(vocab_words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no subword glue
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    return tokenizer


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int) -> LlavaProcessor:
    """A `LlavaProcessor` (PIL CLIP image processor: torchvision is not needed) that expands
    `<image>` into (image_size / patch_size)^2 image tokens, CLS dropped as LLaVA-1.5 does."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_PLACEHOLDER,
        num_additional_image_tokens=1,
    )
