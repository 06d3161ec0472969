"""A frozen base LVLM under visual-token pruning: evaluation of any method, and training of plug-ins."""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from lightning_modules.common import (
    EVALUATION_MEMORY_SETTINGS,
    check_quantization_fits_strategy,
    decode_answers,
    exact_match,
    generates_in_lockstep,
    log_accuracy,
    out_of_memory_advice,
    pad_after_eos,
    prediction_records,
    score,
)
from lvlm_prune.baselines import TRAINING_FREE_METHODS, build_method
from lvlm_prune.engine import PrunedLlava
from lvlm_prune.modeling.loading import freeze, load_base_model
from lvlm_prune.runner import GenerationResult, generate_with_method


class FrozenBaseModule(L.LightningModule):
    """Loads a base LVLM from a local directory, freezes it, and evaluates it with a pruning method.

    Args:
        base_model_path: directory of the base model in Hugging Face layout (config.json + weights).
        processor: the data's processor (linked from the datamodule by the CLI).
        categories: question categories for per-category accuracy (linked from the datamodule).
        eval_method: method used by validate/test: 'full', a training-free method (random, pool, fastv,
            pdrop, visionzip, dart) or the compensation plug-in's name.
        eval_prune_ratio: layer-averaged fraction of visual tokens removed at validate/test.
        dtype: float32 | bfloat16 | float16 for the base.
        attn_implementation: sdpa | eager.
        quantization: None | 8bit | 4bit (bitsandbytes) for the frozen base.
        max_new_tokens: longest generated answer.
        method_options: keyword arguments of training-free methods by name, e.g. `{pdrop: {stage_ends: [1, 4, 8]}}`
            (PyramidDrop's default stages cannot remove more than 75 % of the tokens).
    """

    def __init__(
        self,
        base_model_path: str,
        processor: Any = None,
        categories: list[str] | None = None,
        eval_method: str = "full",
        eval_prune_ratio: float = 0.0,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        quantization: str | None = None,
        max_new_tokens: int = 8,
        method_options: dict[str, dict[str, Any]] | None = None,
    ):
        super().__init__()
        if max_new_tokens < 1:
            raise ValueError(f"model.init_args.max_new_tokens={max_new_tokens} must be at least 1 (the longest "
                             "generated answer, in tokens)")
        self.method_options = checked_method_options(method_options)
        if processor is None:
            raise ValueError("model.processor is missing: it is linked from the datamodule (data.processor)")
        # Lightning collects the init arguments of every class up the hierarchy: a subclass's plug-in module
        # (CompensationModule's `compensation`) lives in the state dict, not among the hyperparameters
        self.save_hyperparameters(ignore=["processor", "compensation"])
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.base = freeze(load_base_model(base_model_path, dtype, attn_implementation, quantization,
                                           setting="model.init_args.base_model_path"))
        check_processor_matches_base(processor, self.base, base_model_path)
        self.engine = PrunedLlava(self.base)
        self.categories = list(categories or [])
        self.val_accuracy = exact_match(self.categories)
        self.test_accuracy = exact_match(self.categories)
        self.test_predictions: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        # setup runs before the strategy wraps the module (DeepSpeed's engine would fail on the packed weights first)
        if self._trainer is not None:
            check_quantization_fits_strategy(self.hparams.quantization, self.trainer.strategy)
        if stage in ("validate", "test", "predict", "fit"):  # fail before any work on an unknown name or a bad ratio
            try:
                self.make_method(self.hparams.eval_method, self.hparams.eval_prune_ratio)
            except ValueError as error:
                raise ValueError(f"model.eval_method={self.hparams.eval_method!r} at model.eval_prune_ratio="
                                 f"{self.hparams.eval_prune_ratio}: {error}") from error

    # ------------------------------------------------------------------ methods
    def method_names(self) -> list[str]:
        """Every method name `make_method` knows."""
        return sorted(TRAINING_FREE_METHODS)

    def make_method(self, name: str, prune_ratio: float):
        method = build_method(name, prune_ratio, **self.method_options.get(name, {}))
        return self.engine.bind(method)

    def run_method(self, batch: dict[str, Any], name: str, prune_ratio: float) -> tuple[list[str], GenerationResult, float]:
        """Answers of a batch under (name, prune_ratio), their cost, and the wall time in seconds."""
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else (lambda device: None)
        synchronize(self.device)  # CUDA runs asynchronously: time the kernels, not their launches
        start = time.perf_counter()
        result = self.generate_with(batch, name, prune_ratio)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        return decode_answers(self.tokenizer, result.tokens), result, seconds

    @torch.no_grad()
    def generate_with(self, batch: dict[str, Any], name: str, prune_ratio: float) -> GenerationResult:
        # Under ZeRO-3 every submodule call gathers its weights collectively, so all ranks must make the same
        # calls: they decode max_new_tokens steps whatever EOS says, and the tokens after EOS are padded here.
        lockstep = generates_in_lockstep(self)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        with out_of_memory_advice("generation", EVALUATION_MEMORY_SETTINGS):
            result = self._generate(batch, name, prune_ratio, None if lockstep else eos, pad)
        if lockstep and eos is not None:
            result.tokens = pad_after_eos(result.tokens, eos, pad)
        return result

    def _generate(self, batch: dict[str, Any], name: str, prune_ratio: float, eos: int | None,
                  pad: int) -> GenerationResult:
        return generate_with_method(self.engine, batch, self.make_method(name, prune_ratio),
                                    self.hparams.max_new_tokens, eos, pad)

    # ------------------------------------------------------------------ evaluation loop
    def _evaluate(self, batch: dict[str, Any], stage: str) -> list[str]:
        predictions, result, _ = self.run_method(batch, self.hparams.eval_method, self.hparams.eval_prune_ratio)
        metric = self.val_accuracy if stage == "val" else self.test_accuracy
        score(metric, predictions, batch)
        size = len(predictions)
        self.log(f"{stage}/avg_visual_tokens", result.visual_tokens_per_layer.mean(), batch_size=size, sync_dist=True)
        return predictions

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        log_accuracy(self, self.val_accuracy, "val")

    def on_test_epoch_start(self) -> None:
        self.test_predictions = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        predictions = self._evaluate(batch, "test")
        model_id = f"{self.hparams.eval_method}@r={self.hparams.eval_prune_ratio}"
        self.test_predictions.extend(prediction_records(batch, predictions, model_id))

    def on_test_epoch_end(self) -> None:
        log_accuracy(self, self.test_accuracy, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """LLaVA answer-file records of the batch (no metric: benchmark question files may carry no answers)."""
        predictions, _, _ = self.run_method(batch, self.hparams.eval_method, self.hparams.eval_prune_ratio)
        return prediction_records(batch, predictions, f"{self.hparams.eval_method}@r={self.hparams.eval_prune_ratio}")

    def configure_optimizers(self):
        return None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = {key.split(".", 1)[0] for key in self.state_dict()}
        foreign = sorted({key.split(".", 1)[0] for key in checkpoint.get("state_dict") or {}} - own)
        if foreign:
            raise ValueError(f"this checkpoint holds modules {foreign} that {type(self).__name__} does not have: it was "
                             "written by another model class (a plug-in's CompensationModule, for 'compensation'). "
                             "Evaluate it with the config that trained it, or export the plug-in "
                             "(scripts/export_plugin.py) and load it with model.plugin_weights_path")


def checked_method_options(method_options: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """`method_options` as plain dicts, each checked against its method's constructor now, so that a misspelt
    option fails at init rather than when a sweep (after the whole fit) first builds that method."""
    unknown = sorted(set(method_options or {}) - set(TRAINING_FREE_METHODS))
    if unknown:
        raise ValueError(f"model.method_options names unknown methods {unknown}; known: {sorted(TRAINING_FREE_METHODS)}")
    checked = {}
    for name, options in (method_options or {}).items():
        if not isinstance(options, Mapping):
            raise ValueError(f"model.method_options.{name} must map option names to values, got {options!r}")
        method = TRAINING_FREE_METHODS[name]
        parameters = list(inspect.signature(method.__init__).parameters.values())[1:]  # after self
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            accepted = [p.name for p in parameters if p.name != "prune_ratio"
                        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
            for key in options:
                if key not in accepted:
                    raise ValueError(f"model.method_options.{name}.{key} is not an option of {name} "
                                     f"({method.__name__}); accepted: {accepted or 'none'}")
        try:  # values the constructor refuses whatever the ratio (those bind refuses need the model: sweep setup)
            build_method(name, 0.0, **options)
        except (ValueError, TypeError) as error:
            raise ValueError(f"model.method_options.{name}={dict(options)}: {error}") from error
        checked[name] = dict(options)
    return checked


def check_processor_matches_base(processor: Any, base: torch.nn.Module, base_model_path: str) -> None:
    """A processor saved with another base gives token ids the embedding does not have, or image tokens the
    engine does not find: refused here, with both settings named, rather than at the first batch."""
    settings = "data.init_args.processor_path and model.init_args.base_model_path do not match"
    source = getattr(processor.tokenizer, "name_or_path", "")
    source = f"comes from {source!r}" if source else "was built by the datamodule"
    fix = (f"; the processor {source}, the base from {str(base_model_path)!r}: use the processor saved with the base "
           "model (usually the same directory)")
    config = base.config
    image_token = getattr(processor, "image_token", None)
    processor_id = getattr(processor, "image_token_id", None)
    if processor_id is None and image_token is not None:
        processor_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    base_id = getattr(config, "image_token_id", None)
    if base_id is None:
        base_id = getattr(config, "image_token_index", None)
    if processor_id is not None and base_id is not None and processor_id != base_id:
        raise ValueError(f"{settings}: the processor's image token {image_token!r} has id {processor_id}, the base "
                         f"model's config.image_token_id is {base_id}{fix}")
    # <=, not ==: checkpoints pad the embedding (LLaVA-1.5-7B: 32064 rows for a tokenizer of 32002 tokens)
    rows = base.get_input_embeddings().num_embeddings
    if len(processor.tokenizer) > rows:
        raise ValueError(f"{settings}: the processor's tokenizer has {len(processor.tokenizer)} tokens, more than the "
                         f"base model's {rows} embedding rows{fix}")
    crop = crop_size(getattr(processor, "image_processor", None))
    vision = getattr(getattr(config, "vision_config", None), "image_size", None)
    if crop is not None and vision is not None and crop != (vision, vision):
        raise ValueError(f"{settings}: the processor crops images to {crop[0]} x {crop[1]} pixels, the base model's "
                         f"vision tower takes {vision} (vision_config.image_size){fix}")


def crop_size(image_processor: Any) -> tuple[int, int] | None:
    """(height, width) of the images (LLaVA-NeXT: of each anyres crop) the image processor hands the vision tower;
    None where that is not its `crop_size` (no centre crop, or no crop size at all)."""
    crop = getattr(image_processor, "crop_size", None)
    if crop is None or not getattr(image_processor, "do_center_crop", True):
        return None
    try:
        height, width = crop["height"], crop["width"]
    except (KeyError, TypeError):
        return None
    return (height, width) if isinstance(height, int) and isinstance(width, int) else None
