"""Benchmark scorers as torchmetrics metrics.

Every metric keeps tensor states that reduce across processes: sums of fixed size (`dist_reduce_fx="sum"`)
where the score is a per-item mean, concatenated per-item rows (`dist_reduce_fx="cat"`) where items must be
grouped before scoring (MME accuracy+, MMBench circular evaluation), because a group's items may land on
different ranks. `compute()` returns a dict of scalar tensors with the keys each docstring lists.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from lvlm_prune.evaluation.normalize import (
    OPTION_LETTERS,
    gqa_prediction,
    m4c_normalize_answer,
    normalize_answer,
    normalize_vqa_answer,
    parse_mme_answer,
    parse_option_letter,
    parse_pope_answer,
    parse_scienceqa_choice,
    process_punctuation,
)

POPE_SPLITS = ("adversarial", "popular", "random")
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
GQA_STRUCTURAL_TYPES = ("verify", "query", "choose", "logical", "compare")
VQAV2_ANSWER_TYPES = ("yes/no", "number", "other")
MMBENCH_ROTATION_STRIDE = 1_000_000


def _check_lengths(**sequences: Sequence[Any] | None) -> int:
    lengths = {name: len(values) for name, values in sequences.items() if values is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"update() arguments must have the same length, got {lengths}")
    return next(iter(lengths.values()))


def _check_names(names: Sequence[str], argument: str) -> tuple[str, ...]:
    names = tuple(names)
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"{argument} must be unique, got duplicates {duplicates}")
    return names


def _indices_of(values: Sequence[str], known: Sequence[str], argument: str) -> list[int]:
    position = {name: i for i, name in enumerate(known)}
    unknown = sorted({value for value in values if value not in position})
    if unknown:
        raise ValueError(f"unknown {argument} {unknown}; this metric was built with {list(known)}")
    return [position[value] for value in values]


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator as float64, nan where the denominator is 0 (nothing was scored)."""
    denominator = denominator.to(torch.float64)
    return torch.where(denominator > 0, numerator.to(torch.float64) / denominator.clamp(min=1), math.nan)


class _PerItemStates(Metric):
    """A metric with per-item states: lists of 1-d tensors, each of one dtype, concatenated across processes.

    A process that never called update() (the sampler gave it no batch, or it had nothing to score) holds empty
    lists, which torchmetrics gathers as empty tensors of `self.dtype` (float32) while the other processes send
    int64 / float64: the all-gather of mismatched dtypes fails (gloo aborts on the size mismatch). Empty lists are
    sent in their state's dtype instead.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._item_state_dtypes: dict[str, torch.dtype] = {}

    def _add_item_state(self, name: str, dtype: torch.dtype) -> None:
        self.add_state(name, [], dist_reduce_fx="cat")
        self._item_state_dtypes[name] = dtype

    def _item_state(self, name: str) -> Tensor:
        """The state concatenated (all processes' rows after a sync), empty of its dtype when nothing was added."""
        state = getattr(self, name)
        if isinstance(state, list) and not state:
            return torch.zeros(0, dtype=self._item_state_dtypes[name], device=self.device)
        return dim_zero_cat(state)

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        # sync() has cached the states and unsync() restores them, so the placeholders do not outlive the sync
        for name in self._item_state_dtypes:
            state = getattr(self, name)
            if isinstance(state, list) and not state:
                setattr(self, name, [self._item_state(name)])
        super()._sync_dist(dist_sync_fn, process_group)


def stable_id(text: str) -> int:
    """A 63-bit id of a string that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


class _CategorisedMean(_PerItemStates):
    """Mean of per-item scores in [0, 1], overall and per category (states: sums of fixed size).

    Items given with `ids` are kept per item instead (concatenated across processes) and counted once per id:
    Lightning's distributed sampler pads every rank's share of a validation or test set by repeating items, and
    those repeats must not count twice.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, categories: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.categories = _check_names(categories or (), "categories")
        num = len(self.categories)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("category_score_sum", torch.zeros(num, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("category_count", torch.zeros(num, dtype=torch.long), dist_reduce_fx="sum")
        self._add_item_state("item_ids", torch.long)
        self._add_item_state("item_scores", torch.float64)
        self._add_item_state("item_categories", torch.long)

    def _add_scores(self, scores: Sequence[float], categories: Sequence[str] | None,
                    ids: Sequence[int] | None = None) -> None:
        if self.categories and categories is None:
            raise ValueError(f"categories are required: this metric was built with categories {list(self.categories)}")
        if not self.categories and categories is not None:
            raise ValueError("categories were given but this metric was built with categories=None")
        device = self.score_sum.device
        values = torch.tensor(list(scores), dtype=torch.float64, device=device)
        if ids is not None:
            _check_lengths(scores=list(scores), ids=ids)
            index = _indices_of(categories, self.categories, "categories") if categories is not None else [-1] * len(ids)
            self.item_ids.append(torch.tensor(list(ids), dtype=torch.long, device=device))
            self.item_scores.append(values)
            self.item_categories.append(torch.tensor(index, dtype=torch.long, device=device))
            return
        self.score_sum += values.sum()
        self.count += values.numel()
        if categories is not None:
            index = _indices_of(categories, self.categories, "categories")
            index = torch.tensor(index, dtype=torch.long, device=device)
            self.category_score_sum.index_add_(0, index, values)
            self.category_count.index_add_(0, index, torch.ones_like(index))

    def compute(self) -> dict[str, Tensor]:
        score_sum, count = self.score_sum.clone(), self.count.clone()
        category_score_sum, category_count = self.category_score_sum.clone(), self.category_count.clone()
        ids = self._item_state("item_ids")
        if ids.numel():
            scores = self._item_state("item_scores")
            categories = self._item_state("item_categories")
            # the first occurrence of each id (a repeat scores the same answer again)
            unique, inverse = torch.unique(ids, return_inverse=True)
            order = torch.arange(ids.numel(), device=ids.device)
            first = torch.full((unique.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
            first = first.scatter_reduce(0, inverse, order, reduce="amin")
            scores, categories = scores[first], categories[first]
            score_sum += scores.sum()
            count += scores.numel()
            known = categories >= 0
            category_score_sum.index_add_(0, categories[known], scores[known])
            category_count.index_add_(0, categories[known], torch.ones_like(categories[known]))
        result = {"acc": _ratio(score_sum, count)}
        per_category = _ratio(category_score_sum, category_count)
        result.update({f"acc/{name}": per_category[i] for i, name in enumerate(self.categories)})
        return result


class ExactMatchAccuracy(_CategorisedMean):
    """Accuracy of exact match after `normalize_answer` on both sides (lowercase, strip, trailing period).

    compute(): {"acc": overall, "acc/<category>": per category (nan for a category with no item)}.

    Args:
        categories: the fixed category names; when given, every update() must pass a category per item.
    """

    def _is_match(self, prediction: str, target: str) -> bool:
        return normalize_answer(prediction) == normalize_answer(target)

    def update(
        self, predictions: Sequence[str], targets: Sequence[str], categories: Sequence[str] | None = None,
        ids: Sequence[int] | None = None,
    ) -> None:
        """Args: predictions, targets (and categories): one string per item; ids: optional item ids (e.g.
        `stable_id(question_id)`), with which an item seen again (on any process) counts once."""
        _check_lengths(predictions=predictions, targets=targets, categories=categories, ids=ids)
        self._add_scores([float(self._is_match(p, t)) for p, t in zip(predictions, targets)], categories, ids)


class GQAAccuracy(ExactMatchAccuracy):
    """GQA accuracy: the prediction as LLaVA converts it (`gqa_prediction`: trailing periods removed, lowercased)
    equals the stored answer.

    The official script compares against the annotation's answer verbatim (GQA answers are lowercase already),
    so only the prediction is converted. Categories are usually `GQA_STRUCTURAL_TYPES`.
    """

    def _is_match(self, prediction: str, target: str) -> bool:
        return gqa_prediction(prediction) == target


def vqa_soft_score(prediction: str, human_answers: Sequence[str]) -> float:
    """The VQA accuracy of one answer: min(#humans agreeing / 3, 1), averaged over the leave-one-human-out subsets.

    With 10 humans of whom m agree: m=0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.
    Both sides must already be normalised.
    """
    if not human_answers:
        raise ValueError("human_answers is empty: a VQA question needs at least one human answer")
    matches = sum(answer == prediction for answer in human_answers)
    total = 0.0
    for answer in human_answers:
        total += min(1.0, (matches - (answer == prediction)) / 3.0)
    return total / len(human_answers)


class VQASoftAccuracy(_CategorisedMean):
    """VQAv2 / TextVQA soft accuracy with the VQA answer normalisation.

    `target_normalization` names the protocol. "full", TextVQA's m4c evaluator: predictions and human answers
    alike through `m4c_normalize_answer`. "punctuation", the official VQAv2 script on the answers LLaVA uploads:
    the prediction converted as LLaVA's upload converts it (`m4c_normalize_answer`), then the script's
    `normalize_vqa_answer`; the human answers get its punctuation step only, and only when they disagree (ten
    identical answers are compared as they are).

    compute(): {"acc", "acc/<category>"} in [0, 1].

    Args:
        categories: fixed category names (e.g. `VQAV2_ANSWER_TYPES`), or None.
        target_normalization: "full" or "punctuation".
    """

    def __init__(
        self, categories: Sequence[str] | None = None, target_normalization: str = "full", **kwargs: Any
    ) -> None:
        super().__init__(categories=categories, **kwargs)
        if target_normalization not in ("full", "punctuation"):
            raise ValueError(f"target_normalization must be 'full' or 'punctuation', got {target_normalization!r}")
        self.target_normalization = target_normalization

    def update(
        self,
        predictions: Sequence[str],
        human_answers: Sequence[Sequence[str]],
        categories: Sequence[str] | None = None,
    ) -> None:
        """Args: predictions (one string per item), human_answers (a list of strings per item), categories."""
        _check_lengths(predictions=predictions, human_answers=human_answers, categories=categories)
        scores = [vqa_soft_score(*self._normalised(p, answers)) for p, answers in zip(predictions, human_answers)]
        self._add_scores(scores, categories)

    def _normalised(self, prediction: str, answers: Sequence[str]) -> tuple[str, list[str]]:
        if self.target_normalization == "full":
            return m4c_normalize_answer(prediction), [m4c_normalize_answer(a) for a in answers]
        humans = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
        return normalize_vqa_answer(m4c_normalize_answer(prediction)), humans


class ScienceQAAccuracy(_CategorisedMean):
    """ScienceQA multiple-choice accuracy with LLaVA's answer parsing (`parse_scienceqa_choice`).

    compute(): {"acc": all problems, "acc/img": problems with an image (ScienceQA-IMG), "acc/no_img"}.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(categories=("img", "no_img"), **kwargs)

    def update(
        self,
        predictions: Sequence[str],
        answers: Sequence[int],
        num_choices: Sequence[int],
        has_image: Sequence[bool],
    ) -> None:
        """Args: predictions (generated text), answers (correct option index), num_choices, has_image;
        one per problem."""
        _check_lengths(predictions=predictions, answers=answers, num_choices=num_choices, has_image=has_image)
        for answer, choices in zip(answers, num_choices):
            if not 0 <= answer < choices:
                raise ValueError(f"answers: index {answer} is outside the {choices} choices")
        scores = [float(parse_scienceqa_choice(p, n) == a) for p, a, n in zip(predictions, answers, num_choices)]
        self._add_scores(scores, ["img" if image else "no_img" for image in has_image])


class POPEMetrics(Metric):
    """POPE: accuracy, precision, recall, F1 and yes-ratio per split, and the means over splits.

    Predictions are parsed with LLaVA's rule (`parse_pope_answer`); "yes" is the positive class. A ratio whose
    denominator is 0 (e.g. precision with no "yes" predicted) is 0, where LLaVA's script would divide by zero.

    compute(): {"<split>/acc", "<split>/precision", "<split>/recall", "<split>/f1", "<split>/yes_ratio",
    "acc", "f1"}, the last two averaged over the splits that received items.

    Args:
        splits: the fixed split names.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, splits: Sequence[str] = POPE_SPLITS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.splits = _check_names(splits, "splits")
        if not self.splits:
            raise ValueError("splits must name at least one split")
        for name in ("true_positive", "false_positive", "true_negative", "false_negative"):
            self.add_state(name, torch.zeros(len(self.splits), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], labels: Sequence[str], splits: Sequence[str]) -> None:
        """Args: predictions (generated text), labels ("yes"/"no"), splits; one per question."""
        _check_lengths(predictions=predictions, labels=labels, splits=splits)
        bad_labels = sorted({label for label in labels if label not in ("yes", "no")})
        if bad_labels:
            raise ValueError(f"labels must be 'yes' or 'no', got {bad_labels}")
        device = self.true_positive.device
        index = torch.tensor(_indices_of(splits, self.splits, "splits"), dtype=torch.long, device=device)
        predicted_yes = torch.tensor([parse_pope_answer(p) == "yes" for p in predictions], device=device)
        label_yes = torch.tensor([label == "yes" for label in labels], device=device)
        for name, selected in (
            ("true_positive", predicted_yes & label_yes),
            ("false_positive", predicted_yes & ~label_yes),
            ("true_negative", ~predicted_yes & ~label_yes),
            ("false_negative", ~predicted_yes & label_yes),
        ):
            getattr(self, name).index_add_(0, index, selected.long())

    def compute(self) -> dict[str, Tensor]:
        tp, fp = self.true_positive.double(), self.false_positive.double()
        tn, fn = self.true_negative.double(), self.false_negative.double()
        total = tp + fp + tn + fn

        def safe(numerator: Tensor, denominator: Tensor) -> Tensor:
            return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), 0.0)

        precision, recall = safe(tp, tp + fp), safe(tp, tp + fn)
        metrics = {
            "acc": safe(tp + tn, total),
            "precision": precision,
            "recall": recall,
            "f1": safe(2 * precision * recall, precision + recall),
            "yes_ratio": safe(tp + fp, total),
        }
        present = total > 0
        nan = torch.tensor(math.nan, dtype=torch.float64, device=total.device)
        result: dict[str, Tensor] = {}
        for i, split in enumerate(self.splits):
            for name, values in metrics.items():
                result[f"{split}/{name}"] = values[i] if present[i] else nan
        for name in ("acc", "f1"):
            mean = metrics[name][present].mean() if present.any() else nan
            result[name] = mean
        return result


class MMEScore(_PerItemStates):
    """MME: per subtask accuracy and accuracy+ (all questions of an image right), in percent as MME reports.

    Predictions are parsed with MME's rule (`parse_mme_answer`; "other" is wrong). A subtask's score is
    acc + acc+ (at most 200); "perception" and "cognition" sum the scores of the subtasks of `MME_PERCEPTION`
    and `MME_COGNITION` that received items (2000 and 800 at most with all subtasks).

    compute(): {"<subtask>/acc", "<subtask>/acc_plus", "<subtask>/score" for each subtask seen,
    "perception", "cognition", "total"}.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    subtasks = MME_PERCEPTION + MME_COGNITION

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_item_state("subtask_index", torch.long)
        self._add_item_state("image_group", torch.long)
        self._add_item_state("correct", torch.long)

    def update(
        self, predictions: Sequence[str], answers: Sequence[str], subtasks: Sequence[str], images: Sequence[str]
    ) -> None:
        """Args: predictions (generated text), answers ("yes"/"no", any case), subtasks, images; one per question."""
        _check_lengths(predictions=predictions, answers=answers, subtasks=subtasks, images=images)
        answers = [answer.strip().lower() for answer in answers]
        bad = sorted({answer for answer in answers if answer not in ("yes", "no")})
        if bad:
            raise ValueError(f"answers must be 'yes' or 'no', got {bad}")
        index = _indices_of(subtasks, self.subtasks, "subtasks")
        device = self.device
        self.subtask_index.append(torch.tensor(index, dtype=torch.long, device=device))
        groups = [stable_id(f"{subtask}\x00{image}") for subtask, image in zip(subtasks, images)]
        self.image_group.append(torch.tensor(groups, dtype=torch.long, device=device))
        hits = [parse_mme_answer(p) == a for p, a in zip(predictions, answers)]
        self.correct.append(torch.tensor(hits, dtype=torch.long, device=device))

    def compute(self) -> dict[str, Tensor]:
        subtask_index = self._item_state("subtask_index")
        image_group = self._item_state("image_group")
        correct = self._item_state("correct")
        result: dict[str, Tensor] = {}
        sums = {group: torch.tensor(0.0, dtype=torch.float64, device=correct.device)
                for group in ("perception", "cognition")}
        for i, subtask in enumerate(self.subtasks):
            selected = subtask_index == i
            if not selected.any():
                continue
            hits = correct[selected]
            _, group = torch.unique(image_group[selected], return_inverse=True)
            misses_per_image = torch.bincount(group, weights=(1 - hits).double())
            acc = 100.0 * hits.double().mean()
            acc_plus = 100.0 * (misses_per_image == 0).double().mean()
            result[f"{subtask}/acc"] = acc
            result[f"{subtask}/acc_plus"] = acc_plus
            result[f"{subtask}/score"] = acc + acc_plus
            sums["perception" if subtask in MME_PERCEPTION else "cognition"] += acc + acc_plus
        result.update(sums)
        result["total"] = sums["perception"] + sums["cognition"]
        return result


class MMBenchCircularAccuracy(_PerItemStates):
    """MMBench circular evaluation: a question is right only if every option rotation of it is answered right.

    Rotations of one question share `index % 1_000_000` (the MMBench tsv stores the rotations of question i at
    i + k * 1e6). Answers are parsed with `parse_option_letter`.

    compute(): {"acc": circular accuracy over questions, "acc/vanilla": accuracy over the unrotated rows
    (index < 1e6), "acc/<category>": circular accuracy per category}.

    Args:
        categories: fixed category names, or None.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, categories: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.categories = _check_names(categories or (), "categories")
        self._add_item_state("index", torch.long)
        self._add_item_state("correct", torch.long)
        self._add_item_state("category_index", torch.long)

    def update(
        self,
        predictions: Sequence[str],
        targets: Sequence[str],
        indices: Sequence[int],
        choices: Sequence[Sequence[str]],
        categories: Sequence[str] | None = None,
    ) -> None:
        """Args: predictions (generated text), targets (correct letter), indices (tsv `index`), choices (the option
        texts in letter order), categories; one per tsv row."""
        _check_lengths(
            predictions=predictions, targets=targets, indices=indices, choices=choices, categories=categories
        )
        if self.categories and categories is None:
            raise ValueError(f"categories are required: this metric was built with categories {list(self.categories)}")
        if not self.categories and categories is not None:
            raise ValueError("categories were given but this metric was built with categories=None")
        for target, options in zip(targets, choices):
            if target not in tuple(OPTION_LETTERS[: len(options)]):  # a letter, not a substring ("AB")
                raise ValueError(f"targets: {target!r} is not one of the {len(options)} option letters")
        hits = [parse_option_letter(p, len(c), c) == t for p, t, c in zip(predictions, targets, choices)]
        category_index = (
            _indices_of(categories, self.categories, "categories") if categories is not None else [-1] * len(hits)
        )
        device = self.device
        self.index.append(torch.tensor(list(indices), dtype=torch.long, device=device))
        self.correct.append(torch.tensor(hits, dtype=torch.long, device=device))
        self.category_index.append(torch.tensor(category_index, dtype=torch.long, device=device))

    def compute(self) -> dict[str, Tensor]:
        index = self._item_state("index")
        correct = self._item_state("correct")
        category_index = self._item_state("category_index")
        nan = torch.tensor(math.nan, dtype=torch.float64, device=correct.device)
        result: dict[str, Tensor] = {"acc": nan, "acc/vanilla": nan}
        result.update({f"acc/{name}": nan for name in self.categories})
        if index.numel() == 0:
            return result
        base, group = torch.unique(index % MMBENCH_ROTATION_STRIDE, return_inverse=True)
        num_groups = base.numel()
        misses = torch.bincount(group, weights=(1 - correct).double(), minlength=num_groups)
        group_right = misses == 0
        lowest = torch.full((num_groups,), len(self.categories), dtype=torch.long, device=index.device)
        lowest = lowest.scatter_reduce(0, group, category_index, reduce="amin")
        highest = torch.full((num_groups,), -1, dtype=torch.long, device=index.device)
        highest = highest.scatter_reduce(0, group, category_index, reduce="amax")
        if (lowest != highest).any():
            bad = base[lowest != highest][:5].tolist()
            raise ValueError(f"rotations of one question have different categories (base indices {bad})")
        result["acc"] = group_right.double().mean()
        original = index < MMBENCH_ROTATION_STRIDE
        if original.any():
            result["acc/vanilla"] = correct[original].double().mean()
        for i, name in enumerate(self.categories):
            selected = lowest == i
            if selected.any():
                result[f"acc/{name}"] = group_right[selected].double().mean()
        return result


_CAPTION_PUNCTUATION = str.maketrans({char: " " for char in ".,!?;:\"`()[]{}"})
_CLITIC = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_PUNCTUATION_TOKENS = frozenset({"'", "''", "-", "--"})


def tokenize_caption(text: str) -> list[str]:
    """Lowercase and split a caption into words, dropping punctuation.

    Approximates coco-caption's PTB tokenizer (Java): clitics are split off ("dog's" -> "dog 's"), punctuation
    tokens are dropped, hyphenated words stay whole.
    """
    text = _CLITIC.sub(r"\1 \2", text.lower().translate(_CAPTION_PUNCTUATION))
    return [word for word in text.split() if word not in _PUNCTUATION_TOKENS]


def _ngram_counts(words: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


class CiderDCorpus:
    """CIDEr-D of the coco-caption code over a fixed reference corpus.

    Document frequencies count the images whose reference set contains an n-gram; an n-gram's weight is
    tf * (log(#images) - log(max(1, df))). Per n (1-4): clipped cosine min(c, r) * r / (|c| |r|) times the
    length penalty exp(-(len_c - len_r)^2 / (2 sigma^2)); averaged over n, over references, times 10.
    Lengths count bigrams, as the coco-caption code does.

    Args:
        references: image id -> reference captions (at least one per image).
        sigma: the length penalty's width.
        max_n: the longest n-gram.
    """

    def __init__(self, references: Mapping[Hashable, Sequence[str]], sigma: float = 6.0, max_n: int = 4) -> None:
        if not references:
            raise ValueError("references is empty")
        empty = [image for image, captions in references.items() if not captions]
        if empty:
            raise ValueError(f"references: images without a reference caption: {empty[:5]}")
        if sigma <= 0 or max_n < 1:
            raise ValueError(f"sigma must be > 0 and max_n >= 1, got sigma={sigma}, max_n={max_n}")
        self.sigma, self.max_n = sigma, max_n
        counts = {
            image: [_ngram_counts(tokenize_caption(caption), max_n) for caption in captions]
            for image, captions in references.items()
        }
        self.document_frequency: Counter[tuple[str, ...]] = Counter()
        for reference_counts in counts.values():
            self.document_frequency.update(set().union(*reference_counts))
        self.log_num_images = math.log(len(references))
        self.reference_vectors = {image: [self._vector(c) for c in cs] for image, cs in counts.items()}

    def _vector(self, counts: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        vector: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.max_n)]
        squared = [0.0] * self.max_n
        for ngram, term_frequency in counts.items():
            n = len(ngram) - 1
            weight = term_frequency * (self.log_num_images - math.log(max(1.0, self.document_frequency[ngram])))
            vector[n][ngram] = weight
            squared[n] += weight * weight
        bigrams = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)
        return vector, [math.sqrt(s) for s in squared], bigrams

    def score(self, candidate: str, image: Hashable) -> float:
        """CIDEr-D of one candidate caption against the references of `image`."""
        if image not in self.reference_vectors:
            raise ValueError(f"no reference captions for image {image!r}")
        vector, norm, length = self._vector(_ngram_counts(tokenize_caption(candidate), self.max_n))
        references = self.reference_vectors[image]
        total = 0.0
        for ref_vector, ref_norm, ref_length in references:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
            for n in range(self.max_n):
                value = sum(min(w, ref_vector[n].get(g, 0.0)) * ref_vector[n].get(g, 0.0) for g, w in vector[n].items())
                if norm[n] != 0 and ref_norm[n] != 0:
                    value /= norm[n] * ref_norm[n]
                total += value * penalty
        return 10.0 * total / self.max_n / len(references)


def cider_d(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> tuple[float, dict]:
    """Corpus CIDEr-D as coco-caption computes it: document frequencies over the references of the scored images.

    Returns (mean score, image id -> score).
    """
    missing = [image for image in candidates if image not in references]
    if missing:
        raise ValueError(f"candidates for images without references: {missing[:5]}")
    corpus = CiderDCorpus({image: references[image] for image in candidates})
    scores = {image: corpus.score(caption, image) for image, caption in candidates.items()}
    return sum(scores.values()) / len(scores), scores


class CIDErD(Metric):
    """CIDEr-D over a reference corpus fixed at construction (coco-caption scale, not x100).

    Document frequencies come from all of `references`, so per-caption scores are independent and sum across
    processes; the result equals coco-caption's when every image of `references` is scored once.

    compute(): {"cider_d": mean score}.

    Args:
        references: image id -> reference captions.
        sigma: the length penalty's width (6 in CIDEr-D).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, references: Mapping[Hashable, Sequence[str]], sigma: float = 6.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.corpus = CiderDCorpus(references, sigma=sigma)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], image_ids: Sequence[Hashable]) -> None:
        """Args: predictions (one caption per item), image_ids (keys of `references`)."""
        _check_lengths(predictions=predictions, image_ids=image_ids)
        self.score_sum += sum(self.corpus.score(p, image) for p, image in zip(predictions, image_ids))
        self.count += len(predictions)

    def compute(self) -> dict[str, Tensor]:
        return {"cider_d": _ratio(self.score_sum, self.count)}
