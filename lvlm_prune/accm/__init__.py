"""ACCM (Adaptive Content Compensation): caption model, selector, KL ranking, prompt splice and
vision-side pruning, as plain tensor-in / tensor-out building blocks."""

from lvlm_prune.accm.caption_model import CaptionCandidates, CaptionModel, PrefixMapper, pack_padding
from lvlm_prune.accm.ranking import (
    answer_kl,
    caption_and_selector_losses,
    dpo_loss,
    preference_pairs,
    pseudo_labels,
)
from lvlm_prune.accm.selector import CandidateSelector, CLIPTextEncoder, MeanPooledTextEncoder, build_selector_inputs
from lvlm_prune.accm.splice import SplicedBatch, splice_after_image
from lvlm_prune.accm.vision_pruning import (
    cls_attention_from_layer,
    cls_attention_from_vision_tower,
    prumerge_plus_select,
    text_relevance_scores,
)

__all__ = [
    "CaptionCandidates",
    "CaptionModel",
    "CandidateSelector",
    "CLIPTextEncoder",
    "MeanPooledTextEncoder",
    "PrefixMapper",
    "SplicedBatch",
    "answer_kl",
    "build_selector_inputs",
    "caption_and_selector_losses",
    "cls_attention_from_layer",
    "cls_attention_from_vision_tower",
    "dpo_loss",
    "pack_padding",
    "preference_pairs",
    "prumerge_plus_select",
    "pseudo_labels",
    "splice_after_image",
    "text_relevance_scores",
]
