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
        image: RGB image, or None for a text-only example (its prompt has no image placeholder).
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
    image: Image.Image | None
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
      answer tokens + EOS only; `num_tokens` counts its real positions (for throughput logs);
    - generation prompts (`prompt_input_ids`, `prompt_attention_mask`), left-padded, ending at `ASSISTANT:`.

    `attention_mask` of the teacher-forced layout also hides the visual tokens an example asks to hide;
    `position_ids` are computed before hiding, so hidden tokens keep the positions they would have had.
    Teacher-forced sequences longer than `max_length` are cut to it (with a warning), as LLaVA's training cuts to
    `model_max_length`. With `pack_length`, batches with answers come packed for training (`pack_teacher_forced`:
    examples share rows of that many tokens, no generation layout).
    """

    def __init__(self, processor: Any, template: ConversationTemplate, image_token_id: int, max_length: int = 512,
                 seed: int = 0, pack_length: int | None = None):
        if pack_length is not None and pack_length < 1:
            raise ValueError(f"pack_length={pack_length} must be at least 1 (tokens per packed row) or None")
        self.pack_length = pack_length
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.seed = seed

    def _encode(self, images: list[Image.Image], texts: list[str], side: str) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = side
        return self.processor(images=images or None, text=texts, padding=True, return_tensors="pt")

    def __call__(self, examples: list[VQAExample]) -> dict[str, Any]:
        if not examples:
            raise ValueError("empty batch")
        images = [e.image for e in examples if e.image is not None]
        prompts = [self.template.prompt(e.question, e.context, with_image=e.image is not None) for e in examples]
        batch: dict[str, Any] = {
            "question_ids": [e.question_id for e in examples],
            "questions": [e.question for e in examples],
            "answers": [e.answer for e in examples],
            "categories": [e.category for e in examples],
            "contexts": [e.context for e in examples],
        }
        generation = self._encode(images, prompts, side="left")
        batch["pixel_values"] = generation.get("pixel_values")  # None when no example has an image
        if len(images) < len(examples):  # text-only examples: which examples the images belong to
            batch["image_examples"] = [i for i, e in enumerate(examples) if e.image is not None]
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
        num_tokens = int(attention_mask.sum())  # hidden visual tokens are still computed: counted
        attention_mask = self._hide_visual(input_ids, attention_mask, examples)
        batch.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                     num_tokens=num_tokens)
        if any(e.evidence for e in examples):
            batch["grounding"] = self._grounding(input_ids, attention_mask, examples, answer_starts)
        if self.pack_length is not None:
            return pack_teacher_forced(batch, self.pack_length, self.tokenizer.pad_token_id)
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
                if start >= input_ids.shape[1]:  # truncated away
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


# per-example entries of a collated batch that packing reorders with its examples
EXAMPLE_KEYS = ("question_ids", "questions", "answers", "categories", "contexts")


def pack_teacher_forced(batch: dict[str, Any], row_length: int, pad_token_id: int) -> dict[str, Any]:
    """Packs the right-padded teacher-forced layout of a collated batch into fewer, fuller rows.

    Several examples share a row end to end (first fit, longest first, into rows of `row_length` tokens, or of the
    longest example's length when that is longer), each keeping its own `position_ids`. `attention_mask` becomes a
    (rows, 1, T, T) boolean mask (True: may attend): causal within each example, nothing across examples, and the
    visual tokens an example hides stay hidden. The loss and every gradient are those of the padded batch; only
    the padding the rows no longer carry is not computed. `pixel_values` and the per-example entries follow the
    examples' new order (LLaVA fills the image tokens in order, row after row); `packed_rows` lists each row's
    examples by their index in the padded batch. The generation layout (`prompt_*`) is dropped: packed batches are
    for training. Needs a language model that takes a 4-D mask as it is (transformers' sdpa does; eager wants
    it additive, see `additive_attention_mask`).
    """
    if batch.get("image_sizes") is not None:
        raise ValueError("packing needs one fixed-size image per example; this batch carries image_sizes (anyres)")
    input_ids, mask2d = batch["input_ids"], batch["attention_mask"]
    # right-padded: an example's tokens end after its last position that is visible or hidden but not padding
    lengths = (batch["position_ids"].argmax(1) + 1).tolist()
    capacity = max(row_length, max(lengths))
    rows: list[list[int]] = []
    filled: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(filled) if used + lengths[index] <= capacity), None)
        if row is None:
            rows.append([])
            filled.append(0)
            row = len(rows) - 1
        rows[row].append(index)
        filled[row] += lengths[index]
    length = max(filled)
    packed_ids = input_ids.new_full((len(rows), length), pad_token_id)
    positions = torch.zeros(len(rows), length, dtype=batch["position_ids"].dtype)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=batch["labels"].dtype)
    allowed = torch.zeros(len(rows), 1, length, length, dtype=torch.bool)
    order: list[int] = []
    placed: dict[int, tuple[int, int]] = {}  # example -> (row, first position in it)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            placed[i] = (r, start)
            n, stop = lengths[i], start + lengths[i]
            packed_ids[r, start:stop] = input_ids[i, :n]
            positions[r, start:stop] = batch["position_ids"][i, :n]
            labels[r, start:stop] = batch["labels"][i, :n]
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            allowed[r, 0, start:stop, start:stop] = causal & mask2d[i, :n].bool()[None, :]
            start = stop
            order.append(i)
        # padding after the last example attends to itself only (a row with nothing to attend to gives NaN)
        tail = torch.arange(start, length)
        allowed[r, 0, tail, tail] = True
    packed = {key: [batch[key][i] for i in order] for key in EXAMPLE_KEYS if key in batch}
    packed.update(input_ids=packed_ids, position_ids=positions, labels=labels, attention_mask=allowed, packed_rows=rows)
    if "num_tokens" in batch:
        packed["num_tokens"] = batch["num_tokens"]
    pixels = batch["pixel_values"]
    if "image_examples" in batch:  # some examples are text-only: the images follow the ones that have them
        image_of = {example: k for k, example in enumerate(batch["image_examples"])}
        with_image = [i for i in order if i in image_of]
        packed["image_examples"] = [order.index(i) for i in with_image]
        pixels = None if pixels is None else pixels[[image_of[i] for i in with_image]]
    else:
        pixels = pixels[order]
    packed["pixel_values"] = pixels
    if "grounding" in batch:
        packed["grounding"] = [(placed[i][0], placed[i][1] + query, tuple(placed[i][1] + p for p in evidence))
                               for i, query, evidence in batch["grounding"]]
    return packed


def additive_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (B, 1, T, T) mask (True: may attend) as the additive one eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def answer_generation_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: positions whose next-token prediction is an answer token (the last prompt token
    and every answer token except the final EOS)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def first_answer_only(labels: torch.Tensor) -> torch.Tensor:
    """`labels` with every answer after each row's first one (its first run of supervised tokens) ignored: the
    later turns of a multi-turn sample."""
    supervised = labels != IGNORE_INDEX
    started = supervised.cumsum(1) > 0
    after_first = (started & ~supervised).cumsum(1) > 0
    return labels.masked_fill(after_first, IGNORE_INDEX)


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
    world_size` a batch is one group in one process; under DDP, `callbacks.resume.ResumableDataOrder` (which
    `cli.py` adds to every run) deals positions r, r + W, ... to rank r, so each rank's batch is a slice of one
    group. Without it, Lightning wraps the sampler in its `DistributedSamplerWrapper`, which shuffles the positions
    again and so undoes the grouping: add the callback when training without the CLI. Lightning calls `set_epoch`.

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
