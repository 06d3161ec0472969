"""Turning VQA examples into model batches (plain PyTorch; used by every datamodule)."""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Sampler

from lvlm_prune.modeling.prompt import ConversationTemplate

IGNORE_INDEX = -100


@dataclass
class VQAExample:
    """One image + question (+ answer for training), in a format-neutral form.

    Args:
        question_id: unique id (kept through to the answer file).
        image: RGB image.
        question: the question text (the user's instruction).
        answer: the target answer (None at pure inference).
        category: question family / benchmark category for per-category metrics.
        context: optional text placed after the image and before the question.
        hidden_visual_fraction: fraction of visual tokens hidden from the LLM in this example
            (training-time augmentation; 1.0 = the LLM sees no visual token).
        extra_turns: later (question, answer) turns about the same image (multi-turn training data).
        protected_visual: indices (in the image's visual-token order) that hiding never touches: the tokens the
            answers depend on, so a partly hidden image still supports its answers; `hidden_visual_fraction` is the
            share of the other tokens that is hidden.
        evidence: per answer turn (the first answer, then each extra turn's), the visual-token indices that answer
            depends on, or () for none; when given, the collator adds `grounding` lookups for
            `lvlm_prune.modeling.grounding` (training the base from scratch on data whose generator knows them).
    """

    question_id: int | str  # as the question file has it (LLaVA keeps integer ids)
    image: Image.Image
    question: str
    answer: str | None = None
    category: str = ""
    context: str | None = None
    hidden_visual_fraction: float = 0.0
    extra_turns: tuple[tuple[str, str], ...] = ()
    protected_visual: tuple[int, ...] = ()
    evidence: tuple[tuple[int, ...], ...] = ()


class VQACollator:
    """Builds two layouts per batch from a `LlavaProcessor`:

    - teacher-forced (`input_ids`, `attention_mask`, `position_ids`, `labels`), right-padded, labels on the
      answer tokens + EOS only;
    - generation prompts (`prompt_input_ids`, `prompt_attention_mask`), left-padded, ending at `ASSISTANT:`.

    `attention_mask` of the teacher-forced layout also hides the visual tokens an example asks to hide;
    `position_ids` are computed before hiding, so hidden tokens keep the positions they would have had.
    Teacher-forced sequences longer than `max_length` are cut to it (with a warning), as LLaVA's training cuts to
    `model_max_length`.
    """

    def __init__(self, processor: Any, template: ConversationTemplate, image_token_id: int, max_length: int = 512, seed: int = 0):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.seed = seed

    def _encode(self, images: list[Image.Image], texts: list[str], side: str) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = side
        return self.processor(images=images, text=texts, padding=True, return_tensors="pt")

    def __call__(self, examples: list[VQAExample]) -> dict[str, Any]:
        if not examples:
            raise ValueError("empty batch")
        images = [e.image for e in examples]
        prompts = [self.template.prompt(e.question, e.context) for e in examples]
        batch: dict[str, Any] = {
            "question_ids": [e.question_id for e in examples],
            "questions": [e.question for e in examples],
            "answers": [e.answer for e in examples],
            "categories": [e.category for e in examples],
            "contexts": [e.context for e in examples],
        }
        generation = self._encode(images, prompts, side="left")
        batch["pixel_values"] = generation["pixel_values"]
        if "image_sizes" in generation:  # LLaVA-NeXT processors: the anyres layout depends on each image's size
            batch["image_sizes"] = generation["image_sizes"]
        batch["prompt_input_ids"] = generation["input_ids"]
        batch["prompt_position_ids"] = (generation["attention_mask"].cumsum(1) - 1).clamp(min=0)
        batch["prompt_attention_mask"] = self._hide_visual(generation["input_ids"], generation["attention_mask"], examples)
        if any(e.answer is None for e in examples):
            return batch

        segments = [self._segments(e) for e in examples]
        full = [p + "".join(text for text, _ in segs) for p, segs in zip(prompts, segments)]
        teacher = self._encode(images, full, side="right")
        input_ids, attention_mask = teacher["input_ids"], teacher["attention_mask"]
        prompt_lengths = generation["attention_mask"].sum(1).tolist()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        answer_starts: list[list[int]] = []
        for i, (n_prompt, ends) in enumerate(zip(prompt_lengths, self._segment_ends(prompts, segments))):
            starts = []
            if ends[-1] + n_prompt != int(attention_mask[i].sum()):
                warnings.warn(f"sample {examples[i].question_id}: its turns' token boundaries do not add up to the whole "
                              "conversation's tokens, so no answer token of it is supervised (LLaVA masks such samples "
                              "too)", stacklevel=2)
            else:
                for (_, supervised), begin, end in zip(segments[i], [0, *ends[:-1]], ends):
                    if supervised:
                        labels[i, n_prompt + begin : n_prompt + end] = input_ids[i, n_prompt + begin : n_prompt + end]
                        starts.append(n_prompt + begin)
            answer_starts.append(starts)
        if input_ids.shape[1] > self.max_length:
            input_ids, attention_mask, labels = self._truncate(input_ids, attention_mask, labels, examples)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        attention_mask = self._hide_visual(input_ids, attention_mask, examples)
        batch.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
        if any(e.evidence for e in examples):
            batch["grounding"] = self._grounding(input_ids, attention_mask, examples, answer_starts)
        return batch

    def _grounding(self, input_ids, attention_mask, examples, answer_starts) -> list[tuple[int, int, tuple[int, ...]]]:
        """(row, position predicting an answer's first token, sequence positions of its visible evidence)."""
        lookups = []
        for i, (e, starts) in enumerate(zip(examples, answer_starts)):
            if e.evidence and starts and len(e.evidence) != len(starts):
                raise ValueError(f"sample {e.question_id}: evidence for {len(e.evidence)} answer turns, but the "
                                 f"conversation has {len(starts)}")
            image_positions = (input_ids[i] == self.image_token_id).nonzero().squeeze(1).tolist()
            for indices, start in zip(e.evidence, starts):
                if start > input_ids.shape[1]:  # truncated away
                    continue
                outside = [j for j in indices if not 0 <= j < len(image_positions)]
                if outside:
                    raise ValueError(f"sample {e.question_id}: evidence visual tokens {outside} outside the image's "
                                     f"{len(image_positions)} visual tokens")
                visible = tuple(image_positions[j] for j in indices if attention_mask[i, image_positions[j]])
                if visible:
                    lookups.append((i, start - 1, visible))
        return lookups

    def _segment_ends(self, prompts: list[str], segments: list[list[tuple[str, bool]]]) -> list[list[int]]:
        """Per example, where each segment ends, in tokens after the prompt. Measured on cumulative prefixes of the
        conversation, not on segments alone: a tokenizer may split a segment differently at the start of a string
        than after the previous one (Llama's, for "USER" right after "</s>")."""
        texts, spans = [], []
        for prompt, segs in zip(prompts, segments):
            start = len(texts)
            texts.append(prompt)
            for text, _ in segs:
                texts.append(texts[-1] + text)
            spans.append((start, len(texts)))
        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        return [[lengths[k] - lengths[start] for k in range(start + 1, stop)] for start, stop in spans]

    def _truncate(self, input_ids, attention_mask, labels, examples):
        """Cuts the teacher-forced layout to max_length tokens, as LLaVA's training does; an image must fit whole."""
        keep = self.max_length
        cut = [i for i in range(len(examples)) if int(attention_mask[i].sum()) > keep]
        for i in cut:
            if (input_ids[i, keep:] == self.image_token_id).any():
                raise ValueError(f"sample {examples[i].question_id}: its visual tokens reach past data.max_length={keep} "
                                 "tokens; raise data.max_length or shorten the text before the image")
        warnings.warn(f"samples {[examples[i].question_id for i in cut]}: truncated to data.max_length={keep} tokens "
                      "(as LLaVA truncates to model_max_length); their answer tokens past it are not supervised",
                      stacklevel=3)
        return input_ids[:, :keep], attention_mask[:, :keep], labels[:, :keep]

    def _segments(self, example: VQAExample) -> list[tuple[str, bool]]:
        """The text after the prompt as (segment, is_answer) pairs."""
        segments = [(self.template.target(example.answer), True)]
        for question, answer in example.extra_turns:
            segments += [(self.template.next_turn(question), False), (self.template.target(answer), True)]
        return segments

    def _hide_visual(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, examples: list[VQAExample]) -> torch.Tensor:
        """Zero the mask at a seeded subset of each example's visual positions (same subset in both layouts)."""
        attention_mask = attention_mask.clone()
        for i, e in enumerate(examples):
            if e.hidden_visual_fraction > 0:
                image_positions = (input_ids[i] == self.image_token_id).nonzero().squeeze(1).tolist()
                outside = [j for j in e.protected_visual if not 0 <= j < len(image_positions)]
                if outside:
                    raise ValueError(f"sample {e.question_id}: protected visual tokens {outside} outside the image's "
                                     f"{len(image_positions)} visual tokens")
                protected = set(e.protected_visual)
                candidates = [j for j in range(len(image_positions)) if j not in protected]
                n_hide = round(e.hidden_visual_fraction * len(candidates))
                order = random.Random(f"{self.seed}/{e.question_id}").sample(candidates, n_hide)
                attention_mask[i, [image_positions[j] for j in order]] = 0
        return attention_mask


def answer_generation_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: positions whose next-token prediction is an answer token (the last prompt token
    and every answer token except the final EOS)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross entropy over answer tokens (+ EOS), token mean; 0 (with grad) when none."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    valid = shift_labels != IGNORE_INDEX
    if not valid.any():
        return shift_logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(shift_logits[valid], shift_labels[valid])


class LengthGroupedSampler(Sampler[int]):
    """Every index once per epoch, ordered so that each run of `group_size` consecutive indices holds samples
    of similar text length (less padding per batch); the order is fixed by (seed, epoch).

    Per epoch: a seeded random permutation is cut into windows of `group_size * window_groups` indices; each
    window is sorted by length (longest first) and cut into groups of `group_size`; the full groups are shuffled,
    the one holding the longest sample is moved first (an out-of-memory shows at the first step), and an
    incomplete last group stays last (so later batches stay aligned with groups). With `group_size = batch_size *
    world_size` a batch is one group in one process; under DDP, Lightning's `DistributedSamplerWrapper` deals
    positions r, r + W, ... to rank r, so each rank's batch is a slice of one group. Lightning calls `set_epoch`.

    Args:
        lengths: text length of each sample (any unit).
        group_size: indices per group: the batch size times the number of processes.
        seed: fixes the order together with the epoch.
        window_groups: groups per sorting window (more: tighter grouping, less randomness).
    """

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int = 0, window_groups: int = 50):
        if group_size < 1 or window_groups < 1:
            raise ValueError(f"group_size={group_size} and window_groups={window_groups} must be at least 1")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.group_size = group_size
        self.seed = seed
        self.window_groups = window_groups
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def groups(self) -> list[list[int]]:
        """This epoch's groups, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        permutation = torch.randperm(len(self.lengths), generator=generator)
        window = self.group_size * self.window_groups
        groups: list[list[int]] = []
        for start in range(0, len(permutation), window):
            chunk = permutation[start : start + window]
            # stable sort on a random permutation: ties keep a seeded random order
            ordered = chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices].tolist()
            groups += [ordered[i : i + self.group_size] for i in range(0, len(ordered), self.group_size)]
        tail = groups.pop() if groups and len(groups[-1]) < self.group_size else None
        order = torch.randperm(len(groups), generator=generator).tolist()
        groups = [groups[i] for i in order]
        longest_sample = int(torch.argmax(self.lengths)) if len(self.lengths) else -1
        for position, group in enumerate(groups):
            if longest_sample in group:
                groups.insert(0, groups.pop(position))
                break
        return groups + ([tail] if tail else [])

    def __iter__(self) -> Iterator[int]:
        return (index for group in self.groups() for index in group)
