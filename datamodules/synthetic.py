"""LightningDataModule for the synthetic VQA benchmark (the embedded default)."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.synthetic_vqa import (
    CONTEXT_PREFIX,
    DESCRIBE_PREFIX,
    DESCRIBE_SCENE,
    FAMILIES,
    SyntheticVQAConfig,
    VQASample,
    generate_samples,
    make_question,
    render,
    vocabulary,
)
from lvlm_prune.data import LengthGroupedSampler, VQACollator, VQAExample
from lvlm_prune.modeling.loading import load_processor
from lvlm_prune.modeling.prompt import get_template
from lvlm_prune.modeling.tokenizer import build_processor, build_word_tokenizer

EVAL_CONTEXTS = ("none", "relevant", "scene")
EVAL_VISUAL_TOKENS = ("all", "objects", "relevant")
# tries at drawing a distinct extra question for a conversation before it keeps the turns it has
MAX_TURN_ATTEMPTS = 200


class _ExampleDataset(Dataset):
    def __init__(self, samples: list[VQASample], examples: list[VQAExample] | None, make):
        self.samples, self._make = samples, make

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> VQAExample:
        return self._make(self.samples[index], index)


class SyntheticVQADataModule(L.LightningDataModule):
    """Seeded scenes of coloured shapes and questions about them, rendered on the fly.

    Args:
        num_train: training samples.
        num_val: validation samples.
        num_test: test samples.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        grid: cells per image side.
        cell_size: pixels per cell (image side = grid * cell_size).
        min_objects: fewest objects per scene.
        max_objects: most objects per scene.
        train_min_objects: fewest objects of a training scene (None: min_objects); see SyntheticVQAConfig.
        families: question families.
        seed: fixes every sample of every split.
        train_skip: training samples start after this many of the seeded training stream, so a later training
            stage (the grown base of configs/synthetic/base.yaml) sees fresh scenes; val/test do not change.
        processor_path: directory with a saved LlavaProcessor (a trained base model's export). None builds
            the word-level tokenizer from the benchmark vocabulary (only for training the base from scratch).
        template: conversation template name ('tiny': LLaVA-1.5 layout without the system message).
        context_fraction: fraction of training examples whose prompt carries a textual description
            (of the objects that matter, or of the whole scene) with most or all visual tokens hidden; it
            teaches the base to answer from text, which caption compensation (ACCM) relies on.
        describe_fraction: fraction of training examples with a description turn: of the whole image
            (dense supervision of recognition and positions, as LLaVA's caption pre-training) or of the
            objects that matter for a question (the frozen base later writes ACCM's warm-start captions so).
        token_drop_fraction: fraction of the other training examples (those without a context) in which a random
            50-100 % of the visual tokens that no answer of the conversation depends on are hidden (the objects the
            answers need stay). Without it the base answers from the objects and the empty cells around them
            together and breaks when a pruner keeps the objects alone (docs/findings.md); a real LVLM is expected to
            answer from the tokens that carry the answer. Needs one visual token per grid cell (cell_size = the
            vision tower's patch size).
        text_only_fraction: fraction of training examples given as text alone: no image, the whole scene's
            description as the prompt's context, every question turn kept (the description covers all of them), no
            description turn. A language-only stage (1.0) trains the LLM to answer from a scene's text, as a real
            LVLM's LLM was pretrained on text before it saw images; such examples cost a fraction of an image
            example (no vision tower, no visual tokens). An all-text stage leaves the vision tower and projector
            without gradients: under DDP it needs `find_unused_parameters` (e.g. `strategy: ddp_find_unused_parameters_true`).
        grounding_evidence: give each training answer turn the visual tokens of the objects it depends on
            (`VQAExample.evidence`), for the base's attention-grounding loss (`model.grounding_weight`); description
            turns and answers without objects (a 'no', a count of zero) get none. Needs one visual token per cell.
        turns_per_image: questions per training image (multi-turn conversations, as in LLaVA's instruction
            data): the image is encoded once for several supervised answers.
        eval_context: 'none' (image only), 'relevant' or 'scene' (a description in the prompt) for val/test.
        eval_hidden_visual_fraction: fraction of visual tokens hidden in val/test prompts (1.0 = text only).
        eval_visual_tokens: which visual tokens val/test prompts show: 'all', 'objects' (every empty cell hidden) or
            'relevant' (only the objects the answer depends on: an oracle pruner). Measures whether the base answers
            from the tokens that carry the answer; needs one visual token per grid cell.
        max_length: longest teacher-forced sequence (longer ones are cut to it with a warning, as LLaVA does).
        pack_length: training batches come packed into rows of this many tokens (`lvlm_prune.data.pack_teacher_forced`:
            the same examples, the same loss and gradients, a block-diagonal causal mask instead of padding; a base step
            costs 0.74x / 0.70x a padded one with 4 / 12 LLM layers, `benchmarks/synthetic_batching.py`). Only the base's training reads
            packed batches (`model.attn_implementation` sdpa or eager); the pruning methods' training needs None.
            Validation and test batches are never packed. None: padded batches.
        group_by_length: training batches of examples with similar text length (`LengthGroupedSampler`: about
            1.4x faster base steps from less padding; the order is fixed by the seed and the epoch). Off by default: on
            this benchmark the length follows the kind of example (description turns, context), so grouped batches
            are far less mixed, and the base trained so was worse (docs/findings.md). False shuffles.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        num_train: int = 20000,
        num_val: int = 512,
        num_test: int = 1024,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        grid: int = 8,
        cell_size: int = 8,
        min_objects: int = 8,
        max_objects: int = 12,
        train_min_objects: int | None = None,
        families: tuple[str, ...] = FAMILIES,
        seed: int = 0,
        train_skip: int = 0,
        processor_path: str | None = None,
        template: str = "tiny",
        context_fraction: float = 0.0,
        describe_fraction: float = 0.0,
        token_drop_fraction: float = 0.0,
        text_only_fraction: float = 0.0,
        grounding_evidence: bool = False,
        turns_per_image: int = 1,
        eval_context: str = "none",
        eval_hidden_visual_fraction: float = 0.0,
        eval_visual_tokens: str = "all",
        max_length: int = 512,
        pack_length: int | None = None,
        group_by_length: bool = False,
        num_workers: int = 0,
    ):
        super().__init__()
        for name, value in (("context_fraction", context_fraction), ("describe_fraction", describe_fraction),
                            ("token_drop_fraction", token_drop_fraction), ("text_only_fraction", text_only_fraction),
                            ("eval_hidden_visual_fraction", eval_hidden_visual_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.{name}={value} must be in [0, 1]")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 1:
                raise ValueError(f"data.{name}={value} must be at least 1")
        if train_skip < 0:
            raise ValueError(f"data.train_skip={train_skip} must be at least 0")
        if turns_per_image < 1:
            raise ValueError(f"data.turns_per_image={turns_per_image} must be at least 1")
        if eval_context not in EVAL_CONTEXTS:
            raise ValueError(f"data.eval_context={eval_context!r}; choose one of {EVAL_CONTEXTS}")
        if eval_visual_tokens not in EVAL_VISUAL_TOKENS:
            raise ValueError(f"data.eval_visual_tokens={eval_visual_tokens!r}; choose one of {EVAL_VISUAL_TOKENS}")
        if eval_visual_tokens != "all" and eval_hidden_visual_fraction > 0:
            raise ValueError(f"data.eval_visual_tokens={eval_visual_tokens!r} already chooses the hidden visual tokens; "
                             f"leave data.eval_hidden_visual_fraction at 0 (got {eval_hidden_visual_fraction})")
        self.save_hyperparameters()
        self.config = SyntheticVQAConfig(grid=grid, cell_size=cell_size, min_objects=min_objects,
                                         max_objects=max_objects, families=tuple(families), seed=seed,
                                         train_min_objects=train_min_objects)
        self.template = get_template(template)
        if processor_path is not None:
            self.processor = load_processor(processor_path, setting="data.init_args.processor_path")
            self._check_saved_processor(processor_path)
        else:
            tokenizer = build_word_tokenizer(vocabulary(self.config))
            self.processor = build_processor(tokenizer, self.config.image_size, patch_size=cell_size)
        self._check_template_words(template)
        patch = getattr(self.processor, "patch_size", None)
        for name, active in (("token_drop_fraction", token_drop_fraction > 0), ("grounding_evidence", grounding_evidence),
                             ("eval_visual_tokens", eval_visual_tokens != "all")):
            if active and patch != cell_size:
                raise ValueError(f"data.{name}={self.hparams[name]!r} needs one visual token per grid cell, "
                                 f"but data.cell_size={cell_size} and the processor's patch_size={patch}")
        self.image_token_id = self.processor.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        self.collator = VQACollator(self.processor, self.template, self.image_token_id, max_length, seed)
        self.train_collator = (self.collator if pack_length is None else
                               VQACollator(self.processor, self.template, self.image_token_id, max_length, seed,
                                           pack_length=pack_length))
        self.categories = list(families)
        self._splits: dict[str, list[VQASample]] = {}

    def _check_saved_processor(self, path: str) -> None:
        """A saved processor must see the grid's image and know every word of its text: a smaller image would be
        resized silently (each grid cell no longer one visual token), an unknown word read as <unk>."""
        side = self.config.image_size
        pixels = self.processor.image_processor(Image.new("RGB", (side, side)), return_tensors="pt")["pixel_values"]
        if tuple(pixels.shape[-2:]) != (side, side):
            raise ValueError(f"data.init_args.processor_path={path}: its processor turns the {side}-pixel images of "
                             f"data.grid={self.config.grid} x data.cell_size={self.config.cell_size} into "
                             f"{tuple(pixels.shape[-2:])} pixels, so a grid cell is no longer one visual token")
        known = self.processor.tokenizer.get_vocab()
        missing = [w for w in vocabulary(self.config) if w not in known]
        if missing:
            raise ValueError(f"data.init_args.processor_path={path}: its tokenizer lacks the words {missing} this "
                             f"benchmark's settings use (data.grid={self.config.grid}, data.families); use a base "
                             "trained on them")

    def _check_template_words(self, name: str) -> None:
        """The template's own words (its system message, roles) must be known to the tokenizer, not read as
        <unk>: the word-level tokenizer of the tiny default knows only the benchmark's words and 'tiny''s roles."""
        tokenizer = self.processor.tokenizer
        pre_tokenizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
        text = self.template.prompt("?", with_image=False)
        words = [w for w, _ in pre_tokenizer.pre_tokenize_str(text)] if pre_tokenizer is not None else [text]
        unknown = sorted({w for w in words if tokenizer.unk_token in tokenizer.tokenize(w)})
        if unknown:
            raise ValueError(f"data.template={name!r}: the tokenizer reads {len(unknown)} of its words as "
                             f"{tokenizer.unk_token} ({unknown[:8]}...); the embedded default's word-level tokenizer "
                             "knows the 'tiny' template only")

    def samples(self, split: str) -> list[VQASample]:
        if split not in self._splits:
            count = {"train": self.hparams.num_train, "val": self.hparams.num_val, "test": self.hparams.num_test}[split]
            skip = self.hparams.train_skip if split == "train" else 0
            self._splits[split] = generate_samples(self.config, split, skip + count)[skip:]
        return self._splits[split]

    def _train_conversation(self, sample: VQASample) -> dict:
        """The text of a training example (its image aside): question, answer, category, context, hidden visual
        tokens and extra turns. Fixed per sample (not per epoch): resumed runs see exactly the same examples."""
        rng = random.Random(f"{self.hparams.seed}/view/{sample.question_id}")
        asked = (sample.question, sample.answer, sample.relevant)
        turns = [asked]
        attempts = 0
        # a small scene may hold fewer distinct questions of the configured families than turns_per_image (one
        # object, query_ref only: two); it then gets the ones found
        while len(turns) < self.hparams.turns_per_image and attempts < MAX_TURN_ATTEMPTS:
            attempts += 1
            made = make_question(sample.scene, rng.choice(self.config.families), rng)
            if made is not None and made[0] not in [t[0] for t in turns]:
                turns.append(made)
        # drawn only when asked for, so that configs without text-only examples keep their exact data
        text_only = self.hparams.text_only_fraction > 0 and rng.random() < self.hparams.text_only_fraction
        describe = None
        if not text_only and rng.random() < self.hparams.describe_fraction:
            if rng.random() < 0.5:
                describe = (DESCRIBE_SCENE, sample.scene.description(), sample.scene.objects)
            else:
                describe = (f"{DESCRIBE_PREFIX} {sample.question}", sample.relevant_description, sample.relevant)
            turns.insert(rng.randrange(len(turns) + 1), describe)
        context, hidden, protected = None, 0.0, ()
        if text_only:
            context = f"{CONTEXT_PREFIX} {sample.scene.description()}"
        elif rng.random() < self.hparams.context_fraction:
            text = sample.relevant_description if rng.random() < 0.7 else sample.scene.description()
            context = f"{CONTEXT_PREFIX} {text}"
            hidden = 1.0 if rng.random() < 0.5 else rng.uniform(0.5, 1.0)
            turns = [asked]  # the context covers this question's objects (the description turn may come first)
        elif rng.random() < self.hparams.token_drop_fraction:
            grid = self.config.grid
            protected = tuple(sorted({o.row * grid + o.col for _, _, relevant in turns for o in relevant}))
            hidden = rng.uniform(0.5, 1.0)
        (question, answer, _), extra = turns[0], tuple((q, a) for q, a, _ in turns[1:])
        category = sample.family if question == sample.question else "describe"
        evidence = ()
        if self.hparams.grounding_evidence:  # a text-only example has no visual token to point at
            grid = self.config.grid
            evidence = tuple(() if turn is describe or text_only
                             else tuple(sorted(o.row * grid + o.col for o in turn[2])) for turn in turns)
        return dict(question=question, answer=answer, category=category, context=context,
                    hidden_visual_fraction=hidden, extra_turns=extra, protected_visual=protected, evidence=evidence,
                    text_only=text_only)

    def _train_example(self, sample: VQASample, index: int) -> VQAExample:
        text = self._train_conversation(sample)
        image = None if text.pop("text_only") else render(sample.scene, self.config.cell_size)
        return VQAExample(sample.question_id, image, **text)

    def train_text_lengths(self) -> list[int]:
        """Tokens of each training example, up to the template: its words (the word-level tokenizer's count) and,
        when it has its image, one visual token per grid cell."""
        lengths = []
        for sample in self.samples("train"):
            text = self._train_conversation(sample)
            words = [text["question"], text["answer"], text["context"] or ""]
            words += [part for turn in text["extra_turns"] for part in turn]
            visual = 0 if text["text_only"] else self.config.grid**2
            lengths.append(visual + sum(len(w.split()) for w in words))
        return lengths

    def _eval_example(self, sample: VQASample, index: int) -> VQAExample:
        mode = self.hparams.eval_context
        context = None
        if mode != "none":
            text = sample.relevant_description if mode == "relevant" else sample.scene.description()
            context = f"{CONTEXT_PREFIX} {text}"
        hidden, protected = self.hparams.eval_hidden_visual_fraction, ()
        if self.hparams.eval_visual_tokens != "all":
            shown = sample.scene.objects if self.hparams.eval_visual_tokens == "objects" else sample.relevant
            hidden, protected = 1.0, tuple(sorted(o.row * self.config.grid + o.col for o in shown))
        return VQAExample(sample.question_id, render(sample.scene, self.config.cell_size), sample.question,
                          sample.answer, sample.family, context=context, hidden_visual_fraction=hidden,
                          protected_visual=protected)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        make = self._train_example if split == "train" else self._eval_example
        batch_size = self.hparams.batch_size if split == "train" else self.hparams.eval_batch_size
        sampler = None
        world_size = self.trainer.world_size if self.trainer is not None else 1
        per_process = -(-len(self.samples(split)) // world_size)  # the distributed sampler pads ranks evenly
        if split == "train" and per_process < batch_size:  # drop_last: no batch, Lightning would train nothing, exit 0
            spread = f" over {world_size} processes ({per_process} each)" if world_size > 1 else ""
            raise ValueError(f"data.batch_size={batch_size} is more than data.num_train={self.hparams.num_train} "
                             f"training samples{spread}: dropping the incomplete last batch leaves no training batch; "
                             "lower data.batch_size or raise data.num_train")
        if split == "train" and self.hparams.group_by_length:
            sampler, shuffle = LengthGroupedSampler(self.train_text_lengths(), batch_size * world_size,
                                                    self.hparams.seed), False
        return DataLoader(_ExampleDataset(self.samples(split), None, make), batch_size=batch_size, shuffle=shuffle,
                          sampler=sampler, collate_fn=self.train_collator if split == "train" else self.collator,
                          num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0, drop_last=split == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split: `predict` writes its answers without scoring them."""
        return self._loader("test", shuffle=False)

    def export_llava_format(self, split: str, out_dir: str | Path) -> Path:
        """Write the split as LLaVA files: PNG images, an instruction JSON and a question `.jsonl`. One question
        per image, as generated: not the base's training mix (no context, description or extra turns)."""
        from datamodules.llava_export import export_split

        return export_split(self, split, Path(out_dir))
