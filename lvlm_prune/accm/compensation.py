"""ACCM on the engine: vision-side pruning before the LLM, compensated by a short caption of what was pruned.

One batch goes through these steps (METHODS.md section 4):

1. the vision tower runs once; a pre-LLM selection keeps K = max(1, round((1 - r) N)) visual tokens
   (PruMerge+-style by default, or a pre-LLM baseline);
2. the caption model reads the *discarded* visual tokens and writes M candidate captions (beam search);
3. the selector scores `"Question: ... Supplemental information: <candidate>"` and picks one;
4. `context_prefix + caption` is spliced right after the image tokens and the frozen LVLM answers from
   the kept visual tokens and the caption.

The caption model is a small GPT-2 built on the LVLM's vocabulary (its captions splice as token ids), or a pretrained
GPT-2 from `caption_decoder_path` with its own tokenizer (captions then go to the LVLM as text, re-encoded with the
LVLM's tokenizer). The selector's frozen text encoder is the base LM's embeddings or hidden states, or a CLIP text
encoder from `selector_encoder_path` with its own tokenizer.

Training is self-supervised. Stage 1 (progress < warmup_fraction) warm-starts the caption model on the
descriptions the frozen LVLM itself writes from all visual tokens for `describe_instruction`. Stage 2 ranks
the M candidates by the mean KL(full-token reference || pruned + candidate) of the frozen LVLM's answer
distributions and trains the caption model (margin-weighted CE on the best candidate, or DPO) and the
selector (CE toward the best candidate). The dataset's answer tokens serve only as the teacher-forced
continuation that marks where the answer positions are: both runs read the same answer tokens and the KL
compares the frozen model's two distributions there, never a distribution against the label, so no label is
ever a training target (as in the paper's self-supervision; a question-only variant would need the frozen
model's own greedy answer instead).
"""

from __future__ import annotations

import copy
import inspect
import math
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from lvlm_prune.accm.caption_model import CaptionCandidates, CaptionModel
from lvlm_prune.accm.ranking import (
    answer_kl,
    caption_and_selector_losses,
    dpo_loss,
    gate_loss,
    preference_pairs,
    pseudo_labels,
)
from lvlm_prune.accm.pretrained import (
    check_caption_decoder,
    check_clip_text_encoder,
    load_caption_decoder,
    load_clip_text_encoder,
)
from lvlm_prune.accm.selector import (
    CandidateSelector,
    GatedSelectorView,
    MeanPooledTextEncoder,
    build_selector_inputs,
)
from lvlm_prune.accm.splice import splice_after_image
from lvlm_prune.accm.vision_pruning import (
    cls_attention_to_visual_tokens,
    prumerge_plus_select,
    text_relevance_scores,
)
from lvlm_prune.baselines import build_method, pre_llm_keep_count
from lvlm_prune.compensation import Compensation, copy_weights, is_training_only
from lvlm_prune.data import first_answer_only
from lvlm_prune.engine import EngineOutput, ModelInfo, PreLLMContext, PrunedLlava, PruningMethod, gather_rows
from lvlm_prune.flops import LLMShape, llm_prefill_flops, module_flops
from lvlm_prune.modeling.prompt import IMAGE_PLACEHOLDER, get_template
from lvlm_prune.runner import GenerationResult, prompt_text_tokens

VARIANT_MODES = {"accm": "selector", "accm_oracle": "oracle", "accm_random": "random", "accm_prune_only": "prune_only",
                 "accm_top_beam": "top_beam", "accm_confidence": "confidence",
                 "accm_confidence_gate": "confidence_gate", "accm_gated": "gated"}
MODES = ("selector", "oracle", "random", "prune_only", "top_beam", "confidence", "confidence_gate", "gated")
VISION_SELECTIONS = ("prumerge", "random", "pool", "visionzip")
SELECTOR_ENCODERS = ("embeddings", "language_model", "clip_text")
# settings a pretrained caption decoder fixes, with the key of its config.json
CAPTION_SHAPE_KEYS = {"caption_embed_dim": "n_embd", "caption_num_layers": "n_layer", "caption_num_heads": "n_head"}
OBJECTIVES = ("kl_ce", "dpo")


class PruMergePlusPruning(PruningMethod):
    """ACCM's vision-side pruning: keep K tokens before the LLM = [CLS]-attention outliers (Q3 + 1.5 IQR) + the
    patches most similar to the question's token embeddings + an even fill, in raster order.

    The [CLS] attention is LLaVA-PruMerge's and ACCM's: one full-width head (softmax of q . k over all C channels
    scaled by C^-0.5, the CLS row) of the vision layer *after* the one LLaVA reads, whose input is the features LLaVA
    reads (LLaVA-1.5: layers[23] on the penultimate layer's output). Where LLaVA reads the last layer (the embedded
    default's tiny tower) there is no layer after it, and the read layer itself is used, with the same form.

    Args:
        prune_ratio: fraction of visual tokens removed (K = max(1, round((1 - r) N))).
        text_fraction: share of K kept for the patches most similar to the question (ACCM's code: 12 of 18).
        iqr_factor: outlier threshold Q3 + iqr_factor * IQR.
    """

    name = "prumerge"

    def __init__(self, prune_ratio: float = 0.0, text_fraction: float = 2 / 3, iqr_factor: float = 1.5):
        super().__init__(prune_ratio)
        if not 0.0 <= text_fraction <= 1.0:
            raise ValueError(f"prumerge: text_fraction={text_fraction} must be in [0, 1]")
        self.text_fraction = text_fraction
        self.iqr_factor = iqr_factor

    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        self.keep = pre_llm_keep_count(self.prune_ratio, info.num_visual_tokens, self.name)

    def planned_visual_tokens(self) -> list[float]:
        return [float(self.keep)] * self.info.num_layers

    @staticmethod
    def cls_attention(ctx: PreLLMContext) -> torch.Tensor:
        """(B, N) the [CLS] attention over the visual tokens: single-head, at the vision layer after the read one (the
        read layer where LLaVA reads the last)."""
        after = ctx.vision_layer_after_read()
        layer, layer_input = after if after is not None else ctx.vision_read_layer()
        return cls_attention_to_visual_tokens(layer, layer_input, ctx.visual_features.shape[1], single_head=True)

    def before_llm(self, ctx: PreLLMContext) -> torch.Tensor:
        features = ctx.visual_features
        b, n, _ = features.shape
        cls_attention = self.cls_attention(ctx)
        question = ctx.state.question_mask
        relevance = text_relevance_scores(features, ctx.text_embeds, question) if bool(question.any()) else None
        side = math.isqrt(n)
        index = prumerge_plus_select(cls_attention, relevance, self.keep,
                                     grid_side=side if side * side == n else None,
                                     text_fraction=self.text_fraction, iqr_factor=self.iqr_factor)
        keep = torch.zeros(b, n, dtype=torch.bool, device=features.device)
        return keep.scatter_(1, index, True)


class KeptVisualTokens(PruningMethod):
    """A pre-LLM selection computed once per batch and replayed on other prompts of the same images (the
    spliced prompts): the engine gets the selected features through `visual_inputs`, this returns the mask.

    Args:
        keep: (B, N) bool, the visual tokens the LLM sees.
        prune_ratio: the ratio the selection was made for (bookkeeping only).
    """

    name = "accm_keep"

    def __init__(self, keep: torch.Tensor, prune_ratio: float = 0.0):
        super().__init__(prune_ratio)
        self.keep = keep.bool()

    def planned_visual_tokens(self) -> list[float]:
        return [float(self.keep.sum(1).float().mean())] * self.info.num_layers

    def before_llm(self, ctx: PreLLMContext) -> torch.Tensor:
        if tuple(self.keep.shape) != tuple(ctx.visual_features.shape[:2]):
            raise ValueError(f"kept-token mask {tuple(self.keep.shape)} does not fit visual features "
                             f"{tuple(ctx.visual_features.shape[:2])}")
        return self.keep.to(ctx.visual_features.device)


@dataclass
class VisualSelection:
    """The visual tokens of one batch after ACCM's pre-LLM selection.

    Args:
        features: (B, N, d) projected visual tokens, as the vision tower gives them.
        vision_hidden: the vision tower's hidden states (for the full-token reference).
        kept_features: (B, N, d) what the LLM sees at the kept slots (pool/visionzip write merged tokens).
        keep: (B, N) bool, kept tokens.
        discarded: (B, Nd, d) the discarded tokens' original features, packed in raster order.
        discarded_mask: (B, Nd) bool, real entries of `discarded`.
        discarded_index: (B, Nd) original index (raster position) of each discarded token.
    """

    features: torch.Tensor
    vision_hidden: tuple[torch.Tensor, ...]
    kept_features: torch.Tensor
    keep: torch.Tensor
    discarded: torch.Tensor
    discarded_mask: torch.Tensor
    discarded_index: torch.Tensor


@dataclass
class SplicedSequences:
    """Prompts (or teacher-forced sequences) with `context_prefix + caption` after the image tokens.

    Args:
        input_ids: (R, L') ids. attention_mask: (R, L'). labels: (R, L') with -100 on inserted tokens, or None.
        position_ids: (R, L') RoPE positions counting every real token (hidden visual tokens included).
        inserted: (R, L') bool, the inserted tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    position_ids: torch.Tensor
    inserted: torch.Tensor


def splice_context(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    image_token_id: int,
    insert_ids: Sequence[torch.Tensor],
    pad_token_id: int,
    padding_side: str,
) -> SplicedSequences:
    """`splice_after_image` that keeps visual tokens hidden through the attention mask (mask 0 at an image
    position) in the sequence, still hidden, and recomputes the position ids.

    Args:
        input_ids: (R, L). attention_mask: (R, L). labels: (R, L) or None.
        image_token_id: the LVLM's image token. insert_ids: R 1-D tensors. pad_token_id: pad of the output.
        padding_side: 'left' (generation prompts) or 'right' (teacher-forced sequences).
    """
    is_image = input_ids == image_token_id
    real = (attention_mask > 0) | is_image
    spliced = splice_after_image(input_ids, real.long(), labels, image_token_id, insert_ids, pad_token_id,
                                 padding_side)
    mask = spliced.attention_mask.clone()
    hidden_rows, hidden_cols = (is_image & (attention_mask == 0)).nonzero(as_tuple=True)
    mask[hidden_rows, spliced.positions[hidden_rows, hidden_cols]] = 0
    positions = (spliced.attention_mask.long().cumsum(1) - 1).clamp(min=0)
    return SplicedSequences(spliced.input_ids, mask, spliced.labels, positions, spliced.inserted_mask())


def answer_logits(engine: PrunedLlava, output: EngineOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A, V) logits at the answer-generation positions of a teacher-forced `logits='none'` pass (only
    those rows go through the LM head), and (B, A) validity."""
    hidden, valid = gather_rows(output.state.hidden, output.state.answer_mask)
    return engine.model.lm_head(engine.language_model.norm(hidden)), valid


def _module_flops_unfused(module: nn.Module, *inputs: Any) -> float:
    # nn.TransformerEncoder takes a fused fast path in eval mode that FlopCounterMode does not see; train mode
    # runs the same matmuls op by op (dropout changes no FLOPs, and module_flops runs without grad).
    was_training = module.training
    module.train()
    try:
        return float(module_flops(module, *inputs))
    finally:
        module.train(was_training)


class ACCMCompensation(Compensation):
    """ACCM (METHODS.md section 4) as a plug-in of a frozen base: caption model + candidate selector.

    Args:
        target_prune_ratio: fraction of visual tokens removed before the LLM during training (0.969 = 18 of 576).
        vision_selection: pre-LLM selection: 'prumerge' (ACCM's) or a pre-LLM baseline ('random', 'pool',
            'visionzip').
        text_fraction: prumerge's share of K kept for the patches most similar to the question (ACCM's code: 12 of
            18; the [CLS]-attention outliers and an even fill take the rest).
        caption_decoder_path: local directory of a pretrained GPT-2 (`GPT2LMHeadModel` + its tokenizer, Hugging
            Face layout) to start the caption decoder from; it is trained with the rest of the plug-in and its
            weights are in the exported plug-in (the directory is read again to rebuild it). The caption model then
            works in that tokenizer's vocabulary: its instruction is tokenized with it, candidates reach the LVLM
            and the selector as text, the warm-start targets (the LVLM's descriptions) are re-tokenized into it.
            None: a decoder built from scratch on the LVLM's vocabulary.
        caption_embed_dim: caption decoder width. With caption_decoder_path the checkpoint fixes the width, depth
            and heads: caption_embed_dim, caption_num_layers and caption_num_heads must then stay at their defaults
            (ignored) or equal the checkpoint's values; another value is refused.
        caption_num_layers: caption decoder layers.
        caption_num_heads: caption decoder and mapper heads.
        caption_prefix_length: P prefix embeddings made from the discarded visual tokens ('queries' mode).
        caption_prefix_mode: 'queries' (ClipCap's P learned queries summarise the discarded tokens) or 'tokens'
            (one prefix embedding per discarded token; the decoder reads them with the instruction in view).
        caption_mapper_layers: transformer layers of the prefix mapper.
        caption_dropout: dropout of the caption decoder and mapper (replaces a pretrained decoder's own).
        caption_position_embedding: add a learned embedding of each discarded token's grid position before the
            mapper, which is otherwise a set model: it sees what was discarded, not where.
        caption_position_init_std: initial standard deviation of that embedding (0: zeros). It must be on the
            scale of the visual features to be seen: trained from zero at lr 1e-3 for a few hundred steps it stays
            far below them.
        caption_initializer_range: std of the caption decoder's initialisation (GPT-2's 0.02). On the embedded
            default 1/sqrt(width) (0.125) fitted the warm-start targets worse (docs/design.md). Unused with caption_decoder_path.
        max_caption_tokens: longest caption, EOS included (warm-start targets are cut to it as well).
        max_instruction_tokens: the caption model's instruction (describe_instruction with the question) is cut
            to this many tokens.
        num_candidates: M candidates per sample.
        num_beams: beams of the beam search (>= num_candidates).
        strategy: 'beam' or 'sample'.
        sample_temperature: softmax temperature for 'sample'.
        sample_top_p: nucleus mass for 'sample'.
        selector_hidden: selector transformer width.
        selector_layers: selector transformer layers.
        selector_heads: selector attention heads.
        selector_encoder: frozen text encoder of the selector: 'embeddings' (mean of the base LM's input
            embeddings: nearly free), 'language_model' (mean of the base LM's last hidden states) or 'clip_text'
            (the pooled output of the CLIP text encoder at selector_encoder_path: `text_embeds` when the checkpoint
            has a text projection).
        selector_encoder_path: local directory of a CLIP text encoder and its tokenizer (a whole CLIP model, a
            `CLIPTextModelWithProjection` or a `CLIPTextModel`); needed by 'clip_text', ignored otherwise. The
            encoder is frozen, held outside the plug-in's modules (never trained, never exported: it is reloaded
            from the path), and reads the selector's input as text cut to its max_position_embeddings tokens.
        selector_question_prefix: text before the question in the selector's input (paper: 'Question:').
        selector_supplement_prefix: text before the candidate (paper: 'Supplemental information:').
        context_prefix: text before the caption in the LVLM prompt.
        describe_instruction: format string with {question}: the instruction of the caption model, and the
            question the frozen LVLM answers with all visual tokens to make the warm-start captions.
        conversation_template: template of the data's prompts ('tiny', 'vicuna_v1'); builds the describe prompts.
        question_suffixes: answer-format instructions cut from the end of a question before it goes into
            describe_instruction and the selector's input (e.g. LLaVA's "Answer the question using a single word
            or phrase.", which would make the frozen LVLM's description one word long).
        warmup_fraction: fraction of training (progress) spent in stage 1, the caption warm start.
        objective: stage-2 caption objective: 'kl_ce' (margin-weighted CE on the lowest-KL candidate) or 'dpo'
            (lowest vs highest KL candidate against a frozen copy of the caption model taken at the stage-2 start).
        dpo_beta: DPO inverse temperature.
        caption_weight: weight of the caption term (warm-start CE, stage-2 CE or DPO).
        selector_weight: weight of the selector CE.
        caption_gate: also train a gate in the selector (its candidates as a whole -> one logit per sample) that
            decides whether the selector's pick is spliced at all, from the same stage-2 KLs: target "the pick's KL
            is below the pruned prompt's without a caption", weighted by the KL difference (`gate_loss`). The
            'accm_gated' variant uses it; 'accm' always splices, as METHODS.md's ACCM.
        gate_weight: weight of the gate loss.
        gate_scale: fixed factor on the gate's logit, in effect its learning rate relative to the selector's
            (`CandidateSelector`).
        seed: seeds the 'accm_random' variant's choice (per question id) and caption sampling (per batch of questions).
    """

    leaves_parameters_unused = True  # stage 1 trains the caption model alone: the selector gets no gradient
    # the DPO reference (objective 'dpo') is a training-time snapshot: exported weights leave it out
    training_only_prefixes = ("reference_caption_model.", "reference_discarded_positions.", "reference_ready")

    name = "accm"

    def __init__(
        self,
        target_prune_ratio: float = 0.969,
        vision_selection: str = "prumerge",
        text_fraction: float = 2 / 3,
        caption_decoder_path: str | None = None,
        caption_embed_dim: int = 128,
        caption_num_layers: int = 2,
        caption_num_heads: int = 4,
        caption_prefix_length: int = 8,
        caption_prefix_mode: str = "queries",
        caption_mapper_layers: int = 2,
        caption_dropout: float = 0.1,
        caption_position_embedding: bool = True,
        caption_position_init_std: float = 0.0,
        caption_initializer_range: float = 0.02,
        max_caption_tokens: int = 24,
        max_instruction_tokens: int = 32,
        num_candidates: int = 3,
        num_beams: int = 3,
        strategy: str = "beam",
        sample_temperature: float = 1.0,
        sample_top_p: float = 0.9,
        selector_hidden: int = 128,
        selector_layers: int = 1,
        selector_heads: int = 4,
        selector_encoder: str = "embeddings",
        selector_encoder_path: str | None = None,
        selector_question_prefix: str = "Question:",
        selector_supplement_prefix: str = "Supplemental information:",
        context_prefix: str = "additional information:",
        describe_instruction: str = "describe the objects that matter for : {question}",
        conversation_template: str = "tiny",
        question_suffixes: list[str] | None = None,
        warmup_fraction: float = 0.3,
        objective: str = "kl_ce",
        dpo_beta: float = 0.1,
        caption_weight: float = 1.0,
        selector_weight: float = 1.0,
        caption_gate: bool = False,
        gate_weight: float = 1.0,
        gate_scale: float = 10.0,
        seed: int = 0,
    ):
        super().__init__()
        self._config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if not 0.0 <= target_prune_ratio < 1.0:
            raise ValueError(f"accm target_prune_ratio={target_prune_ratio} must be in [0, 1)")
        if vision_selection not in VISION_SELECTIONS:
            raise ValueError(f"accm vision_selection={vision_selection!r}; choose one of {VISION_SELECTIONS}")
        if strategy not in ("beam", "sample"):
            raise ValueError(f"accm strategy={strategy!r}; choose 'beam' or 'sample'")
        if num_candidates < 2:
            raise ValueError(f"accm num_candidates={num_candidates} must be at least 2: the KL ranking trains on the "
                             "margin between candidates, which one candidate does not have")
        if strategy == "sample" and sample_temperature <= 0:
            raise ValueError(f"accm sample_temperature={sample_temperature} must be > 0")
        if not 0 < sample_top_p <= 1:
            raise ValueError(f"accm sample_top_p={sample_top_p} must be in (0, 1]")
        if strategy == "beam" and num_beams < num_candidates:
            raise ValueError(f"accm num_beams={num_beams} must be >= num_candidates={num_candidates}")
        if max_caption_tokens < 2:
            raise ValueError(f"accm max_caption_tokens={max_caption_tokens} must be at least 2 (a word and EOS)")
        if max_instruction_tokens < 1:
            raise ValueError(f"accm max_instruction_tokens={max_instruction_tokens} must be at least 1")
        if selector_encoder not in SELECTOR_ENCODERS:
            raise ValueError(f"accm selector_encoder={selector_encoder!r}; choose one of {SELECTOR_ENCODERS}")
        if selector_encoder == "clip_text" and selector_encoder_path is None:
            raise ValueError("accm selector_encoder='clip_text' needs selector_encoder_path (a local directory with a "
                             "CLIP text encoder and its tokenizer); it is None")
        if objective not in OBJECTIVES:
            raise ValueError(f"accm objective={objective!r}; choose one of {OBJECTIVES}")
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"accm warmup_fraction={warmup_fraction} must be in [0, 1]")
        if "{question}" not in describe_instruction:
            raise ValueError(f"accm describe_instruction={describe_instruction!r} must contain '{{question}}'")
        try:
            describe_instruction.format(question="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"accm describe_instruction={describe_instruction!r} is not a format string with "
                             f"only {{question}}: {error}") from error
        if dpo_beta <= 0:
            raise ValueError(f"accm dpo_beta={dpo_beta} must be > 0")
        self.template = get_template(conversation_template)
        self.target_prune_ratio = target_prune_ratio
        self.vision_selection = vision_selection
        self.text_fraction = text_fraction
        self.caption_decoder_path = caption_decoder_path
        self.caption_embed_dim, self.caption_num_layers = caption_embed_dim, caption_num_layers
        self.caption_num_heads, self.caption_prefix_length = caption_num_heads, caption_prefix_length
        self.caption_mapper_layers, self.caption_dropout = caption_mapper_layers, caption_dropout
        self.caption_position_embedding = caption_position_embedding
        if caption_prefix_mode not in ("queries", "tokens"):
            raise ValueError(f"accm caption_prefix_mode={caption_prefix_mode!r}; choose 'queries' or 'tokens'")
        if caption_position_init_std < 0:
            raise ValueError(f"accm caption_position_init_std={caption_position_init_std} must be >= 0")
        self.caption_prefix_mode, self.caption_position_init_std = caption_prefix_mode, caption_position_init_std
        self.caption_initializer_range = caption_initializer_range
        self.max_caption_tokens, self.max_instruction_tokens = max_caption_tokens, max_instruction_tokens
        self.num_candidates, self.num_beams, self.strategy = num_candidates, num_beams, strategy
        self.sample_temperature, self.sample_top_p = sample_temperature, sample_top_p
        self.selector_hidden, self.selector_layers = selector_hidden, selector_layers
        self.selector_heads = selector_heads
        self.selector_encoder, self.selector_encoder_path = selector_encoder, selector_encoder_path
        self.selector_question_prefix = selector_question_prefix
        self.selector_supplement_prefix = selector_supplement_prefix
        self.context_prefix = context_prefix
        self.describe_instruction = describe_instruction
        self.question_suffixes = [x.strip() for x in (question_suffixes or []) if x.strip()]
        self.warmup_fraction = warmup_fraction
        self.objective, self.dpo_beta = objective, dpo_beta
        self.caption_weight, self.selector_weight = caption_weight, selector_weight
        if gate_scale <= 0:
            raise ValueError(f"accm gate_scale={gate_scale} must be > 0")
        self.caption_gate, self.gate_weight, self.gate_scale = caption_gate, gate_weight, gate_scale
        self.seed = seed
        self._describe_cache: dict[str, list[int]] = {}
        self._flops_cache: dict[tuple[str, int], float] = {}

    def export_config(self) -> dict[str, Any]:
        return dict(self._config)

    def variants(self) -> list[str]:
        """Method names this plug-in answers in sweeps: 'accm' (selector pick), 'accm_oracle' (lowest KL against
        the full-token reference: needs the answer, analysis only), 'accm_random' (a seeded random candidate),
        'accm_prune_only' (the vision-side pruning alone), and two label-free picks that need no training of the
        selector: 'accm_top_beam' (the caption model's own first candidate) and 'accm_confidence' (the candidate
        whose spliced prompt the frozen LVLM, on the kept tokens, answers most confidently; M extra prefills,
        counted), and 'accm_confidence_gate', the same with the prompt without a caption as one more option (M + 1
        prefills), so that a sample whose kept tokens answer more surely alone gets no caption. With `caption_gate`,
        'accm_gated': the selector's pick, spliced only where the trained gate says so."""
        return [name for name, mode in VARIANT_MODES.items() if mode != "gated" or self.caption_gate]

    # ------------------------------------------------------------------ modules
    def attach(self, engine: PrunedLlava, tokenizer: Any) -> None:
        if tokenizer is None:
            raise ValueError("accm needs the LVLM's tokenizer (captions are spliced into its prompts as token ids)")
        # the pretrained parts' directories are checked before anything is built or loaded
        if self.caption_decoder_path is not None:
            self._check_caption_shape(check_caption_decoder(self.caption_decoder_path))
        if self.selector_encoder == "clip_text":
            check_clip_text_encoder(self.selector_encoder_path)
        self.tokenizer = tokenizer
        self.info: ModelInfo = engine.info
        self.image_token_id = engine.image_token_id
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ValueError("accm: the tokenizer has no eos_token_id; captions must end with EOS")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_token_id
        prefix_tokens = (self.caption_prefix_length if self.caption_prefix_mode == "queries"
                         else self.info.num_visual_tokens)
        if self.caption_decoder_path is None:
            self.caption_tokenizer = tokenizer
            self.caption_eos_token_id, self.caption_pad_token_id = self.eos_token_id, self.pad_token_id
            self.caption_model = CaptionModel(
                vocab_size=len(tokenizer), visual_dim=self.info.hidden_size, embed_dim=self.caption_embed_dim,
                num_layers=self.caption_num_layers, num_heads=self.caption_num_heads,
                prefix_length=self.caption_prefix_length, mapper_layers=self.caption_mapper_layers,
                max_length=self.max_instruction_tokens + self.max_caption_tokens + prefix_tokens,
                bos_token_id=bos, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                dropout=self.caption_dropout, prefix_mode=self.caption_prefix_mode,
                initializer_range=self.caption_initializer_range,
            )
        else:
            self.caption_model = self._pretrained_caption_model(prefix_tokens)
        if self.caption_position_embedding:
            self.discarded_positions = nn.Embedding(self.info.num_visual_tokens, self.info.hidden_size)
            nn.init.normal_(self.discarded_positions.weight, std=self.caption_position_init_std)
        if self.objective == "dpo":
            self.reference_caption_model = copy.deepcopy(self.caption_model).requires_grad_(False)
            if self.caption_position_embedding:
                self.reference_discarded_positions = copy.deepcopy(self.discarded_positions).requires_grad_(False)
            self.register_buffer("reference_ready", torch.zeros((), dtype=torch.bool))
        # the frozen encoder is held outside the module tree: neither the base nor CLIP becomes a plug-in parameter
        if self.selector_encoder == "clip_text":
            self.text_encoder = load_clip_text_encoder(self.selector_encoder_path)
            self.text_dim = self.text_encoder.width
        else:
            lm = engine.language_model
            self.text_encoder = MeanPooledTextEncoder(lm.embed_tokens if self.selector_encoder == "embeddings" else lm)
            self.text_dim = self.info.hidden_size
        self.llm_shape = LLMShape.from_config(engine.config.get_text_config())
        self.selector = CandidateSelector(self.text_dim, hidden=self.selector_hidden, num_layers=self.selector_layers,
                                          num_heads=self.selector_heads, gate=self.caption_gate,
                                          gate_scale=self.gate_scale)
        question_prefix = self._token_ids(self.selector_question_prefix)
        if self.selector_encoder == "language_model" and tokenizer.bos_token_id is not None:
            question_prefix = [tokenizer.bos_token_id] + question_prefix
        self.question_prefix_ids = question_prefix
        self.supplement_prefix_ids = self._token_ids(self.selector_supplement_prefix)
        self.context_prefix_ids = self._token_ids(self.context_prefix)
        # LVLM ids dropped from the frozen LVLM's descriptions (and, on a shared vocabulary, never generated)
        self.suppressed_token_ids = sorted({self.image_token_id} | ({bos} - {self.eos_token_id}))
        if self.caption_decoder_path is None:
            self.caption_suppressed_token_ids = self.suppressed_token_ids
        self._lvlm_special_ids = set(tokenizer.all_special_ids) | {self.image_token_id}

    def _check_caption_shape(self, config: dict[str, Any]) -> None:
        defaults = inspect.signature(ACCMCompensation.__init__).parameters
        for setting, key in CAPTION_SHAPE_KEYS.items():
            value = getattr(self, setting)
            if value != defaults[setting].default and value != config.get(key):
                raise ValueError(f"accm {setting}={value} conflicts with caption_decoder_path="
                                 f"{self.caption_decoder_path!r}, whose config.json has {key}={config.get(key)}; "
                                 f"the checkpoint fixes the decoder's shape: remove {setting} or set it to "
                                 f"{config.get(key)}")

    def _pretrained_caption_model(self, prefix_tokens: int) -> CaptionModel:
        """The caption model on the GPT-2 at caption_decoder_path, in its tokenizer's vocabulary."""
        path = self.caption_decoder_path
        decoder, caption_tokenizer = load_caption_decoder(path, self.caption_dropout)
        eos = caption_tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"accm caption_decoder_path={path!r}: its tokenizer has no eos_token; captions must end "
                             "with EOS")
        # GPT-2 has no pad token (and BOS = EOS): candidates are padded with EOS, their masks come from their lengths
        pad = caption_tokenizer.pad_token_id if caption_tokenizer.pad_token_id is not None else eos
        bos = caption_tokenizer.bos_token_id if caption_tokenizer.bos_token_id is not None else eos
        needed = self.max_instruction_tokens + self.max_caption_tokens + prefix_tokens
        if needed > decoder.config.n_positions:
            raise ValueError(f"accm max_instruction_tokens + max_caption_tokens + prefix ({needed} tokens) exceeds "
                             f"the {decoder.config.n_positions} positions of caption_decoder_path={path!r}")
        self.caption_tokenizer = caption_tokenizer
        self.caption_eos_token_id, self.caption_pad_token_id = eos, pad
        vocab = decoder.get_input_embeddings().num_embeddings
        # special tokens other than EOS, and rows the tokenizer has no token for, are never generated
        self.caption_suppressed_token_ids = sorted((set(caption_tokenizer.all_special_ids) - {eos})
                                                   | set(range(len(caption_tokenizer), vocab)))
        return CaptionModel(
            vocab_size=vocab, visual_dim=self.info.hidden_size, prefix_length=self.caption_prefix_length,
            mapper_layers=self.caption_mapper_layers, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
            dropout=self.caption_dropout, prefix_mode=self.caption_prefix_mode, decoder=decoder,
        )

    def _token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _caption_token_ids(self, text: str) -> list[int]:
        return list(self.caption_tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def caption_text(self, tokens: Sequence[int]) -> str:
        """A caption (caption-vocabulary ids, EOS dropped) as text."""
        return self.caption_tokenizer.decode(list(tokens), skip_special_tokens=True).strip()

    def lvlm_caption_ids(self, tokens: Sequence[int]) -> list[int]:
        """A caption (caption-vocabulary ids, EOS dropped) as LVLM ids: the same ids on a shared vocabulary, else its
        text re-encoded with the LVLM tokenizer without the LVLM's special tokens (a caption that spells '<image>'
        must not add an image token to the prompt)."""
        if self.caption_decoder_path is None:
            return list(tokens)
        return [t for t in self._token_ids(self.caption_text(tokens)) if t not in self._lvlm_special_ids]

    def candidate_tokens(self, candidates: CaptionCandidates, b: int, m: int) -> list[int]:
        """Candidate m of sample b: caption-vocabulary ids without EOS."""
        tokens = candidates.token_ids[b, m, : int(candidates.lengths[b, m])].tolist()
        return tokens[:-1] if tokens and tokens[-1] == self.caption_eos_token_id else tokens

    @staticmethod
    def _pad_rows(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids.to(device), mask.to(device)

    def question_text(self, question: str) -> str:
        """The question without surrounding space and without a trailing `question_suffixes` entry."""
        question = question.strip()
        for suffix in self.question_suffixes:
            if question.endswith(suffix):
                question = question[: -len(suffix)].strip()
        return question

    def instructions(self, questions: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Q) ids and mask of the caption model's instruction (describe_instruction with each question), in the
        caption model's vocabulary."""
        rows = [self._caption_token_ids(self.describe_instruction.format(question=self.question_text(q)))
                [: self.max_instruction_tokens] for q in questions]
        return self._pad_rows(rows, self.caption_pad_token_id, device)

    # ------------------------------------------------------------------ pruning
    def inference_method(self, prune_ratio: float) -> PruningMethod:
        """The pre-LLM selection alone at `prune_ratio` (the 'vision-side pruning alone' row)."""
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"accm prune_ratio={prune_ratio} must be in [0, 1)")
        if self.vision_selection == "prumerge":
            return PruMergePlusPruning(prune_ratio, text_fraction=self.text_fraction)
        return build_method(self.vision_selection, prune_ratio)

    @torch.no_grad()
    def select_visual_tokens(self, engine: PrunedLlava, batch: dict[str, Any], prune_ratio: float) -> VisualSelection:
        """Runs the vision tower once and the pre-LLM selection on the generation prompts (the question is what
        the text-guided share looks at, so training and inference select alike)."""
        method = engine.bind(self.inference_method(prune_ratio))  # first: refuses unsupported model families by name
        features, vision_hidden = engine.visual_features(batch["pixel_values"])
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        embeds = engine.language_model.embed_tokens(ids)
        state = engine.initial_state(ids, mask, batch.get("prompt_position_ids"), None, embeds)
        ctx = PreLLMContext(engine.model, batch["pixel_values"], features.to(embeds.dtype), embeds, state,
                            vision_hidden)
        keep = method.before_llm(ctx)
        keep = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device) if keep is None else keep.bool()
        discarded, discarded_mask = gather_rows(features, ~keep)
        positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        discarded_index = gather_rows(positions, ~keep)[0]
        return VisualSelection(features, vision_hidden, ctx.visual_features, keep, discarded, discarded_mask,
                               discarded_index)

    def caption_visual(self, selection: VisualSelection, reference: bool = False) -> torch.Tensor:
        """(B, Nd, d) what the caption model reads: the discarded tokens (+ their grid-position embedding); with
        `reference`, through the DPO reference's frozen copy of that embedding."""
        if not self.caption_position_embedding:
            return selection.discarded
        table = self.reference_discarded_positions if reference else self.discarded_positions
        position = table(selection.discarded_index)
        # in the plug-in's precision: added in a bf16 base's, a small learned embedding rounds away
        return selection.discarded.to(position.dtype) + position

    # ------------------------------------------------------------------ captions
    def _sampling_generator(self, batch: dict[str, Any], device: torch.device) -> torch.Generator | None:
        """Seeded by `seed` and the batch's questions: the same batch draws the same candidates whenever it comes
        (a resumed run, another sweep order), and ranks with different questions draw differently."""
        if self.strategy != "sample":
            return None
        key = "\x00".join(map(str, batch.get("question_ids") or batch["questions"]))
        return torch.Generator(device=device).manual_seed(zlib.crc32(f"{self.seed}/{key}".encode()))

    def caption_candidates(self, batch: dict[str, Any], selection: VisualSelection) -> CaptionCandidates:
        """M candidate captions per sample from the discarded visual tokens (no grad)."""
        ids, mask = self.instructions(batch["questions"], selection.features.device)
        return self.caption_model.generate_candidates(
            ids, mask, self.caption_visual(selection), selection.discarded_mask, num_candidates=self.num_candidates,
            num_beams=self.num_beams, max_new_tokens=self.max_caption_tokens, strategy=self.strategy,
            temperature=self.sample_temperature, top_p=self.sample_top_p,
            suppress_token_ids=self.caption_suppressed_token_ids, generator=self._sampling_generator(batch, ids.device),
            lockstep=self.lockstep,
        )

    def caption_inserts(self, candidates: CaptionCandidates, pick: torch.Tensor | None = None) -> list[torch.Tensor]:
        """LVLM token ids of `context_prefix + caption` (EOS dropped; see `lvlm_caption_ids`): one per sample for
        `pick` (B,), else all candidates, sample-major (row b * M + m)."""
        prefix = torch.tensor(self.context_prefix_ids, dtype=torch.long, device=candidates.token_ids.device)
        batch, num = candidates.lengths.shape
        choices = [(b, int(pick[b])) for b in range(batch)] if pick is not None else \
            [(b, m) for b in range(batch) for m in range(num)]
        inserts = []
        for b, m in choices:
            tokens = self.lvlm_caption_ids(self.candidate_tokens(candidates, b, m))
            inserts.append(torch.cat([prefix, torch.tensor(tokens, dtype=torch.long, device=prefix.device)]))
        return inserts

    def spliced_teacher_forced(self, batch: dict[str, Any], candidates: CaptionCandidates) -> SplicedSequences:
        """The teacher-forced sequences, repeated M times (row b * M + m), with candidate m spliced after the image
        tokens; inserted tokens carry label -100, so the answer positions stay the answer positions."""
        num = candidates.lengths.shape[1]
        ids = batch["input_ids"]
        # ACCM decides which visual tokens the LLM sees: tokens a dataset hides for augmentation are shown
        mask = (batch["attention_mask"].bool() | (ids == self.image_token_id)).long()
        return splice_context(ids.repeat_interleave(num, 0), mask.repeat_interleave(num, 0),
                              batch["labels"].repeat_interleave(num, 0), self.image_token_id,
                              self.caption_inserts(candidates), self.pad_token_id, "right")

    def _check_teacher_forced(self, batch: dict[str, Any], why: str) -> None:
        missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in batch]
        if missing:
            raise ValueError(f"accm {why} needs the teacher-forced answer sequences; the batch lacks {missing}")

    @torch.no_grad()
    def candidate_kl(self, engine: PrunedLlava, batch: dict[str, Any], selection: VisualSelection,
                     candidates: CaptionCandidates, prune_ratio: float) -> dict[str, torch.Tensor]:
        """Mean KL(full-token reference || pruned + candidate) over the answer positions of the frozen LVLM.

        Returns:
            {'kl': (B, M), 'kl_no_caption': (B,) the pruned prompt without caption, for reference}.
        """
        ids, labels = batch["input_ids"], batch["labels"]
        mask = (batch["attention_mask"].bool() | (ids == self.image_token_id)).long()
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        reference = engine.forward(ids, mask, None, position_ids, labels=labels, logits="none",
                                   visual_inputs=(selection.features, selection.vision_hidden))
        reference_logits, answer_mask = answer_logits(engine, reference)
        pruned = engine.forward(ids, mask, None, position_ids, labels=labels, logits="none",
                                method=KeptVisualTokens(selection.keep, prune_ratio),
                                visual_inputs=(selection.kept_features, ()))
        no_caption = answer_kl(reference_logits, answer_logits(engine, pruned)[0][:, None], answer_mask)[:, 0]
        num = candidates.lengths.shape[1]
        spliced = self.spliced_teacher_forced(batch, candidates)
        out = engine.forward(spliced.input_ids, spliced.attention_mask, None, spliced.position_ids,
                             labels=spliced.labels, logits="none",
                             method=KeptVisualTokens(selection.keep.repeat_interleave(num, 0), prune_ratio),
                             visual_inputs=(selection.kept_features.repeat_interleave(num, 0), ()))
        candidate_logits, _ = answer_logits(engine, out)
        if candidate_logits.shape[1] != reference_logits.shape[1]:
            raise RuntimeError("spliced sequences lost answer positions: inserted tokens must carry label -100")
        return {"kl": answer_kl(reference_logits, candidate_logits, answer_mask), "kl_no_caption": no_caption}

    def selector_scores(self, batch: dict[str, Any],
                        candidates: CaptionCandidates) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M) selector scores and (B, M) token counts of the encoded selector inputs ('clip_text': in CLIP's
        tokens)."""
        features, lengths = self.selector_features(batch, candidates)
        return self.selector(features), lengths

    def selector_scores_and_gate(self, batch: dict[str, Any], candidates: CaptionCandidates
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, M) selector scores, (B,) gate logits (> 0: splice the pick) and (B, M) selector input lengths."""
        features, lengths = self.selector_features(batch, candidates)
        scores, gate = self.selector.scores_and_gate(features)
        return scores, gate, lengths

    def selector_features(self, batch: dict[str, Any],
                          candidates: CaptionCandidates) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, text_dim) the frozen text encoder's features of "question + candidate" and (B, M) their token
        counts ('clip_text': in CLIP's tokens)."""
        batch_size, num = candidates.lengths.shape
        if self.selector_encoder == "clip_text":
            captions = [self.caption_text(self.candidate_tokens(candidates, b, m))
                        for b in range(batch_size) for m in range(num)]
            texts = [self.selector_text_parts(batch["questions"][i // num], caption)
                     for i, caption in enumerate(captions)]
            features, lengths = self.text_encoder(texts, candidates.token_ids.device)
            return features.reshape(batch_size, num, -1), lengths.reshape(batch_size, num)
        questions = [torch.tensor(self._token_ids(self.question_text(q)), dtype=torch.long) for q in batch["questions"]]
        candidate_ids = candidates.token_ids
        if self.caption_decoder_path is not None:
            rows = [self.lvlm_caption_ids(self.candidate_tokens(candidates, b, m))
                    for b in range(batch_size) for m in range(num)]
            candidate_ids = self._pad_rows(rows, self.pad_token_id, candidate_ids.device)[0]
            candidate_ids = candidate_ids.reshape(batch_size, num, -1)
        ids, mask = build_selector_inputs(questions, candidate_ids, self.question_prefix_ids,
                                          self.supplement_prefix_ids, self.pad_token_id, self.eos_token_id)
        return self.text_encoder(ids, mask).reshape(batch_size, num, -1), mask.sum(1).reshape(batch_size, num)

    def selector_text_parts(self, question: str, caption: str) -> tuple[str, str]:
        """The selector's input as text (for 'clip_text'), as (question prefix + question, supplement prefix +
        caption): CLIP's 77 positions are cut in the question, never in the caption the candidates differ by."""
        def joined(*parts: str) -> str:
            return " ".join(part.strip() for part in parts if part.strip())

        return (joined(self.selector_question_prefix, self.question_text(question)),
                joined(self.selector_supplement_prefix, caption))

    # ------------------------------------------------------------------ warm start
    def _caption_from_generation(self, tokens: list[int]) -> list[int]:
        """A warm-start target from the frozen LVLM's generated ids: in the caption model's vocabulary (re-encoded
        from the text when it has its own, without its special tokens), cut to max_caption_tokens, EOS last."""
        caption = []
        for token in tokens:
            if token == self.eos_token_id:
                break
            if token not in self.suppressed_token_ids and token != self.pad_token_id:
                caption.append(token)
        if self.caption_decoder_path is not None:
            special = set(self.caption_tokenizer.all_special_ids) | set(self.caption_suppressed_token_ids)
            text = self.tokenizer.decode(caption, skip_special_tokens=True).strip()
            caption = [t for t in self._caption_token_ids(text) if t not in special]
        return caption[: self.max_caption_tokens - 1] + [self.caption_eos_token_id]

    def describe_prompts(self, batch: dict[str, Any], rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts asking the frozen LVLM `describe_instruction` about the image of each sample in
        `rows`, with every visual token shown: the data's prompt up to its image tokens + the template's text
        after the image with the describe instruction as the question."""
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        prompts = []
        for b in rows:
            real = ids[b][(mask[b] > 0) | (ids[b] == self.image_token_id)].tolist()
            last_image = max(i for i, t in enumerate(real) if t == self.image_token_id)
            question = self.describe_instruction.format(question=self.question_text(batch["questions"][b]))
            after = self.template.prompt(question).split(IMAGE_PLACEHOLDER, 1)[1]
            prompts.append(real[: last_image + 1] + self._token_ids(after))
        width = max(len(p) for p in prompts)
        out_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        out_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            out_ids[i, width - len(prompt):] = torch.tensor(prompt)
            out_mask[i, width - len(prompt):] = 1
        return out_ids.to(ids.device), out_mask.to(ids.device)

    @torch.no_grad()
    def warm_start_captions(self, engine: PrunedLlava, batch: dict[str, Any],
                            selection: VisualSelection) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) caption targets and mask, in the caption model's vocabulary: the frozen LVLM's greedy answer to the
        describe prompt with all visual tokens, cut at EOS (kept) or at max_caption_tokens; cached per question id."""
        question_ids = [str(q) for q in batch["question_ids"]]
        missing = [b for b, q in enumerate(question_ids) if q not in self._describe_cache]
        # lockstep: every rank generates (a cached batch regenerates its first row) for the full length
        rows = missing or ([0] if self.lockstep else [])
        if rows:
            ids, mask = self.describe_prompts(batch, rows)
            index = torch.tensor(rows, device=selection.features.device)
            tokens, _ = engine.generate(ids, mask, None, method=None, max_new_tokens=self.max_caption_tokens,
                                        eos_token_id=None if self.lockstep else self.eos_token_id,
                                        pad_token_id=self.pad_token_id, visual_inputs=(selection.features[index], ()))
            for row, b in enumerate(rows):
                self._describe_cache[question_ids[b]] = self._caption_from_generation(tokens[row].tolist())
        return self._pad_rows([self._describe_cache[q] for q in question_ids], self.caption_pad_token_id,
                              selection.features.device)

    # ------------------------------------------------------------------ training
    def training_losses(self, engine: PrunedLlava, batch: dict[str, Any], progress: float) -> dict[str, torch.Tensor]:
        """Stage 1 (progress < warmup_fraction): 'caption_warmup', the caption model's token CE on the frozen LVLM's
        own descriptions. Stage 2: 'caption' (margin-weighted CE on the lowest-KL candidate) or 'dpo', 'selector'
        (CE toward that candidate), and for logging 'kl_best', 'kl_mean', 'kl_margin', 'kl_no_caption' (the pruned
        prompt without caption) and 'selector_accuracy'. 'loss' is the weighted total; 'stage' is 1 or 2."""
        self._check_teacher_forced(batch, "training")
        # the caption is asked for the first question: later turns of a multi-turn sample do not rank it
        batch = {**batch, "labels": first_answer_only(batch["labels"])}
        selection = self.select_visual_tokens(engine, batch, self.target_prune_ratio)
        instruction_ids, instruction_mask = self.instructions(batch["questions"], selection.features.device)
        if progress < self.warmup_fraction:
            targets, target_mask = self.warm_start_captions(engine, batch, selection)
            logprobs, mask = self.caption_model.caption_token_logprobs(
                instruction_ids, instruction_mask, self.caption_visual(selection), selection.discarded_mask, targets,
                target_mask)
            warm = -logprobs.sum() / mask.sum().clamp_min(1)
            return {"loss": self.caption_weight * warm, "caption_warmup": warm.detach(),
                    "stage": torch.tensor(1.0)}

        candidates = self.caption_candidates(batch, selection)
        with torch.no_grad():
            ranking = self.candidate_kl(engine, batch, selection, candidates, self.target_prune_ratio)
        kl = ranking["kl"]
        caption_mask = (torch.arange(candidates.token_ids.shape[2], device=kl.device)[None, None]
                        < candidates.lengths[..., None])
        training = self.caption_model.training
        if self.objective == "dpo":  # policy and reference are compared without dropout (as TRL's DPO trains)
            self.caption_model.eval()
        try:
            logprobs, caption_mask = self.caption_model.caption_token_logprobs(
                instruction_ids, instruction_mask, self.caption_visual(selection), selection.discarded_mask,
                candidates.token_ids, caption_mask)
        finally:
            self.caption_model.train(training)
        nll = -logprobs.sum(-1) / caption_mask.sum(-1).clamp_min(1)
        if self.caption_gate:
            scores, gate_logits, _ = self.selector_scores_and_gate(batch, candidates)
        else:
            scores, _ = self.selector_scores(batch, candidates)
        terms = caption_and_selector_losses(nll, scores, kl)
        best, margin = pseudo_labels(kl)
        if self.objective == "kl_ce":
            caption_name, caption_term = "caption", terms["caption"]
        else:
            caption_name, caption_term = "dpo", self._dpo_term(logprobs.sum(-1), kl, margin, instruction_ids,
                                                               instruction_mask, selection, candidates, caption_mask)
        losses = {"loss": self.caption_weight * caption_term + self.selector_weight * terms["selector"],
                  caption_name: caption_term.detach(), "selector": terms["selector"].detach()}
        if self.caption_gate:  # the gate judges the caption the selector would splice now
            kl_pick = kl.gather(1, scores.detach().argmax(-1, keepdim=True)).squeeze(1)
            gate = gate_loss(gate_logits, kl_pick, ranking["kl_no_caption"])
            losses["loss"] = losses["loss"] + self.gate_weight * gate
            losses.update(gate=gate.detach(), gate_splice_rate=(gate_logits.detach() > 0).float().mean(),
                          gate_target_rate=(kl_pick < ranking["kl_no_caption"]).float().mean())
        losses.update(
            kl_best=kl.min(-1).values.mean(), kl_mean=kl.mean(), kl_margin=margin.mean(),
            kl_no_caption=ranking["kl_no_caption"].mean(),
            selector_accuracy=(scores.argmax(-1) == best).float().mean(), stage=torch.tensor(2.0),
        )
        return losses

    def _dpo_term(self, policy_logp: torch.Tensor, kl: torch.Tensor, margin: torch.Tensor,
                  instruction_ids: torch.Tensor, instruction_mask: torch.Tensor, selection: VisualSelection,
                  candidates: CaptionCandidates, caption_mask: torch.Tensor) -> torch.Tensor:
        reference = self.reference_caption_model
        if not bool(self.reference_ready):
            copy_weights(self.caption_model, reference)
            if self.caption_position_embedding:
                copy_weights(self.discarded_positions, self.reference_discarded_positions)
            self.reference_ready.fill_(True)
        was_training = reference.training
        reference.eval()
        with torch.no_grad():
            reference_logp, _ = reference.caption_token_logprobs(
                instruction_ids, instruction_mask, self.caption_visual(selection, reference=True),
                selection.discarded_mask, candidates.token_ids, caption_mask)
        reference.train(was_training)
        reference_logp = reference_logp.sum(-1)
        chosen, rejected = preference_pairs(kl)

        def pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return values.gather(1, index[:, None]).squeeze(1)

        return dpo_loss(pick(policy_logp, chosen), pick(policy_logp, rejected), pick(reference_logp, chosen),
                        pick(reference_logp, rejected), beta=self.dpo_beta, weights=margin)

    # ------------------------------------------------------------------ inference
    def variant_mode(self, variant: str | None) -> str:
        """'selector' | 'oracle' | 'random' | 'prune_only' for a variant name (or a mode name; None = 'accm')."""
        variant = variant or self.name
        mode = VARIANT_MODES.get(variant, variant)
        if mode not in MODES:
            raise ValueError(f"accm variant={variant!r}; choose one of {list(VARIANT_MODES)} (or a mode {MODES})")
        if mode == "gated" and not self.caption_gate:
            raise ValueError(f"accm variant={variant!r} needs a plug-in trained with caption_gate: true (this one has "
                             "no gate)")
        return mode

    def random_pick(self, batch: dict[str, Any], num: int) -> torch.Tensor:
        """(B,) a seeded random candidate per sample, fixed by question id (independent of batching)."""
        ids = batch.get("question_ids") or [str(i) for i in range(len(batch["questions"]))]
        return torch.tensor([zlib.crc32(f"{self.seed}/{q}".encode()) % num for q in ids])

    @torch.no_grad()
    def generate(
        self,
        engine: PrunedLlava,
        batch: dict[str, Any],
        prune_ratio: float,
        max_new_tokens: int,
        eos_token_id: int | None,
        pad_token_id: int,
        variant: str | None = None,
    ) -> GenerationResult:
        """Prune -> M candidates -> pick (selector / oracle / random / top beam / confidence) -> splice into the
        left-padded prompt -> greedy answer on the kept visual tokens. 'prune_only' skips the caption, and the
        confidence gate may pick no caption. `plugin_flops` holds 'caption_model', 'selector' for the selector's
        pick and 'confidence' for the scoring prefills of the confidence picks (the oracle's KL passes are
        analysis, not counted)."""
        mode = self.variant_mode(variant)
        selection = self.select_visual_tokens(engine, batch, prune_ratio)
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        position_ids = batch.get("prompt_position_ids")
        flops: dict[str, torch.Tensor] = {}
        if mode != "prune_only":
            candidates = self.caption_candidates(batch, selection)
            if mode == "selector":
                scores, selector_lengths = self.selector_scores(batch, candidates)
                pick = scores.argmax(-1)
                flops["selector"] = self.selector_flops(selector_lengths)
            elif mode == "gated":  # pick == M: the gate says no caption
                scores, gate_logits, selector_lengths = self.selector_scores_and_gate(batch, candidates)
                pick = torch.where(gate_logits > 0, scores.argmax(-1), scores.shape[1])
                flops["selector"] = self.selector_flops(selector_lengths, with_gate=True)
            elif mode == "oracle":
                self._check_teacher_forced(batch, "variant 'accm_oracle'")
                pick = self.candidate_kl(engine, batch, selection, candidates, prune_ratio)["kl"].argmin(-1)
            elif mode in ("confidence", "confidence_gate"):
                pick, flops["confidence"] = self.confidence_pick(engine, batch, selection, candidates, prune_ratio,
                                                                 pad_token_id, mode == "confidence_gate")
            elif mode == "top_beam":
                pick = torch.zeros(candidates.lengths.shape[0], dtype=torch.long)
            else:
                pick = self.random_pick(batch, candidates.lengths.shape[1])
            num = candidates.lengths.shape[1]
            inserts = self.caption_inserts(candidates, pick.clamp(max=num - 1))
            # pick == M: no caption (a gate's choice)
            inserts = [insert if choice < num else insert[:0] for insert, choice in zip(inserts, pick.tolist())]
            spliced = splice_context(ids, mask, None, self.image_token_id, inserts, pad_token_id, "left")
            ids, mask, position_ids = spliced.input_ids, spliced.attention_mask, spliced.position_ids
            flops["caption_model"] = self.caption_flops(candidates, selection)
        tokens, counts = engine.generate(
            ids, mask, None, position_ids, method=KeptVisualTokens(selection.keep, prune_ratio),
            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            visual_inputs=(selection.kept_features, ()),
        )
        text = prompt_text_tokens(ids, mask, engine.image_token_id)
        return GenerationResult(tokens, counts, text, {k: v.to(text.device) for k, v in flops.items()})

    @torch.no_grad()
    def confidence_pick(self, engine: PrunedLlava, batch: dict[str, Any], selection: VisualSelection,
                        candidates: CaptionCandidates, prune_ratio: float, pad_token_id: int,
                        with_no_caption: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) the candidate whose spliced generation prompt the frozen LVLM, on the kept visual tokens only, gives
        the most probable first answer token (label-free: no full-token pass, no answer), and (B,) the FLOPs of
        those M prefills per sample (exact, with the LM head on the last position). With `with_no_caption` the
        prompt without a caption is option M (M + 1 prefills). The generation after the pick prefills the chosen
        prompt again and is counted as the LLM's own prefill, so these passes are all extra."""
        inserts = self.caption_inserts(candidates)
        num = candidates.lengths.shape[1]
        if with_no_caption:
            inserts = [row for b in range(0, len(inserts), num) for row in [*inserts[b:b + num], inserts[b][:0]]]
            num += 1
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        spliced = splice_context(ids.repeat_interleave(num, 0), mask.repeat_interleave(num, 0), None,
                                 self.image_token_id, inserts, pad_token_id, "left")
        out = engine.forward(spliced.input_ids, spliced.attention_mask, None, spliced.position_ids, logits="last",
                             method=KeptVisualTokens(selection.keep.repeat_interleave(num, 0), prune_ratio),
                             visual_inputs=(selection.kept_features.repeat_interleave(num, 0), ()))
        confidence = torch.log_softmax(out.logits.float(), -1).max(-1).values.reshape(-1, num)
        text = prompt_text_tokens(spliced.input_ids, spliced.attention_mask, self.image_token_id).tolist()
        flops = [llm_prefill_flops(self.llm_shape, float(n), visual, "exact", include_lm_head=True)
                 for n, visual in zip(text, out.visual_tokens_per_layer.tolist())]
        per_sample = torch.tensor(flops, dtype=torch.float64).reshape(-1, num).sum(1)
        return confidence.argmax(-1), per_sample.float().to(ids.device)

    def frozen_weights_needed(self) -> list[str]:
        """The DPO reference, once copied at the stage-2 start: it cannot be copied again later."""
        if self.objective != "dpo" or not bool(self.reference_ready):
            return []
        return [name for name, parameter in self.named_parameters()
                if not parameter.requires_grad and is_training_only(self, name)]

    # ------------------------------------------------------------------ FLOPs
    def caption_flops(self, candidates: CaptionCandidates, selection: VisualSelection) -> torch.Tensor:
        """(B,) caption-model FLOPs per sample: the prefix mapper over the discarded tokens (measured with
        module_flops) + the decoder, analytic for GPT-2 (2 FLOPs per multiply-add, full attention as computed):
        prefill of the prefix (Lp tokens, logits of the last one) and every decode step of every beam with the
        KV cache (one token attending to Lp + s keys at step s, plus its logits). Sampling, like beam search,
        feeds every row of a sample until its last candidate ends."""
        config = self.caption_model.decoder.config
        d, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
        mapper = torch.tensor([self._mapper_flops(count, selection.features.device)
                               for count in selection.discarded_mask.sum(1).tolist()], dtype=torch.float64)
        prefix = candidates.prefix_lengths.double()
        decoded = candidates.decode_tokens.double()
        rows = self.num_beams if self.strategy == "beam" else self.num_candidates
        steps = decoded / rows
        linear = 24 * d * d * layers
        prefill = prefix * linear + 4 * prefix * prefix * d * layers + 2 * d * vocab
        context = rows * (steps * prefix + steps * (steps + 1) / 2)
        decode = decoded * (linear + 2 * d * vocab) + 4 * d * layers * context
        return (mapper.to(prefix.device) + prefill + decode).float()

    def _mapper_flops(self, count: int, device: torch.device) -> float:
        key = ("mapper", int(count))
        if key not in self._flops_cache:
            visual = torch.zeros(1, int(count), self.info.hidden_size, device=device)
            self._flops_cache[key] = _module_flops_unfused(self.caption_model.mapper, visual)
        return self._flops_cache[key]

    def selector_flops(self, input_lengths: torch.Tensor, with_gate: bool = False) -> torch.Tensor:
        """(B,) selector FLOPs per sample: the frozen text encoder on every candidate's input (`input_lengths` (B, M)
        tokens of its own tokenizer; 0 matmul FLOPs for 'embeddings'; the base LM's exact prefill count without LM head
        for 'language_model'; the CLIP text encoder's exact count, `CLIPTextEncoder.flops`, for 'clip_text') + the
        selector transformer on the M features (module_flops; with its gate head for `with_gate`)."""
        num = input_lengths.shape[1]
        key = ("selector_gate" if with_gate else "selector", num)
        if key not in self._flops_cache:
            device = next(self.selector.parameters()).device
            module = GatedSelectorView(self.selector) if with_gate else self.selector
            self._flops_cache[key] = _module_flops_unfused(module, torch.zeros(1, num, self.text_dim, device=device))
        encoder = torch.zeros(input_lengths.shape, dtype=torch.float64)
        if self.selector_encoder == "language_model":
            zeros = [0.0] * self.llm_shape.num_layers
            encoder = torch.tensor([[llm_prefill_flops(self.llm_shape, float(n), zeros, "exact") for n in row]
                                    for row in input_lengths.tolist()], dtype=torch.float64)
        elif self.selector_encoder == "clip_text":
            encoder = torch.tensor([[self.text_encoder.flops(n) for n in row] for row in input_lengths.tolist()],
                                   dtype=torch.float64)
        return (encoder.sum(1) + self._flops_cache[key]).float().to(input_lengths.device)
